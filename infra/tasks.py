"""Stopping tasks for certain.

On Python 3.11 a cancellation can be lost: `asyncio.wait_for`, which nats-py
runs inside every pull fetch, returns the inner result instead of raising
when the result and the cancellation arrive together (fixed in 3.12). A loop
that lost its cancellation runs on, and a stop that waits for it waits for
ever: a daemon whose delivery loop was fetching at that moment never stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

AGAIN_AFTER = 0.5  # seconds a cancelled task has to end before it is cancelled again


async def cancel(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again any
    that is still running after AGAIN_AFTER seconds."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=AGAIN_AFTER)
