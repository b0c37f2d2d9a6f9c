"""A worker acts only as itself (v1.2, Kubernetes' NodeRestriction as the model).

Two holes of v1, each closed here: any worker with the shared registration
token could re-register an approved node's name with its own address (and get
its users' prompts), and could mark any node offline. A `node_key` binds a
name to its first worker; per-node subjects let NATS confine a worker's user
to its own node id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import nats
import pytest
from nats.errors import TimeoutError as NatsTimeout

from daemon import embedded
from daemon.app import Daemon
from tests.support import Client, Registryd, fails, serving

KEY_A = "a" * 32
KEY_B = "b" * 32


async def test_a_keyed_name_cannot_be_taken_over(
    client: Client, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registryd")
    node = await client.healthy_node("gpu-1", address="10.0.0.1:50051", node_key=KEY_A)
    await client.replica(node, "m")
    # An impostor holding the registration token, but not the key.
    for key in (None, KEY_B):
        fields = {"node_key": key} if key else {}
        err = await fails(
            client.register("gpu-1", address="10.6.6.6:50051", **fields), 401, "gpu-1"
        )
        assert KEY_A not in err.message and KEY_B not in err.message
    row = await pg.fetchrow("SELECT address, status FROM nodes WHERE id = $1", node["id"])
    assert (row["address"], row["status"]) == ("10.0.0.1:50051", "healthy")
    picked = await client.call("findlock", model="m")
    assert picked["node"]["address"] == "10.0.0.1:50051"
    refused = [r.getMessage() for r in caplog.records if "node key" in r.getMessage()]
    assert refused and "gpu-1" in refused[0] and "10.6.6.6:50051" in refused[0]
    assert "inbox" in refused[0]
    # The worker itself, with its key, re-registers as always.
    again = await client.register("gpu-1", address="10.0.0.2:50051", node_key=KEY_A)
    assert again["id"] == node["id"] and again["status"] == "healthy"


async def test_the_key_is_never_returned(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1", node_key=KEY_A)
    replies = [
        node,
        await client.register("gpu-1", node_key=KEY_A),
        await client.call("get", node_id=node["id"]),
        await client.call("list", extras=True),
        await client.call(f"self.{node['id']}"),
    ]
    for reply in replies:
        assert KEY_A not in str(reply) and "node_key" not in str(reply)
    stored = await pg.fetchval("SELECT node_key_hash FROM nodes WHERE id = $1", node["id"])
    assert stored and KEY_A not in stored


async def test_a_name_without_a_key_keeps_v1_behaviour(client: Client) -> None:
    node = await client.healthy_node("gpu-1", address="10.0.0.1:50051")
    again = await client.register("gpu-1", address="10.0.0.9:50051")
    assert again["address"] == "10.0.0.9:50051"
    # The first registration that carries a key binds it.
    await client.register("gpu-1", address="10.0.0.9:50051", node_key=KEY_A)
    await fails(client.register("gpu-1", address="10.6.6.6:50051"), 401)
    assert (await client.call("get", node_id=node["id"]))["address"] == "10.0.0.9:50051"


async def test_only_deregistration_or_an_admin_reset_unbinds_a_key(client: Client) -> None:
    node = await client.healthy_node("gpu-1", node_key=KEY_A)
    await client.call("offline", node_id=node["id"])
    await fails(client.register("gpu-1", node_key=KEY_B), 401)
    assert await client.call("node_key_reset", node_id=node["id"]) == {}
    assert (await client.register("gpu-1", node_key=KEY_B))["status"] == "healthy"
    await fails(client.register("gpu-1", node_key=KEY_A), 401)
    await client.call("deregister", node_id=node["id"])
    assert (await client.register("gpu-1", node_key=KEY_A))["status"] == "pending"
    await fails(client.call("node_key_reset", node_id="ghost"), 404, "ghost")


@pytest.mark.parametrize("key", ["short", "k" * 257])
async def test_a_node_key_of_the_wrong_length_is_a_400(client: Client, key: str) -> None:
    await fails(client.register("gpu-1", node_key=key), 400, "'node_key'")


async def test_per_node_subjects_act_on_the_node_they_name(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    assert (await client.call(f"self.{a['id']}"))["name"] == "gpu-a"
    # A body may repeat the subject's node id, never name another.
    await fails(client.call(f"offline.{a['id']}", node_id=b["id"]), 400, "'node_id'")
    assert (await client.call("get", node_id=b["id"]))["status"] == "healthy"
    assert await client.call(f"offline.{a['id']}", node_id=a["id"]) == {}
    assert await client.call(f"offline.{b['id']}") == {}
    statuses = {n["name"]: n["status"] for n in await client.call("list")}
    assert statuses == {"gpu-a": "offline", "gpu-b": "offline"}
    await fails(client.call("self.ghost"), 404, "ghost")
    await fails(client.call("offline.ghost"), 404, "ghost")


async def test_a_worker_records_its_own_replicas_on_its_own_subject(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    own = f"replica_set.{a['id']}"
    replica = await client.call(own, model="m", state="loaded", address="a:8000")
    assert replica["node_id"] == a["id"]
    assert (replica["state"], replica["address"]) == ("loaded", "a:8000")
    # Never another node's, whatever the body says.
    await fails(client.call(own, node_id=b["id"], model="m", state="loaded"), 400, "'node_id'")
    await fails(client.call(own, model="m"), 400, "'state'")
    await fails(client.call("replica_set.ghost", model="m", state="loaded"), 404, "node")
    # Recording what it serves again keeps the routers' count of requests in flight.
    await client.call("findlock", model="m")
    await client.call(own, model="m", state="loaded", address="a:8001", in_flight=0)
    row = await client.call("replica_get", node_id=a["id"], model="m")
    assert (row["in_flight"], row["address"]) == (1, "a:8001")
    assert await client.call("node_models", node_id=b["id"]) == []


async def test_a_workers_own_replica_subject_against_callers_we_do_not_control(
    client: Client,
) -> None:
    a = await client.healthy_node("gpu-a")
    own = f"replica_set.{a['id']}"
    # The same record 30 times at once: one row, every request answered.
    replies = await asyncio.gather(
        *(client.call(own, model="m", state="loaded", address="a:1") for _ in range(30))
    )
    assert {r["id"] for r in replies} == {replies[0]["id"]}
    assert len(await client.call("node_models", node_id=a["id"])) == 1
    # Go's nil and zero values: null fields are left out, the record still made.
    got = await client.call(
        own,
        {"node_id": None, "model": "m2", "replica_index": None, "state": "loaded", "address": None},
    )
    assert (got["node_id"], got["replica_index"], got["address"]) == (a["id"], 0, "")


async def test_srv_info_lists_the_new_endpoints(client: Client, daemon: Daemon) -> None:
    assert daemon.service is not None
    import orjson

    reply = await client.nc.request(f"$SRV.INFO.registry.{daemon.service.id}", b"", timeout=5)
    subjects = {e["name"]: e["subject"] for e in orjson.loads(reply.data)["endpoints"]}
    assert subjects["offline_self"] == f"{client.prefix}.offline.*"
    assert subjects["self"] == f"{client.prefix}.self.*"
    assert subjects["replica_set_self"] == f"{client.prefix}.replica_set.*"
    assert subjects["replica_set"] == f"{client.prefix}.replica_set"
    assert subjects["offline"] == f"{client.prefix}.offline"
    assert subjects["node_key_reset"] == f"{client.prefix}.node_key_reset"


# ---------------------------------------------------------------- with NATS users per worker


def per_worker_conf() -> str:
    """The example's per-worker user, for node ids node-a and node-b."""

    def worker(user: str, node_id: str) -> str:
        own = ", ".join(
            f'"registry.{verb}.{node_id}"'
            for verb in ("heartbeat", "offline", "self", "replica_set")
        )
        return f"""{{ user: {user}, password: "{user}-pw", permissions: {{
            publish: ["registry.register", {own}]
            subscribe: ["_INBOX.>", "nodes.{node_id}.>"]
            allow_responses: true }} }}"""

    return f"""
    authorization {{ users: [
        {{ user: registryd, password: "d" }}
        {{ user: admin, password: "admin" }}
        {worker("gpu-a", "node-a")}
        {worker("gpu-b", "node-b")}
    ] }}
    """


