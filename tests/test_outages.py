"""What users see when PostgreSQL goes away and comes back, and with several daemons."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from daemon.app import Daemon
from tests.conftest import through
from tests.support import CallError, Client, Proxy, connect, until

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


async def test_a_heartbeat_published_during_an_outage_is_applied_after_it(
    start_daemon: Callable[..., Awaitable[Daemon]],
    database_url: str,
    nats_url: str,
    proxy: Proxy,
    pg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon = await start_daemon(database_url=through(database_url, proxy.port), db_timeout=1.0)
    nc = await connect(nats_url)
    client = Client(nc, daemon.settings.subject_prefix)
    try:
        node = await client.healthy_node("gpu-1", available_vram=1)
        with caplog.at_level(logging.INFO):
            proxy.cut()
            await client.publish(f"heartbeat.{node['id']}", {"available_vram": 42})
            # One that waits for its reply hears that the database is away...
            with pytest.raises(CallError) as err:
                await client.call(f"heartbeat.{node['id']}", available_vram=43)
            assert err.value.code == 503
            proxy.restore()

            # ...and both readings, the later winning, land once it is back.
            async def written() -> bool:
                vram = await pg.fetchval(
                    "SELECT available_vram FROM nodes WHERE id = $1", node["id"]
                )
                return vram == 43

            await until(written)
            await until(lambda: _served(client))
        messages = [r.getMessage() for r in caplog.records]
        assert any("heartbeat(s) kept" in m for m in messages)
        assert any("database reachable again" in m for m in messages)
        assert any("requests get 503" in m for m in messages)
        assert any("requests served again" in m for m in messages)
    finally:
        await nc.close()


async def _served(client: Client) -> bool:
    try:
        await client.call("list")
        return True
    except CallError:
        return False


async def test_heartbeats_from_many_workers_are_all_written(
    client: Client, pg: asyncpg.Connection
) -> None:
    nodes = [await client.healthy_node(f"gpu-{i}") for i in range(50)]
    for round_ in range(1, 6):
        for node in nodes:
            await client.nc.publish(
                f"{client.prefix}.heartbeat.{node['id']}",
                orjson.dumps({"available_vram": round_ * 1000 + int(node["name"][4:])}),
            )
    await client.nc.flush()

    async def latest() -> bool:
        rows = await pg.fetch("SELECT name, available_vram FROM nodes")
        return all(r["available_vram"] == 5000 + int(r["name"][4:]) for r in rows)

    await until(latest)


async def test_several_daemons_share_the_requests(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> None:
    daemons = [await start_daemon() for _ in range(3)]
    nc = await connect(nats_url)
    client = Client(nc, daemons[0].settings.subject_prefix)
    try:
        await asyncio.gather(*(client.call("list") for _ in range(300)))
        served: list[Any] = []
        for daemon in daemons:
            assert daemon.service is not None
            stats = {e.name: e.stats.num_requests for e in daemon.service.endpoints}
            served.append(stats["list"])
        assert sum(served) == 300
        assert all(count > 0 for count in served), served
    finally:
        await nc.close()


async def test_the_pool_moves_to_the_second_database_host(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    database_url: str,
    proxy: Proxy,
) -> None:
    # Two "hosts" in one DSN, as for a primary and its standby; both proxies
    # lead to the same database, so the data is there whichever is used.
    second = Proxy(proxy.target)
    await second.start()
    try:
        two_hosts = through(database_url, proxy.port).replace(
            f"127.0.0.1:{proxy.port}", f"127.0.0.1:{proxy.port},127.0.0.1:{second.port}"
        )
        daemon = await start_daemon(
            database_url=two_hosts + "?target_session_attrs=read-write", db_timeout=1.0
        )
        client = await clients(daemon)
        node = await client.register("gpu-1")
        assert not second._writers  # everything went to the first host so far

        proxy.cut()  # the first host is gone for good

        async def served() -> bool:
            try:
                return (await client.call("get", node_id=node["id"]))["id"] == node["id"]
            except CallError as err:
                assert err.code == 503, err  # while the pool notices, and no worse
                return False

        await until(served)
        assert second._writers, "no connection through the second host"
        assert (await client.register("gpu-2"))["name"] == "gpu-2"
    finally:
        await second.close()
