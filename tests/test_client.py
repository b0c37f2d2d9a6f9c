"""The Python client (registryd.Registry) against a real daemon: every method."""

from __future__ import annotations

import asyncio
import json
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from daemon import embedded
from daemon.app import Daemon
from registryd import (
    AuthRefs,
    BadRequest,
    Conflict,
    Internal,
    Node,
    NodeWithExtras,
    NoResponders,
    NotFound,
    Registry,
    RegistryError,
    ReplicaName,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from registryd.errors import from_reply
from subjects import OPERATIONS
from tests.conftest import through
from tests.support import Proxy, connect, eventually

GiB = 2**30

# Operations whose method is not named as the operation (list operations
# also have `<op>_page`; see test_every_operation_has_a_method).
METHOD_OF = {"list": "list_page", "self": "own_node"}
LISTS = {"list": "nodes"}


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def registry(daemon: Daemon, nc: NATS) -> Registry:
    return Registry(nc, daemon.settings.subject_prefix)


async def healthy(registry: Registry, name: str, **fields: object) -> Node:
    node = await registry.register(name, address=f"{name}:50051", **fields)  # type: ignore[arg-type]
    return await registry.approve(node.id)


def test_every_operation_has_a_method() -> None:
    for op in OPERATIONS:
        method = METHOD_OF.get(op.name, op.name)
        assert callable(getattr(Registry, method, None)), f"no Registry.{method} for {op.name}"
        if issubclass(op.model, _paged()):
            assert callable(getattr(Registry, f"{op.name}_page", None)), op.name
            assert callable(getattr(Registry, LISTS.get(op.name, op.name), None)), op.name


def _paged() -> type:
    from subjects.base import Paged

    return Paged


async def test_nodes(registry: Registry) -> None:
    node = await registry.register(
        "gpu-1",
        address="10.0.0.5:50051",
        http_address="10.0.0.5:8080",
        total_vram=24 * GiB,
        available_vram=20 * GiB,
        total_ram=64 * GiB,
        available_ram=60 * GiB,
        gpu_vendor="nvidia",
        max_replicas_per_model=2,
        labels={"zone": "eu-1"},
    )
    assert isinstance(node, Node) and node.status == "pending" and node.auth_refs is None
    assert node.total_vram == 24 * GiB and node.max_replicas_per_model == 2
    approved = await registry.approve(node.id)
    assert approved.status == "healthy"

    got = await registry.get(node.id)
    assert isinstance(got, NodeWithExtras)
    assert got.labels["zone"] == "eu-1" and got.labels["gpu.vendor"] == "nvidia"
    assert (await registry.get(name="gpu-1")).id == node.id

    await registry.heartbeat(node.id, available_vram=10 * GiB, wait=True)
    assert (await registry.get(node.id)).available_vram == 10 * GiB
    await registry.heartbeat(node.id, available_vram=11 * GiB)  # published

    async def published() -> bool | None:
        return (await registry.get(node.id)).available_vram == 11 * GiB or None

    await eventually(published, "the published heartbeat")
    with pytest.raises(NotFound):
        await registry.heartbeat("no-such-node", available_vram=1, wait=True)

    await registry.auth_refs(node.id, auth_user_id="u-1", api_key_id="k-1")
    again = await registry.register("gpu-1")
    assert again.auth_refs == AuthRefs(auth_user_id="u-1", api_key_id="k-1")
    assert again.status == "healthy"

    assert (await registry.max_replicas(node.id, 4)).max_replicas_per_model == 4
    reset = await registry.max_replicas_reset(node.id)
    assert not reset.max_replicas_per_model_manually_set

    for status, change in (
        ("unhealthy", registry.unhealthy),
        ("healthy", registry.healthy),
        ("draining", registry.drain),
        ("offline", registry.offline),
    ):
        await change(node.id)
        assert (await registry.get(node.id)).status == status

    assert await registry.deregister(node.id) == AuthRefs(auth_user_id="u-1", api_key_id="k-1")
    with pytest.raises(NotFound) as err:
        await registry.get(node.id)
    assert err.value.code == 404 and node.id in err.value.message
    # As a traceback shows it: by the name the caller imported.
    (shown,) = traceback.format_exception_only(err.value)
    assert shown.startswith("registryd.NotFound: 404 not_found: ")


async def test_node_keys_and_a_workers_own_subjects(registry: Registry) -> None:
    key = "k" * 32
    node = await registry.register("gpu-1", address="a:1", node_key=key)
    with pytest.raises(Unauthorized):
        await registry.register("gpu-1", address="b:1", node_key="x" * 32)
    own = await registry.own_node(node.id)
    assert isinstance(own, NodeWithExtras) and own.name == "gpu-1" and own.replicas == ()
    await registry.replica_set(node.id, "m", 1, state="loading")
    await registry.replica_set(node.id, "m", 0, state="loaded")
    own = await registry.own_node(node.id)
    assert own.replicas == (
        ReplicaName(model_name="m", replica_index=0, state="loaded"),
        ReplicaName(model_name="m", replica_index=1, state="loading"),
    )
    assert own.model_count == 1
    await registry.approve(node.id)
    await registry.offline_self(node.id)
    assert (await registry.get(node.id)).status == "offline"
    with pytest.raises(NotFound):
        await registry.own_node("no-such-node")

    await registry.node_key_reset(node.id)  # the admin unbinds the key
    assert (await registry.register("gpu-1", node_key="x" * 32)).status == "healthy"


async def test_a_workers_own_node_names_its_first_thousand_replicas(
    registry: Registry, pg: asyncpg.Connection
) -> None:
    node = await registry.register("gpu-1", address="a:1")
    names = ["a-x", "B-x", "é", *(f"m-{i:04d}" for i in range(1000))]
    await pg.execute(
        "INSERT INTO replicas (node_id, model_name, replica_index, state)"
        " SELECT $1, m, 0, 'loaded' FROM unnest($2::text[]) AS m",
        node.id,
        names,
    )
    own = await registry.own_node(node.id)
    # In the order a client's own sort gives (bytewise), whatever the
    # database's collation: "B-x" before "a-x", "é" past every "m-".
    assert [r.model_name for r in own.replicas or ()] == sorted(names)[:1000]
    assert own.model_count == 1003


async def test_lists_page_invisibly(registry: Registry) -> None:
    names = [f"n{i}" for i in range(5)]
    for name in names:
        await healthy(registry, name)
    first = await registry.list_page(limit=2)
    assert [n.name for n in first.items] == ["n0", "n1"] and first.next is not None
    second = await registry.list_page(limit=2, after=first.next)
    assert [n.name for n in second.items] == ["n2", "n3"]
    assert [n.name for n in (await registry.list_page()).items] == names
    assert [n.name async for n in registry.nodes(page_size=2)] == names
    extras = [n async for n in registry.nodes(extras=True, page_size=3)]
    assert all(isinstance(n, NodeWithExtras) for n in extras)
    assert extras[0].labels["node.name"] == "n0"

    # Nothing is stale yet; everything is stale against a threshold of 0.
    assert [n async for n in registry.stale(3600)] == []
    assert [n.name async for n in registry.stale(0, page_size=2)] == names
    assert len((await registry.stale_page(0, limit=4)).items) == 4


async def test_placement(registry: Registry) -> None:
    a = await healthy(registry, "a", total_vram=24 * GiB, available_vram=24 * GiB)
    b = await healthy(registry, "b", total_vram=8 * GiB, available_vram=8 * GiB)
    await registry.label_set(b.id, "tier", "small")
    await registry.replica_set(a.id, "m", state="loaded")

    assert (await registry.find_vram(16 * GiB)).id == a.id
    assert (await registry.find_vram(node_ids=[b.id])).id == b.id
    assert (await registry.find_idle()).id == b.id
    assert (await registry.find_least_loaded(node_ids=[a.id])).id == a.id
    with pytest.raises(NotFound):
        await registry.find_vram(100 * GiB)

    assert [n.id async for n in registry.find_selector({"tier": "small"})] == [b.id]
    page = await registry.find_selector_page({}, limit=1)
    assert [n.name for n in page.items] == ["a"] and page.next
    assert [n.name async for n in registry.free_slots("m", page_size=1)] == ["b"]
    assert [n.name for n in (await registry.free_slots_page("m", node_ids=[a.id])).items] == []
    assert await registry.capacity("m") == 1
    assert await registry.capacity("m", node_ids=[a.id]) == 0

    await registry.reserve_vram(b.id, 6 * GiB)
    with pytest.raises(Conflict):
        await registry.reserve_vram(b.id, 6 * GiB)
    await registry.release_vram(b.id, 6 * GiB)
    await registry.reserve_vram(b.id, 6 * GiB)


async def test_replicas_and_models(registry: Registry, pg: asyncpg.Connection) -> None:
    a = await healthy(registry, "a")
    b = await healthy(registry, "b")
    r0 = await registry.replica_set(a.id, "m", state="loaded", address="a:9000")
    assert (r0.node_id, r0.model_name, r0.replica_index, r0.state) == (a.id, "m", 0, "loaded")
    await registry.replica_set(a.id, "m", 1, state="loaded", in_flight=2)
    await registry.replica_set(b.id, "m", state="loaded")
    await registry.replica_set(b.id, "other", state="loading")
    assert (await registry.replica_get(a.id, "m", 1)).in_flight == 2

    await registry.replica_touch(a.id, "m")
    await registry.replica_load_info(a.id, "m", backend_type="llama-cpp", model_opts=b"\x00opts")
    assert (
        await pg.fetchval(
            "SELECT model_opts FROM replicas WHERE node_id = $1 AND replica_index = 0", a.id
        )
        == b"\x00opts"
    )
    assert await registry.replica_count(a.id, "m") == 2
    assert await registry.replica_next_index(a.id, "m", 4) == 2
    with pytest.raises(Conflict):
        await registry.replica_next_index(a.id, "m", 2)

    stats = [s async for s in registry.replica_stats("m", page_size=1)]
    assert sorted((s.node_id, s.replica_index, s.in_flight) for s in stats) == sorted(
        [(a.id, 0, 0), (a.id, 1, 2), (b.id, 0, 0)]
    )
    assert len((await registry.replica_stats_page("m", node_ids=[a.id])).items) == 2
    assert [(r.model_name, r.replica_index) async for r in registry.node_models(b.id)] == [
        ("m", 0),
        ("other", 0),
    ]
    assert len((await registry.node_models_page(a.id, limit=1)).items) == 1
    assert len([r async for r in registry.loaded_models(page_size=2)]) == 3
    assert (await registry.loaded_models_page(limit=2)).next is not None
    with_model = [n async for n in registry.nodes_with_model("m", page_size=1)]
    assert sorted(n.name for n in with_model) == ["a", "b"]
    page = await registry.nodes_with_model_page("m")
    assert sorted((n.name, n.model_in_flight) for n in page.items) == [("a", 0), ("b", 0)]

    await registry.replica_touch(b.id, "m")  # b's replica is the most recently used now
    assert (await registry.lru(a.id)).replica_index == 0
    assert (await registry.lru_global()).node_id == a.id
    assert await registry.loaded_count("m") == 3

    await registry.load_info_set("m", backend_type="vllm", model_opts=b"{}")
    info = await registry.load_info_get("m")
    assert (info.backend_type, info.model_opts) == ("vllm", b"{}")
    with pytest.raises(NotFound):
        await registry.load_info_get("nothing")

    await registry.inflight_inc(b.id, "m")
    assert (await registry.replica_get(b.id, "m")).in_flight == 1
    await registry.inflight_dec(b.id, "m")
    assert (await registry.replica_get(b.id, "m")).in_flight == 0
    with pytest.raises(NotFound):
        await registry.inflight_inc(b.id, "m", 7)

    await registry.replica_remove(a.id, "m", 1)
    assert await registry.replica_count(a.id, "m") == 1
    await registry.replica_remove_all(b.id, "m")
    assert await registry.replica_count(b.id, "m") == 0


async def test_findlock_and_leases(registry: Registry) -> None:
    a = await healthy(registry, "a")
    await registry.replica_set(a.id, "m", state="loaded")
    await registry.replica_set(a.id, "m", 1, state="loaded")

    plain = await registry.findlock("m")
    assert plain.lease_id is None and plain.node.id == a.id and plain.replica.in_flight == 1
    preferred = await registry.findlock("m", prefer=(a.id, plain.replica.replica_index))
    assert preferred.replica.replica_index == plain.replica.replica_index
    leased = await registry.findlock("m", node_ids=[a.id], lease_s=30)
    assert leased.lease_id is not None
    expires = await registry.lease_renew(leased.lease_id, 60)
    assert expires > datetime.now(UTC) + timedelta(seconds=50)
    await registry.inflight_dec(lease_id=leased.lease_id)
    with pytest.raises(NotFound):
        await registry.lease_renew(leased.lease_id, 60)
    with pytest.raises(NotFound):
        await registry.findlock("unknown-model")


async def test_each_reply_reaches_its_own_request(registry: Registry, nc: NATS) -> None:
    # Requests share one inbox subscription: 200 at once, half for nodes that
    # do not exist, each get their own answer.
    nodes = [await registry.register(f"gpu-{i}", address=f"gpu-{i}:1") for i in range(100)]
    ids = [n.id for n in nodes] + [f"missing-{i}" for i in range(100)]
    got = await asyncio.gather(*(registry.get(i) for i in ids), return_exceptions=True)
    assert [g.id for g in got[:100]] == ids[:100]  # type: ignore[union-attr]
    for g, i in zip(got[100:], ids[100:], strict=True):
        assert isinstance(g, NotFound) and i in g.message

    # A reply that comes after its request gave up is dropped; the next
    # request is answered as usual, and nothing is kept for either.
    async def late(msg: Msg) -> None:
        await asyncio.sleep(0.3)
        await msg.respond(b"{}")

    slow = await nc.subscribe("slow.get", cb=late)
    try:
        patient = Registry(nc, registry.prefix, timeout=0.1)
        patient_slow = Registry(nc, "slow", timeout=0.1)
        with pytest.raises(Timeout):
            await patient_slow.get("x")
        await asyncio.sleep(0.4)  # the late reply has arrived meanwhile
        assert (await patient.get(ids[0])).id == ids[0]
        for client in (patient, patient_slow, registry):
            assert client._replies is not None
            assert not client._replies.result()._waiting  # private: checks the bound
    finally:
        await slow.unsubscribe()
        await patient.close()
        await patient_slow.close()


async def test_explain(registry: Registry) -> None:
    a = await healthy(registry, "a", total_vram=24 * GiB, available_vram=24 * GiB)
    await healthy(registry, "b", total_vram=8 * GiB, available_vram=4 * GiB)
    await registry.register("c", address="c:1")  # never approved
    await registry.replica_set(a.id, "m", state="loaded")

    why = await registry.explain("m", min_bytes=8 * GiB, page_size=1)  # three pages
    assert (why.model, why.placeable, why.routable) == ("m", 0, 1)
    assert [n.name for n in why.nodes] == ["a", "b", "c"]
    reasons = {n.name: [r.code for r in n.reasons] for n in why.nodes}
    assert reasons["a"] == ["slots"] and reasons["b"] == ["vram"]
    assert reasons["c"][0] == "not_approved"
    assert why.summary.startswith("0/3 nodes")

    first, cursor = await registry.explain_page("m", selector={}, limit=2)
    assert len(first.nodes) == 2 and cursor is not None
    rest, cursor = await registry.explain_page("m", selector={}, limit=2, after=cursor)
    assert [n.name for n in rest.nodes] == ["c"] and cursor is None
    assert (await registry.explain("m", node_ids=[a.id])).nodes[1].reasons[0].code == "node_set"


async def in_flight(pg: asyncpg.Connection) -> int:
    return await pg.fetchval("SELECT COALESCE(sum(in_flight), 0)::int FROM replicas")


async def leases(pg: asyncpg.Connection) -> int:
    return await pg.fetchval("SELECT count(*)::int FROM leases")


async def test_routed_gives_the_unit_back_on_return_exception_and_cancellation(
    registry: Registry, pg: asyncpg.Connection
) -> None:
    a = await healthy(registry, "a")
    await registry.replica_set(a.id, "m", state="loaded")

    async with registry.routed("m", lease_s=30) as pick:
        assert pick.node.id == a.id and pick.lease_id is not None
        assert await in_flight(pg) == 1 and await leases(pg) == 1
    assert await in_flight(pg) == 0 and await leases(pg) == 0

    with pytest.raises(RuntimeError, match="inference failed"):
        async with registry.routed("m", lease_s=30):
            raise RuntimeError("inference failed")
    assert await in_flight(pg) == 0 and await leases(pg) == 0

    inside = asyncio.Event()

    async def request() -> None:
        async with registry.routed("m", lease_s=30):
            inside.set()
            await asyncio.Event().wait()  # a request that never ends by itself

    task = asyncio.create_task(request())
    await inside.wait()
    assert await in_flight(pg) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await in_flight(pg) == 0 and await leases(pg) == 0

    with pytest.raises(NotFound):
        async with registry.routed("unknown", lease_s=30):
            pytest.fail("no replica: the block must not run")


async def test_routed_renews_its_lease_while_the_block_runs(
    start_daemon: Callable[..., Awaitable[Daemon]], nc: NATS, pg: asyncpg.Connection
) -> None:
    # Expired leases are released every 0.2 s: an unrenewed 1 s lease would
    # be gone within 1.2 s.
    daemon = await start_daemon(check_interval=0.2)
    registry = Registry(nc, daemon.settings.subject_prefix)
    a = await healthy(registry, "a")
    await registry.replica_set(a.id, "m", state="loaded")
    async with registry.routed("m", lease_s=1, renew_every=0.2) as pick:
        first = await pg.fetchval("SELECT expires_at FROM leases WHERE id = $1", pick.lease_id)

        async def outlived() -> bool | None:
            # The block has run longer than the lease it started with.
            return (
                await pg.fetchval("SELECT now() > $1::timestamptz + interval '0.5 s'", first)
                or None
            )

        await eventually(outlived, "the block to outlive its first lease", within=10)
        assert await leases(pg) == 1 and await in_flight(pg) == 1
    assert await leases(pg) == 0 and await in_flight(pg) == 0


async def test_labels(registry: Registry) -> None:
    a = await healthy(registry, "a")
    b = await healthy(registry, "b")
    await registry.label_set(a.id, "zone", "eu")
    await registry.labels_set(b.id, {"zone": "us", "tier": "big"})
    await registry.label_remove(b.id, "tier")
    assert (await registry.labels_get(b.id)) == {"zone": "us"}
    everything = dict([item async for item in registry.labels_all(page_size=1)])
    assert everything[a.id]["zone"] == "eu" and everything[b.id] == {"zone": "us"}
    page = await registry.labels_all_page(limit=1)
    assert len(page.items) == 1 and page.next is not None
    with pytest.raises(NotFound):
        await registry.labels_get("nope")


async def test_scheduling(registry: Registry) -> None:
    config = await registry.scheduling_set(
        "m", node_selector={"zone": "eu"}, min_replicas=1, max_replicas=3
    )
    assert config.selector == {"zone": "eu"} and config.max_replicas == 3
    await registry.scheduling_set("n")
    assert (await registry.scheduling_get("m")).min_replicas == 1
    assert [c.model_name async for c in registry.scheduling_list(page_size=1)] == ["m", "n"]
    assert [c.model_name async for c in registry.scheduling_list(autoscaling=True)] == ["m"]
    assert len((await registry.scheduling_list_page(limit=1)).items) == 1

    assert await registry.unsatisfiable_bump("m") == 1
    until = datetime.now(UTC) + timedelta(hours=1)
    await registry.unsatisfiable_mark("m", until)
    marked = await registry.scheduling_get("m")
    assert marked.unsatisfiable_until is not None
    assert abs((marked.unsatisfiable_until - until).total_seconds()) < 0.001
    await registry.unsatisfiable_clear("m")
    assert (await registry.scheduling_get("m")).unsatisfiable_until is None
    await registry.unsatisfiable_clear()
    with pytest.raises(ValueError, match="timezone"):
        await registry.unsatisfiable_mark("m", datetime(2030, 1, 1))

    await registry.scheduling_delete("n")
    with pytest.raises(NotFound):
        await registry.scheduling_get("n")


async def test_backend_intents(registry: Registry) -> None:
    node = await registry.register("gpu-1", address="gpu-1:50051")  # pending: nothing goes out
    intent = await registry.backend_op(node.id, "llama-cpp", "install", galleries="[]")
    assert (intent.node_id, intent.backend, intent.op, intent.dead) == (
        node.id,
        "llama-cpp",
        "install",
        False,
    )
    await registry.backend_op(node.id, "vllm", "delete")
    assert [i.backend async for i in registry.backend_ops(page_size=1)] == ["llama-cpp", "vllm"]
    assert len((await registry.backend_ops_page(dead=True, limit=1)).items) == 1
    assert await registry.backend_ops_count() == {"llama-cpp": 1, "vllm": 1}
    await registry.backend_op_cancel(intent.id)
    assert [i.backend async for i in registry.backend_ops()] == ["vllm"]
    with pytest.raises(NotFound):
        await registry.backend_op_cancel(intent.id)


async def test_each_error_code_has_its_class(
    start_daemon: Callable[..., Awaitable[Daemon]],
    nc: NATS,
    database_url: str,
    proxy: Proxy,
) -> None:
    daemon = await start_daemon(
        registration_token="s3cret",
        max_payload=4096,
        database_url=through(database_url, proxy.port),
        db_timeout=1.0,
    )
    registry = Registry(nc, daemon.settings.subject_prefix, timeout=5)
    node = await registry.register("gpu-1", address="a:1", token="s3cret")

    cases: list[tuple[type[RegistryError], int, Callable[[], Awaitable[object]]]] = [
        (BadRequest, 400, lambda: registry.register("", address="a:1", token="s3cret")),
        (Unauthorized, 401, lambda: registry.register("gpu-2", address="a:1", token="wrong")),
        (NotFound, 404, lambda: registry.get("missing")),
        (Conflict, 409, lambda: registry.healthy(node.id)),  # never approved
        (
            TooLarge,
            413,
            lambda: registry.labels_set(node.id, {f"k{i}": "v" * 200 for i in range(30)}),
        ),
    ]
    for cls, code, call in cases:
        with pytest.raises(cls) as err:
            await call()
        assert err.value.code == code and err.value.message, err.value
        assert isinstance(err.value, RegistryError)
        assert str(code) in str(err.value)

    proxy.cut()  # the database goes away: 503 within db_timeout
    with pytest.raises(Unavailable) as unavailable:
        await registry.get(node.id)
    assert unavailable.value.code == 503 and type(unavailable.value) is Unavailable
    proxy.restore()

    # No daemon on a subject, and one that never answers, are Unavailable too.
    with pytest.raises(NoResponders):
        await Registry(nc, "nobody-serves-this").get("x")
    silent = await nc.subscribe("silent.get")  # takes requests, answers none
    try:
        with pytest.raises(Timeout):
            await Registry(nc, "silent", timeout=0.2).get("x")
    finally:
        await silent.unsubscribe()


async def test_routed_gives_the_unit_back_through_a_short_outage(
    start_daemon: Callable[..., Awaitable[Daemon]],
    nc: NATS,
    database_url: str,
    proxy: Proxy,
) -> None:
    daemon = await start_daemon(database_url=through(database_url, proxy.port), db_timeout=0.5)
    registry = Registry(nc, daemon.settings.subject_prefix, timeout=5)
    node = await healthy(registry, "gpu-1")
    await registry.replica_set(node.id, "m", 0, state="loaded", address="a:2")
    async with registry.routed("m", lease_s=60) as pick:
        assert pick.replica.in_flight == 1
        # The database goes as the block ends, for a second: the release gets
        # 503s, and the end of the block waits while it is tried again.
        proxy.cut()
        asyncio.get_running_loop().call_later(1.0, proxy.restore)

    async def given_back() -> bool | None:
        try:
            return (await registry.replica_get(node.id, "m", 0)).in_flight == 0 or None
        except Unavailable:
            return None  # the daemon's pool is still coming back

    # Long before the lease's 60 s: the release went through.
    await eventually(given_back, "the unit to be given back", within=5)


def test_a_500_reply_is_internal_and_an_unknown_code_a_registry_error() -> None:
    body = b'{"error": {"code": 500, "status": "internal", "message": "request 1f2e failed"}}'
    err = from_reply({"Nats-Service-Error-Code": "500", "Nats-Service-Error": "x"}, body)
    assert type(err) is Internal and err.message == "request 1f2e failed" and err.code == 500
    other = from_reply({"Nats-Service-Error-Code": "418", "Nats-Service-Error": "teapot"}, b"")
    assert type(other) is RegistryError and other.code == 418 and other.message == "teapot"


async def test_connect_with_the_daemons_own_settings(daemon: Daemon) -> None:
    registry = await Registry.connect(daemon.settings)
    async with registry:
        assert registry.prefix == daemon.settings.subject_prefix
        node = await registry.register("gpu-1", address="a:1")
        assert (await registry.get(name="gpu-1")).id == node.id
    assert registry.nc.is_closed


async def test_connect_finds_a_daemon_started_with_embedded_from_here(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What `registryd --embedded` leaves in its state directory: the URL of its
    # NATS (not on 4222 when that port was taken) and its pid, which runs. The
    # URL names the host differently from the default, which might be the
    # same server: only the state file can have told the client.
    url = (
        urlsplit(daemon.settings.nats_url)
        ._replace(netloc=f"localhost:{urlsplit(daemon.settings.nats_url).port}")
        .geturl()
    )
    (tmp_path / embedded.STATE_FILE).write_text(json.dumps({"nats_url": url, "pid": os.getpid()}))
    monkeypatch.delenv("REGISTRY_NATS_URL", raising=False)
    monkeypatch.setenv("REGISTRY_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("REGISTRY_SUBJECT_PREFIX", daemon.settings.subject_prefix)
    async with await Registry.connect() as registry:
        assert registry.nc.connected_url is not None
        assert registry.nc.connected_url.netloc == urlsplit(url).netloc
        await registry.register("gpu-1", address="a:1")
        assert [n.name async for n in registry.nodes()] == ["gpu-1"]


async def test_connect_reads_the_environment(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_NATS_URL", daemon.settings.nats_url)
    monkeypatch.setenv("REGISTRY_SUBJECT_PREFIX", daemon.settings.subject_prefix)
    async with await Registry.connect() as registry:
        await registry.register("gpu-1", address="a:1")
        assert [n.name async for n in registry.nodes()] == ["gpu-1"]
