"""The roles of systemd/nats-server.conf, enforced by a real nats-server.

A worker may register and heartbeat but not approve, deregister or drain; a
router may pick replicas but not approve; an admin may do anything.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeout

from daemon import embedded
from tests.support import CallError, Client, Registryd, eventually

CONF = Path(__file__).resolve().parent.parent / "systemd" / "nats-server.conf"
PASSWORDS = {
    "registryd": "change-me-registryd",
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


async def test_each_role_may_do_what_it_needs_and_no_more(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    roles_nats: embedded.NatsServer,
) -> None:
    env = daemon_env | {
        "REGISTRY_NATS_URL": roles_nats.url,
        "REGISTRY_NATS_USER": "registryd",
        "REGISTRY_NATS_PASSWORD": PASSWORDS["registryd"],
        "REGISTRY_SUBJECT_PREFIX": "registry",
    }
    await spawn(env=env)
    worker = await as_user(roles_nats, "worker")
    router = await as_user(roles_nats, "router")
    admin = await as_user(roles_nats, "admin")
    try:

        async def serving() -> bool | None:
            try:
                return await admin.call("list", limit=1) is not None or None
            except (CallError, NatsTimeout, nats.errors.NoRespondersError):
                return None

        await eventually(serving, "the daemon to serve")
        node = await worker.register("gpu-1")
        assert node["status"] == "pending"
        await worker.publish(f"heartbeat.{node['id']}", {"available_vram": 5})
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
