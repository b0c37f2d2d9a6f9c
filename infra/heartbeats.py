"""Heartbeats, coalesced per node and written in batches.

This is the machinery; what a reading holds and the statement that writes a
batch of them belong to the heartbeat operation (subjects/nodes.py), which
the daemon hands in as the writer.

Every worker heartbeats, so one UPDATE per heartbeat would make the database
the registry's bottleneck. Instead readings wait here, the latest one per node
(a later reading's fields win; fields it leaves out keep the earlier value),
and one statement writes all that arrived while the previous write ran. An idle
registry writes a lone heartbeat at once; a busy one writes thousands per
statement.

While the database is unreachable, readings are kept (still the latest per
node) and written when it returns: a heartbeat published during an outage is
applied after it, not dropped. A heartbeat that asked for a reply gets it once
its batch is written (404 for an unknown node), or a 503 after
REGISTRY_DB_TIMEOUT.

Anyone may publish on registry.heartbeat.<anything>, so the readings kept are
bounded by node id (REGISTRY_HEARTBEAT_BUFFER), not by what clients send: with
the buffer full, a reading for a node id not in it is dropped and counted (a
503 if it asked for a reply), while the nodes already kept still get their
newer readings. Drops are logged at most once a minute, with a count.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from infra.errors import Unavailable, classify
from infra.retry import Backoff, Outage, Throttle

log = logging.getLogger("registryd.heartbeats")

# Writes a batch of readings (node id → fields); the node ids that exist.
Writer = Callable[[dict[str, dict[str, Any]]], Awaitable[set[str]]]

# Most readings one statement writes; more wait for the next one.
MAX_BATCH = 5000


@dataclass
class Reading:
    values: dict[str, Any]
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)

    def merge(self, newer: dict[str, Any]) -> None:
        for key, value in newer.items():
            if value is not None:
                self.values[key] = value


class Heartbeats:
    def __init__(self, write: Writer, limit: int) -> None:
        self._write = write
        self._limit = limit  # node ids kept at most, pending and being written
        self._pending: dict[str, Reading] = {}
        # The batch being written: its ids still count against the limit, as
        # it goes back into _pending if the write fails.
        self._writing: dict[str, Reading] = {}
        self._overlap = 0  # ids both being written and pending again
        self._wake = asyncio.Event()
        self._outage = Outage(
            log,
            "database unreachable ({cause})",
            "database reachable again: heartbeats written",
        )
        self._dropped = 0
        self._drops = Throttle()

    @property
    def buffered(self) -> int:
        """Node ids whose readings are kept: waiting, or being written."""
        return len(self._pending) + len(self._writing) - self._overlap

    @property
    def dropped(self) -> int:
        """Readings dropped since start because the buffer was full."""
        return self._dropped

    def submit(self, node_id: str, values: dict[str, Any]) -> bool:
        """Queue a reading, to be written with the next batch; False if the
        buffer is full and the reading was dropped."""
        reading = self._pending.get(node_id)
        if reading is not None:
            reading.merge(values)
        elif node_id in self._writing:
            self._pending[node_id] = Reading(dict(values))
            self._overlap += 1
        elif self.buffered >= self._limit:
            self._drop()
            return False
        else:
            self._pending[node_id] = Reading(dict(values))
        self._wake.set()
        return True

    def _drop(self) -> None:
        self._dropped += 1
        count = self._drops.due()
        if count is not None:
            log.warning(
                "heartbeat buffer full (%d node ids, REGISTRY_HEARTBEAT_BUFFER): "
                "%d heartbeat(s) for other node ids dropped",
                self._limit,
                count,
            )

    async def write(self, node_id: str, values: dict[str, Any], wait: float) -> bool:
        """Queue a reading and wait until it is written: whether the node exists."""
        if not self.submit(node_id, values):
            raise Unavailable("heartbeat buffer full while the database catches up, retry later")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[node_id].waiters.append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait)
        except TimeoutError:
            raise Unavailable("database unavailable, retry later") from None

    async def run(self) -> None:
        """The writer: a batch per statement, for as long as the daemon runs."""
        backoff = Backoff(0.1, 2.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    await self._flush_once()
                    backoff.reset()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if classify(exc) is None:
                        log.error("writing heartbeats failed", exc_info=exc)
                    else:
                        kept = f": {len(self._pending)} heartbeat(s) kept to write when it returns"
                        self._outage.failed(exc, kept)
                    await backoff.wait()

    async def _flush_once(self) -> None:
        batch = dict(itertools.islice(self._pending.items(), MAX_BATCH))
        for node_id in batch:
            del self._pending[node_id]
        self._writing = batch
        try:
            ids = list(batch)
            found = await self._write({node_id: batch[node_id].values for node_id in ids})
        except BaseException:
            # Put them back under any newer reading that arrived meanwhile.
            for node_id, reading in batch.items():
                newer = self._pending.get(node_id)
                if newer is not None:
                    reading.merge(newer.values)
                    reading.waiters.extend(newer.waiters)
                self._pending[node_id] = reading
            raise
        finally:
            self._writing = {}
            self._overlap = 0
        if self._outage.on:
            held = self._drops.held()
            self._outage.ended(f" ({held} more dropped while the buffer was full)" if held else "")
        for node_id, reading in batch.items():
            for waiter in reading.waiters:
                if not waiter.done():
                    waiter.set_result(node_id in found)

    async def flush(self, wait: float) -> None:
        """Write what is pending (at shutdown), giving up after `wait` seconds."""
        deadline = asyncio.get_running_loop().time() + wait
        while self._pending and asyncio.get_running_loop().time() < deadline:
            try:
                await self._flush_once()
            except Exception:
                await asyncio.sleep(0.1)
        if self._pending:
            log.warning("%d heartbeat(s) not written at shutdown", len(self._pending))
