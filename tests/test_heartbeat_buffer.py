"""Heartbeats kept during a database outage are bounded (contract v1.3, "Bounded buffers").

Any client may publish on registry.heartbeat.<anything>; while the database is
away the daemon keeps the latest reading per node id to write later, so made-up
ids must not grow it without bound: past REGISTRY_HEARTBEAT_BUFFER node ids, a
reading for a new id is dropped (and counted), while the nodes already kept
still get their newer readings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
import pytest

from daemon.app import Daemon
from tests.conftest import through
from tests.support import CallError, Client, Proxy, eventually, fails

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

BUFFER = 1000
MADE_UP = 5000


async def test_made_up_node_ids_cannot_grow_the_heartbeat_buffer_during_an_outage(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    database_url: str,
    proxy: Proxy,
    pg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon = await start_daemon(
        database_url=through(database_url, proxy.port), db_timeout=1.0, heartbeat_buffer=BUFFER
    )
    heartbeats = daemon.heartbeats
    assert heartbeats is not None
    client = await clients(daemon)
    nodes = [await client.healthy_node(f"gpu-{i}", available_vram=1) for i in range(3)]

    async def beat(node_id: str, vram: int) -> None:
        await client.nc.publish(
            f"{client.prefix}.heartbeat.{node_id}", orjson.dumps({"available_vram": vram})
        )

    with caplog.at_level(logging.INFO, logger="registryd.heartbeats"):
        proxy.cut()
        for i, node in enumerate(nodes):
            await beat(node["id"], 100 + i)
        for i in range(MADE_UP):
            await beat(f"made-up-{i}", i)
        # The real nodes are kept already: their newer readings still count.
        for i, node in enumerate(nodes):
            await beat(node["id"], 200 + i)
        await client.nc.flush()

        # Heartbeats of one publisher are handled in order, so this one comes
        # after all of the above. A new id that asks for a reply hears at once
        # that it was not kept (not after REGISTRY_DB_TIMEOUT, as for a write).
        await fails(client.call("heartbeat.made-up-late", available_vram=1), 503, "buffer")
        assert heartbeats.buffered == BUFFER
        assert heartbeats.dropped == len(nodes) + MADE_UP - BUFFER + 1

        proxy.restore()

        async def written() -> bool | None:
            rows = await pg.fetch(
                "SELECT id, available_vram FROM nodes WHERE id = ANY($1::text[])",
                [n["id"] for n in nodes],
            )
            got = {r["id"]: r["available_vram"] for r in rows}
            want = {n["id"]: 200 + i for i, n in enumerate(nodes)}
            return (got == want and heartbeats.buffered == 0) or None

        await eventually(written, "the kept readings to be written")

        # Back to normal: a heartbeat is kept and written again.
        async def answered() -> bool | None:
            try:
                return await client.call(f"heartbeat.{nodes[0]['id']}", available_vram=5) == {}
            except CallError as err:
                assert err.code == 503, err
                return None

        await eventually(answered, "a heartbeat to be written after the outage")

    # Thousands dropped, one line at the time (the next at most a minute
    # later), and the rest counted in the line that says the database is back.
    lines = [r.getMessage() for r in caplog.records if r.name == "registryd.heartbeats"]
    full = [line for line in lines if "heartbeat buffer full" in line]
    assert len(full) == 1, lines
    assert f"{BUFFER} node ids" in full[0]
    back = [line for line in lines if "database reachable again" in line]
    assert len(back) == 1, lines
    assert f"{heartbeats.dropped - 1} more" in back[0]
