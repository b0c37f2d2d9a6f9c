"""Waiting out what is not there yet, and saying so once.

Every loop of the daemon that depends on something outside it (PostgreSQL,
NATS, JetStream) retries the same way and tells the operator the same way:
`Backoff` spaces the attempts, `retrying` runs an attempt until it succeeds,
`Outage` logs when failures start (again if their cause changes) and when
they end, never once per attempt, and `Throttle` paces the lines about
something that may happen thousands of times a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """An exception in one line, for a log line: its first line, or its type."""
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


class Backoff:
    """Delays that double from `base` up to `cap`; `reset` after a success."""

    def __init__(self, base: float = 0.2, cap: float = 5.0) -> None:
        self._base = base
        self._cap = cap
        self._next = base

    def reset(self) -> None:
        self._next = self._base

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self._cap)
        return delay

    async def wait(self) -> None:
        await asyncio.sleep(self.next())


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    log: logging.Logger,
    what: str,
    backoff: Backoff | None = None,
) -> T:
    """`attempt()` until it returns; a failure of the kinds in `retry_on` is
    logged (`what` says what is missing) and retried after a growing delay,
    any other failure propagates."""
    backoff = backoff or Backoff()
    while True:
        try:
            return await attempt()
        except retry_on as exc:
            delay = backoff.next()
            log.warning("%s (%s); retrying in %.1fs", what, describe(exc), delay)
            await asyncio.sleep(delay)


class Outage:
    """Logs the start of a run of failures (and a change of its cause) and its
    end, with the messages given: `{cause}` in them is the failure, described."""

    def __init__(
        self, log: logging.Logger, started: str, ended: str, *, per_cause: bool = True
    ) -> None:
        self._log = log
        self._started = started
        self._ended = ended
        # Whether a new cause during an outage is news; not where causes
        # alternate from one failure to the next (the requests' 503s).
        self._per_cause = per_cause
        self.cause: str | None = None

    @property
    def on(self) -> bool:
        return self.cause is not None

    def failed(
        self,
        cause: BaseException | str,
        more: str = "",
        *,
        traceback: BaseException | None = None,
    ) -> bool:
        """Note a failure; whether it was logged (it starts, or its cause changed)."""
        text = cause if isinstance(cause, str) else describe(cause)
        if text == self.cause or (self.cause is not None and not self._per_cause):
            return False
        self._log.warning(self._started.format(cause=text) + more, exc_info=traceback)
        self.cause = text
        return True

    def ended(self, more: str = "") -> bool:
        """Note a success; whether it ended an outage (and said so)."""
        if self.cause is None:
            return False
        self._log.info(self._ended.format(cause=self.cause) + more)
        self.cause = None
        return True


class Throttle:
    """When to write a line about something that may happen thousands of times
    a second: the first time at once, then at most once per `every` seconds,
    each line counting what happened since the previous one.

    One line per occurrence would let a flood fill the log; one line in all
    would hide that it goes on.
    """

    def __init__(self, every: float = 60.0) -> None:
        self._every = every
        self._last: float | None = None
        self._held = 0

    def due(self) -> int | None:
        """Count one occurrence. When a line is due, how many it reports (this
        one and those held back since the last line); otherwise None."""
        self._held += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self._every:
            return None
        self._last = now
        count, self._held = self._held, 0
        return count

    def held(self) -> int:
        """The occurrences not reported yet, now counted as reported: for a
        line that closes the episode (the database is back)."""
        count, self._held = self._held, 0
        return count
