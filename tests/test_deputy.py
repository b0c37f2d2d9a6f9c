"""Nobody's deputy: the daemon replies only to inboxes (CONTRACT v1.3).

A reply is published with the daemon's NATS rights. These tests run on a NATS
server without permissions, where the daemon's own check is the only wall:
a request that names another subject as its reply gets no reply at all, so it
cannot make the daemon approve, deregister or touch JetStream for its sender.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from daemon.app import Daemon
from tests.support import Client, eventually


async def stats_of(client: Client, daemon: Daemon) -> dict[str, dict[str, Any]]:
    assert daemon.service is not None
    msg = await client.nc.request(f"$SRV.STATS.registry.{daemon.service.id}", b"", timeout=5)
    return {e["name"]: e for e in orjson.loads(msg.data)["endpoints"]}


async def refused(client: Client, daemon: Daemon, op: str, count: int) -> None:
    async def counted() -> bool | None:
        return (await stats_of(client, daemon))[op]["num_errors"] == count or None

    await eventually(counted, f"{count} refused request(s) on {op}")


async def test_a_reply_subject_that_is_an_operation_is_not_answered(
    client: Client, daemon: Daemon
) -> None:
    node = await client.register("gpu-1")
    assert node["status"] == "pending"
    await client.replica(node, "m")
    body = orjson.dumps({"node_id": node["id"], "model": "m", "replica_index": 0})
    # replica_get's reply names the node: answered into approve, it approves.
    await client.nc.publish(f"{client.prefix}.replica_get", body, reply=f"{client.prefix}.approve")
    await client.nc.publish(
        f"{client.prefix}.replica_get", body, reply=f"{client.prefix}.deregister"
    )
    await client.nc.flush()
    await refused(client, daemon, "replica_get", 2)
    node = await client.call("get", node_id=node["id"])
    assert node["status"] == "pending"
    stats = await stats_of(client, daemon)
    assert stats["approve"]["num_requests"] == stats["deregister"]["num_requests"] == 0
    assert "inbox" in stats["replica_get"]["last_error"]
    # An inbox still gets its answer.
    assert (await client.call("replica_get", node_id=node["id"], model="m"))["state"] == "loaded"


async def test_a_workers_own_subject_does_not_answer_into_another_nodes(
    client: Client, daemon: Daemon
) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    # Answered into offline.<b>, a record on a's own subject would take b offline.
    await client.nc.publish(
        f"{client.prefix}.replica_set.{a['id']}",
        orjson.dumps({"model": "m", "state": "loaded"}),
        reply=f"{client.prefix}.offline.{b['id']}",
    )
    await client.nc.flush()
    await refused(client, daemon, "replica_set_self", 1)
    assert (await client.call("get", node_id=b["id"]))["status"] == "healthy"
    assert await client.call("node_models", node_id=a["id"]) == []  # nor handled


async def test_a_heartbeat_cannot_reach_the_jetstream_api(client: Client, daemon: Daemon) -> None:
    node = await client.healthy_node("gpu-1")
    await client.call("backend_op", node_id=node["id"], backend="vllm", op="install")
    stream = daemon.settings.stream
    js = client.nc.jetstream()
    for verb in (f"STREAM.PURGE.{stream}", f"STREAM.DELETE.{stream}"):
        await client.nc.publish(
            f"{client.prefix}.heartbeat.{node['id']}", b"{}", reply=f"$JS.API.{verb}"
        )
    await client.nc.flush()
    await refused(client, daemon, "heartbeat", 2)
    assert (await js.stream_info(stream)).state.messages == 1
    assert await client.call("backend_ops_count") == {"vllm": 1}


async def test_control_verbs_answer_only_inboxes(client: Client, daemon: Daemon) -> None:
    node = await client.register("gpu-1")
    listener = await client.listen(f"{client.prefix}.deregister")
    # PING's body is not a deregister request, but where it goes is the point.
    await client.nc.publish("$SRV.PING.registry", b"", reply=f"{client.prefix}.deregister")
    await client.nc.flush()
    reply = await client.nc.request("$SRV.PING.registry", b"", timeout=5)
    assert orjson.loads(reply.data)["type"] == "io.nats.micro.v1.ping_response"
    assert await listener.drained(client.nc) == []
    assert (await client.call("get", node_id=node["id"]))["name"] == "gpu-1"


async def test_refusals_are_logged_once_a_minute_with_a_count(
    client: Client, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registryd.service")
    for _ in range(5):
        await client.nc.publish(f"{client.prefix}.list", b"{}", reply=f"{client.prefix}.drain")
    await client.nc.flush()
    await refused(client, daemon, "list", 5)
    lines = [r.getMessage() for r in caplog.records if "REGISTRY_REPLY_PREFIXES" in r.message]
    assert len(lines) == 1, lines
    assert f"{client.prefix}.list" in lines[0] and f"{client.prefix}.drain" in lines[0]


async def test_other_reply_prefixes_can_be_allowed(start_daemon: Any, clients: Any) -> None:
    daemon = await start_daemon(reply_prefixes="_INBOX.,_ROUTER_INBOX.")
    client = await clients(daemon)
    listener = await client.listen("_ROUTER_INBOX.abc")
    await client.nc.publish(f"{client.prefix}.list", b"{}", reply="_ROUTER_INBOX.abc")
    assert (await listener.next())[1] == []
