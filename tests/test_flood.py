"""A flood of malformed requests from one client does not shut others out.

The daemon runs as its own process, as in production. One NATS connection
sends 10,000 malformed requests, then a router's request goes out behind them
on that same connection. Everything reaches the daemon in that order and its
replies come back in the order it sent them, so the test can tell, without
timing anything, whether the router waited for the whole flood to be refused:
requests take turns by requester (their reply inbox), so it must not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from nats.aio.msg import Msg

from daemon.service import ERROR_CODE_HEADER
from tests.support import MALFORMED, Client, Registryd, connect, eventually

COUNT = 10_000


async def test_flood_of_malformed_requests_leaves_others_served(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_url: str,
    pg: asyncpg.Connection,
) -> None:
    daemon = await spawn(env=daemon_env)
    nc = await connect(nats_url)
    client = Client(nc, daemon_env["REGISTRY_SUBJECT_PREFIX"])

    async def serving() -> bool | None:
        daemon.assert_running()
        try:
            return await client.call("list") == []
        except Exception:
            return None

    await eventually(serving, "the daemon to serve")
    node = await client.healthy_node("gpu-1")
    await client.replica(node, "llama")

    replies: list[Msg] = []
    router_done_after: list[int] = []  # flood replies seen when each router pair ended
    all_in = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        replies.append(msg)
        if len(replies) == COUNT:
            all_in.set()

    inbox = "_FLOOD." + nc.new_inbox().rpartition(".")[2]
    await nc.subscribe(inbox + ".*", cb=on_reply)
    for i in range(COUNT):
        op, data, _ = MALFORMED[i % len(MALFORMED)]
        await nc.publish(f"{client.prefix}.{op}", data, reply=f"{inbox}.{i}")

    # The router's pairs queue up behind the whole flood on the wire.
    async def route() -> None:
        while not all_in.is_set():
            got = await client.call("findlock", model="llama")
            assert got["node"]["id"] == node["id"]
            await client.call("inflight_dec", node_id=node["id"], model="llama", replica_index=0)
            router_done_after.append(len(replies))

    await asyncio.wait_for(asyncio.gather(route(), all_in.wait()), 120)

    # The router was answered while most of the flood was still waiting.
    assert router_done_after, "the router got no answer during the flood"
    assert router_done_after[0] < COUNT // 2, router_done_after[:5]

    # Nothing dropped: every malformed request got its 400, naming what is wrong.
    assert len(replies) == COUNT
    by_index = {int(r.subject.rpartition(".")[2]): r for r in replies}
    assert len(by_index) == COUNT
    for i, reply in by_index.items():
        op, data, words = MALFORMED[i % len(MALFORMED)]
        headers: dict[str, Any] = dict(reply.headers or {})
        assert headers.get(ERROR_CODE_HEADER) == "400", (op, data, reply.data)
        error = orjson.loads(reply.data)["error"]
        assert error["status"] == "bad_request" and words in error["message"], (op, error)

    # The data is as it was: no node from the flood, no in-flight count left.
    assert [n["id"] for n in await client.call("list")] == [node["id"]]
    assert await pg.fetchval("SELECT sum(in_flight) FROM replicas") == 0
    daemon.assert_running()
    await nc.close()
