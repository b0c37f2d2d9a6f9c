"""Explained placement (contract v1.2): `registry.explain`, the model event an
unsatisfiable mark publishes, and `registryd why`."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.app import Daemon
from tests.conftest import REGISTRYD
from tests.support import CallError, Client, connect, every_page, fails, parse

GiB = 1 << 30
MODEL = "qwen3-8b"


def reasons(reply: dict[str, Any]) -> dict[str, list[str]]:
    return {n["name"]: [r["code"] for r in n["reasons"]] for n in reply["nodes"]}


def messages(reply: dict[str, Any], name: str) -> list[str]:
    node = next(n for n in reply["nodes"] if n["name"] == name)
    return [r["message"] for r in node["reasons"]]


async def one_node_per_reason(client: Client) -> dict[str, dict[str, Any]]:
    """Two placeable nodes, one node kept out by each reason code alone, and one
    kept out by three; labels zone=eu and 16 GiB free unless a reason says not."""
    eu = {"zone": "eu"}
    nodes = {
        "a-ok": await client.healthy_node(
            "a-ok", labels=eu, available_vram=16 * GiB, max_replicas_per_model=2
        ),
        "b-ok": await client.healthy_node(
            "b-ok", labels=eu, available_vram=24 * GiB, max_replicas_per_model=2
        ),
        "c-pending": await client.register("c-pending", labels=eu, available_vram=16 * GiB),
        "d-draining": await client.healthy_node("d-draining", labels=eu, available_vram=16 * GiB),
        "e-agent": await client.healthy_node(
            "e-agent", node_type="agent", labels=eu, available_vram=16 * GiB
        ),
        "f-outside": await client.healthy_node(
            "f-outside", labels=eu, available_vram=16 * GiB, max_replicas_per_model=2
        ),
        "g-selector": await client.healthy_node(
            "g-selector", labels={"zone": "us"}, available_vram=16 * GiB
        ),
        "h-vram": await client.healthy_node("h-vram", labels=eu, available_vram=8 * GiB),
        "i-slots": await client.healthy_node("i-slots", labels=eu, available_vram=16 * GiB),
        "j-many": await client.healthy_node("j-many", available_vram=4 * GiB),
    }
    assert nodes["c-pending"]["status"] == "pending"
    await client.call("drain", node_id=nodes["d-draining"]["id"])
    await client.call("unhealthy", node_id=nodes["j-many"]["id"])
    await client.call("reserve_vram", node_id=nodes["h-vram"]["id"], bytes=2 * GiB)
    await client.replica(nodes["a-ok"], MODEL)  # loaded: routable
    await client.replica(nodes["b-ok"], MODEL, state="loading")  # counts against the cap only
    await client.replica(nodes["f-outside"], MODEL)  # loaded, outside node_ids
    await client.replica(nodes["i-slots"], MODEL)  # loaded, its only slot
    await client.replica(nodes["g-selector"], "another-model")
    return nodes


async def test_each_reason_code_with_its_message_counts_and_summary(client: Client) -> None:
    nodes = await one_node_per_reason(client)
    node_ids = [n["id"] for name, n in nodes.items() if name != "f-outside"]
    reply = await client.call(
        "explain", model=MODEL, min_bytes=8 * GiB, selector={"zone": "eu"}, node_ids=node_ids
    )
    assert list(reply) == [
        "model",
        "placeable",
        "routable",
        "summary",
        "nodes",
        "unsatisfiable_until",
        "unsatisfiable_ticks",
    ]
    assert reasons(reply) == {
        "a-ok": [],
        "b-ok": [],
        "c-pending": ["not_approved", "status"],
        "d-draining": ["status"],
        "e-agent": ["node_type"],
        "f-outside": ["node_set"],
        "g-selector": ["selector"],
        "h-vram": ["vram"],
        "i-slots": ["slots"],
        "j-many": ["status", "selector", "vram"],
    }
    assert [n["name"] for n in reply["nodes"]] == sorted(nodes)  # by name
    for node in reply["nodes"]:
        assert node["node_id"] == nodes[node["name"]]["id"]
        assert node["placeable"] == (not node["reasons"])
    statuses = {n["name"]: n["status"] for n in reply["nodes"]}
    assert statuses["c-pending"] == "pending" and statuses["d-draining"] == "draining"
    assert (reply["placeable"], reply["routable"]) == (2, 2)  # a-ok's and i-slots' replicas
    assert reply["summary"] == (
        "2/10 nodes can take a replica of qwen3-8b: 1 not approved, 1 unhealthy, "
        "1 draining, 1 agent node, 1 outside node_ids, 1 not matching the selector, "
        "1 below 8.0 GiB effectively free, 1 at its replica cap"
    )
    assert (reply["unsatisfiable_until"], reply["unsatisfiable_ticks"]) == (None, 0)
    assert messages(reply, "c-pending") == [
        "never approved (registry.approve)",
        "pending, not healthy",
    ]
    assert messages(reply, "e-agent") == ["an agent node: only backend nodes take replicas"]
    assert messages(reply, "f-outside") == ["not in node_ids"]
    assert messages(reply, "g-selector") == ["label zone=us, wants zone=eu"]
    assert messages(reply, "h-vram") == [
        "6.0 GiB effectively free (8.0 GiB free, 2.0 GiB reserved) < 8.0 GiB"
    ]
    assert messages(reply, "i-slots") == ["1 of 1 replica slots for qwen3-8b in use"]
    assert messages(reply, "j-many") == [
        "unhealthy, not healthy",
        "no label zone, wants zone=eu",
        "4.0 GiB effectively free (4.0 GiB free, 0.0 GiB reserved) < 8.0 GiB",
    ]

    # Every node: f-outside is placeable and its replica routable.
    everywhere = await client.call(
        "explain", model=MODEL, min_bytes=8 * GiB, selector={"zone": "eu"}
    )
    assert (everywhere["placeable"], everywhere["routable"]) == (3, 3)
    assert everywhere["summary"].startswith("3/10 nodes can take a replica of qwen3-8b: ")
    # Several nodes with one first reason are counted together.
    loose = await client.call("explain", model=MODEL, min_bytes=20 * GiB)
    assert loose["summary"] == (
        "1/10 nodes can take a replica of qwen3-8b: 1 not approved, 1 unhealthy, "
        "1 draining, 1 agent node, 5 below 20.0 GiB effectively free"
    )
    assert reasons(loose)["i-slots"] == ["vram", "slots"]


async def test_every_node_placeable_and_an_empty_cluster(client: Client) -> None:
    assert await client.call("explain", model="m") == {
        "model": "m",
        "placeable": 0,
        "routable": 0,
        "summary": "0/0 nodes can take a replica of m",
        "nodes": [],
        "unsatisfiable_until": None,
        "unsatisfiable_ticks": 0,
    }
    await client.healthy_node("one")
    await client.healthy_node("two")
    reply = await client.call("explain", model="m")
    assert reply["summary"] == "2/2 nodes can take a replica of m"
    assert reasons(reply) == {"one": [], "two": []}


async def test_the_selector_defaults_to_the_models_config(client: Client) -> None:
    await client.healthy_node("eu-1", labels={"zone": "eu", "tier": "a100"})
    await client.healthy_node("us-1", labels={"zone": "us"})
    await client.call("scheduling_set", model_name=MODEL, node_selector={"zone": "eu"})
    await client.call("unsatisfiable_bump", model=MODEL)
    await client.call("unsatisfiable_mark", model=MODEL, until="2030-01-02T03:04:05Z")

    default = await client.call("explain", model=MODEL)
    assert reasons(default) == {"eu-1": [], "us-1": ["selector"]}
    assert default["unsatisfiable_until"] == "2030-01-02T03:04:05Z"
    assert default["unsatisfiable_ticks"] == 1
    # null is absent: the config's selector too.
    assert reasons(await client.call("explain", model=MODEL, selector=None)) == reasons(default)
    # A selector given replaces the config's; {} is "no selector".
    given_ = await client.call("explain", model=MODEL, selector={"zone": "us"})
    assert reasons(given_) == {"eu-1": ["selector"], "us-1": []}
    assert messages(given_, "eu-1") == ["label zone=eu, wants zone=us"]
    assert reasons(await client.call("explain", model=MODEL, selector={})) == {
        "eu-1": [],
        "us-1": [],
    }
    # Every pair missing or different is named.
    both = await client.call("explain", model=MODEL, selector={"zone": "eu", "tier": "h100"})
    assert messages(both, "us-1") == [
        "no label tier, wants tier=h100; label zone=us, wants zone=eu"
    ]
    assert messages(both, "eu-1") == ["label tier=a100, wants tier=h100"]


async def test_nodes_page_by_name_and_the_summary_counts_them_all(client: Client) -> None:
    for i in range(7):
        await client.healthy_node(f"n-{i}", available_vram=i * GiB)
    pages = await every_page(client, "explain", model="m", min_bytes=3 * GiB, limit=3)
    assert [[n["name"] for n in p["nodes"]] for p in pages] == [
        ["n-0", "n-1", "n-2"],
        ["n-3", "n-4", "n-5"],
        ["n-6"],
    ]
    for p in pages:
        assert p["summary"] == "4/7 nodes can take a replica of m: 3 below 3.0 GiB effectively free"
        assert p["placeable"] == 4


async def test_figures_that_round_alike_come_with_their_bytes(client: Client) -> None:
    await client.healthy_node("almost", available_vram=8 * GiB - 1)
    reply = await client.call("explain", model="m", min_bytes=8 * GiB)
    assert messages(reply, "almost") == [
        "8.0 GiB effectively free (8.0 GiB free, 0.0 GiB reserved) < 8.0 GiB"
        f" ({8 * GiB - 1} < {8 * GiB} bytes)"
    ]


async def test_a_page_too_large_for_nats_is_cut_to_fit(
    nats_with: Callable[[str], Any],  # first: its server outlives the daemon
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    server = nats_with("max_payload: 16384\n")
    daemon = await start_daemon(nats_url=server.url)
    nc = await connect(server.url)
    client = Client(nc, daemon.settings.subject_prefix)
    try:
        names = [f"n{i}" for i in range(6)]
        for name in names:
            await client.healthy_node(name)
        # The longest model name, all quotes (each escaped in JSON, in the
        # model and the summary), and a selector no node matches: each node's
        # message names its ten pairs, ~5 KB, so a page holds two or three.
        model = '"' * 255
        selector = {f"{j}".ljust(128, "k"): "v" * 255 for j in range(10)}
        await fails(client.call("explain", model=model, selector=selector), 413, "'limit'")
        fields: dict[str, Any] = {"model": model, "selector": selector, "limit": 6}
        seen: list[str] = []
        for _ in range(10):
            msg = await client.raw("explain", orjson.dumps(fields))
            reply = parse(msg)
            headers = dict(msg.headers or {})
            assert len(msg.data) + sum(len(k) + len(v) + 4 for k, v in headers.items()) <= 16384
            assert 1 <= len(reply["nodes"]) < 6
            assert reply["summary"].endswith(": 6 not matching the selector")
            seen += [n["name"] for n in reply["nodes"]]
            if "Registry-Next" not in headers:
                break
            fields["after"] = headers["Registry-Next"]
        assert seen == names
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "'model'"),
        ({"model": ""}, "'model'"),
        ({"model": 5}, "'model'"),
        ({"model": "m", "min_bytes": -1}, "'min_bytes'"),
        ({"model": "m", "min_bytes": 2**63}, "'min_bytes'"),
        ({"model": "m", "node_ids": "gpu-1"}, "'node_ids'"),
        ({"model": "m", "selector": {"zone": 1}}, "'selector.zone'"),
        ({"model": "m", "selector": ["zone"]}, "'selector'"),
        ({"model": "m", "limit": 0}, "'limit'"),
        ({"model": "m", "after": "not a cursor"}, "'after'"),
        ({"model": "m", "after": "WzFd"}, "'after'"),  # [1]: not a name
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    await fails(client.call("explain", body), 400, field)


# ---------------------------------------------------------------- the property

STATES = ["loaded", "loaded", "loading", "idle", "unloading"]


@dataclass(frozen=True)
class Spec:
    name: str
    approved: bool
    status: str
    node_type: str
    labels: dict[str, str]
    available_gib: int
    reserved_gib: int
    max_replicas: int
    replicas: tuple[str, ...]  # states of its replicas of MODEL


# Each rule is drawn to hold for most nodes, so that most clusters have
# placeable nodes besides nodes kept out by one rule, or by a few.
@st.composite
def node_specs(draw: st.DrawFn, name: str) -> Spec:
    status = draw(
        st.sampled_from(["healthy"] * 12 + ["unhealthy", "draining", "offline", "pending"])
    )
    zone = draw(st.sampled_from(["eu"] * 4 + ["us", None]))
    tier = draw(st.sampled_from(["a100", "a100", "l4", None]))
    return Spec(
        name=name,
        # Never approved is never healthy (schema.sql); approved may be pending.
        approved=status == "healthy" or draw(st.booleans()),
        status=status,
        node_type=draw(st.sampled_from(["backend"] * 8 + ["agent"])),
        labels={k: v for k, v in (("zone", zone), ("tier", tier)) if v is not None},
        available_gib=draw(st.integers(0, 8)),
        reserved_gib=draw(st.integers(0, 1)),
        max_replicas=draw(st.integers(1, 3)),
        replicas=tuple(draw(st.lists(st.sampled_from(STATES), max_size=2))),
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[Spec]:
    count = draw(st.integers(0, 8))
    return [draw(node_specs(f"node-{i}")) for i in range(count)]


SELECTORS = [
    {},
    {"zone": "eu"},
    {"zone": "eu"},
    {"zone": "eu", "tier": "a100"},
    {"tier": "a100"},
    {"zone": "us"},
    {"gpu": "h100"},  # no node has it
]


async def build(pg: asyncpg.Connection, specs: list[Spec]) -> dict[str, str]:
    """The cluster, written straight into a clean database; name → node id."""
    await pg.execute("TRUNCATE nodes, replicas, node_labels, leases, scheduling_configs")
    ids = {}
    for spec in specs:
        ids[spec.name] = await pg.fetchval(
            """INSERT INTO nodes (name, address, approved, status, node_type, available_vram,
                                  reserved_vram, max_replicas_per_model)
               VALUES ($1, 'a:1', $2, $3, $4, $5, $6, $7) RETURNING id""",
            spec.name,
            spec.approved,
            spec.status,
            spec.node_type,
            spec.available_gib * GiB,
            spec.reserved_gib * GiB,
            spec.max_replicas,
        )
        for key, value in spec.labels.items():
            await pg.execute(
                "INSERT INTO node_labels (node_id, key, value) VALUES ($1, $2, $3)",
                ids[spec.name],
                key,
                value,
            )
        for index, state in enumerate(spec.replicas):
            await pg.execute(
                """INSERT INTO replicas (node_id, model_name, replica_index, state)
                   VALUES ($1, $2, $3, $4)""",
                ids[spec.name],
                MODEL,
                index,
                state,
            )
    return ids


def names(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["name"] for n in nodes}


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=clusters(),
    selector=st.sampled_from(SELECTORS),
    from_config=st.booleans(),
    # node_ids: every node, or some (maybe one that does not exist).
    subset=st.one_of(st.just([]), st.lists(st.integers(0, 8), min_size=1, max_size=10)),
    min_gib=st.integers(0, 4),
)
async def test_explain_agrees_with_the_placement_and_routing_operations(
    client: Client,
    pg: asyncpg.Connection,
    specs: list[Spec],
    selector: dict[str, str],
    from_config: bool,
    subset: list[int],
    min_gib: int,
) -> None:
    ids = await build(pg, specs)
    node_ids = sorted({ids.get(f"node-{i}", "no-such-node") for i in subset})
    fields: dict[str, Any] = {"model": MODEL, "min_bytes": min_gib * GiB, "node_ids": node_ids}
    if from_config:
        await client.call("scheduling_set", model_name=MODEL, node_selector=selector)
    else:
        fields["selector"] = selector
    reply = await client.call("explain", **fields)

    slots = names(await client.call("free_slots", model=MODEL, node_ids=node_ids))
    matching = names(await client.call("find_selector", selector=selector))
    fitting = set()
    for name, node_id in ids.items():
        try:
            await client.call("find_vram", min_bytes=min_gib * GiB, node_ids=[node_id])
            fitting.add(name)
        except CallError as err:
            assert err.code == 404
    placeable = {n["name"] for n in reply["nodes"] if n["placeable"]}
    assert placeable == slots & matching & fitting
    assert reply["placeable"] == len(placeable)
    assert {n["name"] for n in reply["nodes"]} == set(ids)
    assert all(n["placeable"] == (not n["reasons"]) for n in reply["nodes"])

    # The replicas findlock can reach: each replica of the model, asked for by
    # name (`prefer`), is returned exactly when it is a candidate.
    reachable = 0
    for spec in specs:
        for index in range(len(spec.replicas)):
            try:
                got = await client.call(
                    "findlock",
                    model=MODEL,
                    node_ids=node_ids,
                    prefer={"node_id": ids[spec.name], "replica_index": index},
                )
            except CallError as err:
                assert err.code == 404
                continue
            replica = got["replica"]
            reachable += (replica["node_id"], replica["replica_index"]) == (ids[spec.name], index)
    assert reply["routable"] == reachable


# ---------------------------------------------------------------- the model event


def token(model: str) -> str:
    return base64.urlsafe_b64encode(model.encode()).decode().rstrip("=")


async def test_a_cooldown_publishes_the_explanation(client: Client) -> None:
    model = "org/Qwen 3.5 *8b* > v2.gguf"  # dots, spaces and wildcards
    await client.healthy_node("eu-1", labels={"zone": "eu"}, available_vram=4 * GiB)
    await client.healthy_node("us-1", labels={"zone": "us"})
    await client.call("scheduling_set", model_name=model, node_selector={"zone": "eu"})
    for _ in range(3):
        await client.call("unsatisfiable_bump", model=model)
    listener = await client.listen(f"{client.prefix}.events.model.>")

    assert await client.call("unsatisfiable_mark", model=model, until="2030-01-02T03:04:05Z") == {}
    subject, event = await listener.next()
    assert subject == f"{client.prefix}.events.model.{token(model)}"
    explained = await client.call("explain", model=model)
    assert event == {
        "model": model,
        "until": "2030-01-02T03:04:05Z",
        "ticks": 3,
        "summary": f"1/2 nodes can take a replica of {model}: 1 not matching the selector",
        "placeable": 1,
        "routable": 0,
    }
    assert event["summary"] == explained["summary"]

    # A model without a config: 404, and no event.
    await fails(client.call("unsatisfiable_mark", model="nope", until="2030-01-02T03:04:05Z"), 404)
    await client.call("unsatisfiable_mark", model=model, until="2031-01-01T00:00:00+02:00")
    subject, event = await listener.next()
    assert event["until"] == "2030-12-31T22:00:00Z"
    assert await listener.drained(client.nc) == []


# ---------------------------------------------------------------- registryd why


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def why(*args: str, env: Mapping[str, str]) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *REGISTRYD,
        "why",
        *args,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def test_registryd_why(client: Client, daemon: Daemon, daemon_env: dict[str, str]) -> None:
    env = {**daemon_env, "REGISTRY_SUBJECT_PREFIX": daemon.settings.subject_prefix}
    await client.healthy_node("gpu-1", labels={"zone": "eu"}, available_vram=16 * GiB)
    await client.healthy_node("gpu-22", labels={"zone": "us"}, available_vram=4 * GiB)
    await client.register("gpu-3", available_vram=16 * GiB)

    shown = await why(MODEL, "--min-bytes", str(8 * GiB), "--selector", "zone=eu", env=env)
    assert shown.code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == (
        f"1/3 nodes can take a replica of {MODEL}: 1 not approved, 1 not matching the selector"
    )
    # Only the nodes that cannot take it, one reason a line, in aligned columns.
    table = lines[lines.index("") + 1 :] if "" in lines else lines[1:]
    assert table[0].split() == ["NODE", "STATUS", "REASON"]
    assert [line.split()[0] for line in table[1:] if not line.startswith(" ")] == [
        "gpu-22",
        "gpu-3",
    ]
    column = table[0].index("REASON")
    for line in table[1:]:
        assert line[column - 1] == " " and line[column] != " "
    assert any("selector: label zone=us, wants zone=eu" in line for line in table)
    assert any("vram: 4.0 GiB effectively free" in line for line in table)
    assert any("not_approved: never approved" in line for line in table)
    assert "gpu-1 " not in shown.stdout

    raw = await why(MODEL, "--json", "--min-bytes", "8GiB", "--selector", "zone=eu", env=env)
    assert raw.code == 0, raw.stderr
    reply = orjson.loads(raw.stdout)
    assert reply == await client.call(
        "explain", model=MODEL, min_bytes=8 * GiB, selector={"zone": "eu"}
    )

    bad = await why("m" * 256, env=env)  # a model name too long: the daemon's 400
    assert bad.code == 1
    assert "400" in bad.stderr and "'model'" in bad.stderr
    assert bad.stdout == ""

    unusable = await why(MODEL, "--selector", "zone", env=env)
    assert unusable.code == 2
    assert "k=v" in unusable.stderr