# Slow: a nats-server of its own and a registryd process.
@pytest.mark.slow
async def test_a_worker_user_can_act_only_on_its_own_node(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_with: Callable[[str], embedded.NatsServer],
    pg: asyncpg.Connection,
) -> None:
    server = nats_with(per_worker_conf())
    env = daemon_env | {
        "REGISTRY_NATS_URL": server.url,
        "REGISTRY_NATS_USER": "registryd",
        "REGISTRY_NATS_PASSWORD": "d",
        "REGISTRY_SUBJECT_PREFIX": "registry",
    }
    # Per-worker users name node ids, so these nodes exist before their users
    # connect (in production: the worker registers, then gets its own user).
    await pg.execute(
        """INSERT INTO nodes (id, name, address, status, approved) VALUES
           ('node-a', 'gpu-a', 'a:1', 'healthy', true),
           ('node-b', 'gpu-b', 'b:1', 'healthy', true)"""
    )
    await spawn(env=env)

    async def user(name: str, password: str) -> Client:
        async def quiet(_: Exception) -> None:
            pass

        nc = await nats.connect(server.url, user=name, password=password, error_cb=quiet)
        return Client(nc, "registry", timeout=2)

    admin, a, b = (
        await user("admin", "admin"),
        await user("gpu-a", "gpu-a-pw"),
        await user("gpu-b", "gpu-b-pw"),
    )
    try:
        await serving(admin)
        assert (await a.register("gpu-a", node_key=KEY_A))["id"] == "node-a"
        assert (await b.register("gpu-b", node_key=KEY_B))["id"] == "node-b"

        # A cannot touch B: NATS refuses each request before the daemon sees it.
        for subject in ("offline.node-b", "self.node-b", "offline", "replica_set.node-b"):
            with pytest.raises(NatsTimeout):
                await a.call(subject, node_id="node-b", model="m", state="loaded")
        with pytest.raises(NatsTimeout):
            await a.call("replica_set", node_id="node-b", model="m", state="loaded")
        await a.nc.publish("registry.heartbeat.node-b", b'{"available_vram": 4242}')
        # ...nor take B's name with the shared registration path.
        await fails(a.register("gpu-b", address="a:1"), 401, "gpu-b")
        await fails(a.register("gpu-b", address="a:1", node_key=KEY_A), 401, "gpu-b")

        # A can do all of that for itself (its heartbeat answered after the
        # one it published for B, which therefore never arrived).
        assert await a.call("heartbeat.node-a", available_vram=7) == {}
        assert (await a.call("self.node-a"))["available_vram"] == 7
        await a.call("replica_set.node-a", model="m", state="loaded", address="a:8000")
        assert (await a.call("self.node-a"))["model_count"] == 1
        assert await admin.call("node_models", node_id="node-b") == []
        b_row = await pg.fetchrow(
            "SELECT status, address, available_vram FROM nodes WHERE id = 'node-b'"
        )
        assert tuple(b_row) == ("healthy", "gpu-b.local:50051", 0)
        assert await a.call("offline.node-a") == {}
        assert (await admin.call("get", node_id="node-a"))["status"] == "offline"
    finally:
        for c in (admin, a, b):
            await c.nc.close()


@pytest.mark.parametrize(
    ("edit", "fields"),
    [
        ("node_key_reset", {}),
        ("auth_refs", {"auth_user_id": "u-1", "api_key_id": "k-1"}),
        ("max_replicas", {"max_replicas_per_model": 3}),
    ],
)
async def test_an_admin_edit_is_not_a_status_change_for_the_sweep(
    client: Client, daemon: Daemon, pg: asyncpg.Connection, edit: str, fields: dict
) -> None:
    # Found by the long model-based run for node_key_reset: offline, a
    # heartbeat since, then an admin's edit; the sweep must still revive the
    # node on that heartbeat, not wait for the next one.
    node = await client.healthy_node("gpu-b", node_key=KEY_B)
    await client.call("offline", node_id=node["id"])
    await pg.execute("UPDATE nodes SET status_since = now() - interval '1 minute'")
    assert await client.call(f"heartbeat.{node['id']}") == {}
    await client.call(edit, node_id=node["id"], **fields)
    assert daemon.sweep is not None
    await daemon.sweep.sweep_nodes()
    assert (await client.call("get", node_id=node["id"]))["status"] == "healthy"
