"""A daemon's stop ends its loops even when a cancellation gets lost."""

from __future__ import annotations

import asyncio

from infra import tasks


async def test_a_loop_that_lost_its_cancellation_is_cancelled_again() -> None:
    # What Python 3.11's asyncio.wait_for (inside nats-py's fetch) can do: the
    # cancellation arrives with a result, and the loop carries on.
    running = asyncio.Event()
    lost = 0

    async def loop() -> None:
        nonlocal lost
        while True:
            running.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1

    task = asyncio.create_task(loop())
    await running.wait()
    await asyncio.wait_for(tasks.cancel([task]), 5)
    assert lost == 1 and task.cancelled()


async def test_tasks_already_done_are_left_as_they_are() -> None:
    done = asyncio.create_task(asyncio.sleep(0, result="kept"))
    await done
    await tasks.cancel([done])
    assert done.result() == "kept"
