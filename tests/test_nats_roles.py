"""The roles of systemd/nats-server.conf, enforced by a real nats-server.

A worker may register and heartbeat but not approve, deregister or drain; a
router may pick replicas but not approve; an admin may do anything. And no
role can borrow the daemon's rights by naming another subject as a request's
reply: the daemon refuses such requests, and the example's permissions would
refuse its reply even if it did not.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import orjson
import pytest
from nats.errors import TimeoutError as NatsTimeout

from daemon import embedded
from tests.support import CallError, Client, Registryd, eventually, serving

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

STREAM = "REGISTRY_BACKEND_OPS"
CONSUMER = "registryd-delivery"
CONF = Path(__file__).resolve().parent.parent / "systemd" / "nats-server.conf"
PASSWORDS = {
    "registryd": "change-me-registryd",
    "registryd-intents": "change-me-intents",
    "worker": "change-me-worker",
    "router": "change-me-router",
    "admin": "change-me-admin",
}


@pytest.fixture
def roles_nats(nats_with: Callable[[str], embedded.NatsServer]) -> embedded.NatsServer:
    # The example's roles as shipped; its listen address and JetStream store
    # give way to a free port and a directory of this test's (start_nats's flags).
    text = CONF.read_text()
    text = re.sub(r"(?m)^listen: .*$", "", text)
    text = re.sub(r"(?ms)^jetstream \{.*?^\}", "", text)
    return nats_with(text)


async def as_user(server: embedded.NatsServer, user: str) -> Client:
    async def quiet(_: Exception) -> None:  # permission errors are what we test
        pass

    nc = await nats.connect(
        server.url,
        user=user,
        password=PASSWORDS[user],
        error_cb=quiet,
        max_reconnect_attempts=-1,
    )
    return Client(nc, "registry", timeout=2)


async def refused(client: Client, op: str, **body: Any) -> None:
    """The server does not let the request through: no reply ever comes."""
    with pytest.raises(NatsTimeout):
        await client.call(op, **body)


def as_registryd(daemon_env: dict[str, str], server: embedded.NatsServer) -> dict[str, str]:
    """A daemon's environment with the example's two daemon users and names."""
    return daemon_env | {
        "REGISTRY_NATS_URL": server.url,
        "REGISTRY_NATS_USER": "registryd",
        "REGISTRY_NATS_PASSWORD": PASSWORDS["registryd"],
        "REGISTRY_NATS_INTENTS_USER": "registryd-intents",
        "REGISTRY_NATS_INTENTS_PASSWORD": PASSWORDS["registryd-intents"],
        "REGISTRY_SUBJECT_PREFIX": "registry",
        "REGISTRY_STREAM": STREAM,
    }


async def test_each_role_may_do_what_it_needs_and_no_more(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    roles_nats: embedded.NatsServer,
) -> None:
    await spawn(env=as_registryd(daemon_env, roles_nats))
    worker = await as_user(roles_nats, "worker")
    router = await as_user(roles_nats, "router")
    admin = await as_user(roles_nats, "admin")
    try:
        await serving(admin)
        node = await worker.register("gpu-1")
        assert node["status"] == "pending"
        await worker.publish(f"heartbeat.{node['id']}", {"available_vram": 5})
        # It records what it serves on its node's own subject, not the shared one.
        await worker.call(f"replica_set.{node['id']}", model="served", state="loaded")
        await refused(worker, "replica_set", node_id=node["id"], model="m", state="loaded")
        for op in ("approve", "deregister", "drain"):
            await refused(worker, op, node_id=node["id"])
        await refused(router, "approve", node_id=node["id"])
        await refused(router, "deregister", node_id=node["id"])
        assert (await admin.call("get", node_id=node["id"]))["status"] == "pending"

        # A router picks (and hears "none loaded" as a proper reply).
        with pytest.raises(CallError) as none:
            await router.call("findlock", model="m")
        assert none.value.code == 404
        assert (await admin.call("approve", node_id=node["id"]))["status"] == "healthy"
        await admin.replica(node, "m")
        picked = await router.call("findlock", model="m")
        assert picked["node"]["id"] == node["id"]
        await router.call("inflight_dec", node_id=node["id"], model="m")
        await admin.call("drain", node_id=node["id"])
        assert (await admin.call("get", node_id=node["id"]))["status"] == "draining"
    finally:
        for client in (worker, router, admin):
            await client.nc.close()


@pytest.mark.parametrize(
    "reply_prefixes",
    [None, "_INBOX.,registry.,$JS."],
    ids=["the daemon refuses", "the permissions refuse alone"],
)
async def test_no_reply_subject_borrows_the_daemons_rights(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    roles_nats: embedded.NatsServer,
    reply_prefixes: str | None,
) -> None:
    # The second case widens REGISTRY_REPLY_PREFIXES so that the daemon's own
    # check lets the tricks through: what stops them then is nats-server.
    env = as_registryd(daemon_env, roles_nats)
    if reply_prefixes:
        env["REGISTRY_REPLY_PREFIXES"] = reply_prefixes
    daemon = await spawn(env=env)
    worker = await as_user(roles_nats, "worker")
    router = await as_user(roles_nats, "router")
    admin = await as_user(roles_nats, "admin")
    js = admin.nc.jetstream()
    try:
        await serving(admin)
        node = await worker.register("gpu-1")
        await admin.replica(node, "m")
        await admin.call("backend_op", node_id=node["id"], backend="vllm", op="install")

        async def consumer_made() -> Any:
            try:
                return await js.consumer_info(STREAM, CONSUMER)
            except nats.js.errors.NotFoundError:
                return None

        await eventually(consumer_made, "the delivery consumer")

        # A router has replica_get answered into approve and deregister (the
        # replica's body names the node); a worker has its heartbeat answered
        # into the JetStream API, against the intent stream and its consumer.
        replica = orjson.dumps({"node_id": node["id"], "model": "m", "replica_index": 0})
        heartbeat = f"registry.heartbeat.{node['id']}"
        tricks = [
            (router, "registry.replica_get", replica, "registry.approve"),
            (router, "registry.replica_get", replica, "registry.deregister"),
            (worker, heartbeat, b"{}", f"$JS.API.STREAM.DELETE.{STREAM}"),
            (worker, heartbeat, b"{}", f"$JS.API.STREAM.PURGE.{STREAM}"),
            (worker, heartbeat, b"{}", f"$JS.API.CONSUMER.DELETE.{STREAM}.{CONSUMER}"),
        ]
        for who, subject, body, reply in tricks:
            await who.nc.publish(subject, body, reply=reply)
            await who.nc.flush()

        if reply_prefixes is None:
            # Each refused unanswered, and counted as an error of its endpoint.
            async def all_refused() -> bool | None:
                msg = await admin.nc.request("$SRV.STATS.registry", b"", timeout=2)
                stats = {e["name"]: e for e in orjson.loads(msg.data)["endpoints"]}
                refused = (stats["replica_get"]["num_errors"], stats["heartbeat"]["num_errors"])
                return refused == (2, 3) or None

            await eventually(all_refused, "the tricks to be refused")
            assert "not under REGISTRY_REPLY_PREFIXES" in daemon.output()
        else:
            # The daemon answered each; nats-server refused every answer.
            for *_, reply in tricks:

                async def answer_refused(reply: str = reply) -> bool | None:
                    return f'publish to "{reply.lower()}"' in daemon.output().lower() or None

                await eventually(answer_refused, f"nats-server to refuse the reply to {reply}")

        assert (await admin.call("get", node_id=node["id"]))["status"] == "pending"
        assert (await js.stream_info(STREAM)).state.messages == 1
        assert await js.consumer_info(STREAM, CONSUMER)
        assert [i["backend"] for i in await admin.call("backend_ops")] == ["vllm"]
        assert await admin.call("backend_ops_count") == {"vllm": 1}
    finally:
        for client in (worker, router, admin):
            await client.nc.close()
