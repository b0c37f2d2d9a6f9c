"""findlock and the in-flight counters: the router's hot path."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from daemon.app import Daemon
from infra.db import Database
from subjects.routing import Batches
from tests.support import CallError, Client, Registryd, connect, eventually, serving


async def pick(client: Client, model: str = "m", **fields: Any) -> tuple[str, int]:
    got = await client.call("findlock", model=model, **fields)
    return got["node"]["name"], got["replica"]["replica_index"]


async def test_picks_rotate_over_equally_loaded_replicas(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    await client.healthy_node("gpu-c")  # no replica: never picked
    await client.replica(a)
    await client.replica(b)

    # Without decrements: least in flight first, so picks alternate.
    held = [await pick(client) for _ in range(4)]
    assert Counter(name for name, _ in held) == {"gpu-a": 2, "gpu-b": 2}
    assert held[0][0] != held[1][0] and held[2][0] != held[3][0]

    # With a decrement after each request: equal in flight, so the least
    # recently used replica goes next.
    for name, index in held:
        node = a if name == "gpu-a" else b
        await client.call("inflight_dec", node_id=node["id"], model="m", replica_index=index)
    names = []
    for _ in range(6):
        name, index = await pick(client)
        names.append(name)
        node = a if name == "gpu-a" else b
        await client.call("inflight_dec", node_id=node["id"], model="m", replica_index=index)
    assert names[::2] == [names[0]] * 3 and names[1::2] == [names[1]] * 3
    assert names[0] != names[1]


async def test_the_reply_holds_the_node_and_the_locked_replica(client: Client) -> None:
    a = await client.healthy_node("gpu-a", available_vram=7)
    before = await client.replica(a, address="10.0.0.5:50100")
    got = await client.call("findlock", model="m")
    assert got["node"]["id"] == a["id"] and got["node"]["available_vram"] == 7
    assert "token_hash" not in got["node"]
    assert got["replica"]["id"] == before["id"]
    assert got["replica"]["in_flight"] == 1
    assert got["replica"]["address"] == "10.0.0.5:50100"
    assert got["replica"]["last_used"] >= before["last_used"]
    row = await client.call("replica_get", node_id=a["id"], model="m")
    assert row["in_flight"] == 1


async def test_the_least_busy_replica_wins(client: Client) -> None:
    a = await client.healthy_node("gpu-a", available_vram=10)
    b = await client.healthy_node("gpu-b", available_vram=20)
    await client.replica(a, in_flight=0)
    await client.replica(b, in_flight=3)
    assert (await pick(client))[0] == "gpu-a"  # a: 0 -> 1
    assert (await pick(client))[0] == "gpu-a"  # a: 1 -> 2, b still 3
    await client.replica(a, in_flight=4)
    assert (await pick(client))[0] == "gpu-b"


async def test_equal_replicas_never_used_go_to_the_node_with_most_vram(
    client: Client, pg: asyncpg.Connection
) -> None:
    small = await client.healthy_node("gpu-small", available_vram=8 << 30)
    big = await client.healthy_node("gpu-big", available_vram=80 << 30)
    await client.replica(small)
    await client.replica(big)
    await pg.execute("UPDATE replicas SET last_used = '2026-01-01T00:00:00Z'")
    assert (await pick(client))[0] == "gpu-big"


async def test_only_loaded_replicas_on_healthy_nodes_are_picked(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    c = await client.register("gpu-c")  # pending
    await client.replica(a, state="loading")
    await client.replica(b)
    await client.replica(c)
    await client.call("unhealthy", node_id=b["id"])
    with pytest.raises(CallError) as err:
        await client.call("findlock", model="m")
    assert err.value.code == 404 and "'m'" in err.value.message
    await client.call("healthy", node_id=b["id"])
    assert (await pick(client))[0] == "gpu-b"
    with pytest.raises(CallError) as err:
        await client.call("findlock", model="other")
    assert err.value.code == 404


async def test_node_ids_restrict_the_pick(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    await client.replica(a)
    await client.replica(b, in_flight=9)
    assert (await pick(client, node_ids=[b["id"]]))[0] == "gpu-b"
    assert (await pick(client, node_ids=[]))[0] == "gpu-a"
    with pytest.raises(CallError) as err:
        await client.call("findlock", model="m", node_ids=["elsewhere"])
    assert err.value.code == 404


async def test_a_preferred_replica_is_taken_while_it_is_loaded_and_healthy(client: Client) -> None:
    a = await client.healthy_node("gpu-a", max_replicas_per_model=2)
    b = await client.healthy_node("gpu-b")
    await client.replica(a, index=0, in_flight=0)
    await client.replica(a, index=1, in_flight=5)
    await client.replica(b, in_flight=1)
    prefer = {"node_id": a["id"], "replica_index": 1}
    assert await pick(client, prefer=prefer) == ("gpu-a", 1)
    # Not loaded any more: the default order decides.
    await client.replica(a, index=1, state="unloading", in_flight=6)
    assert await pick(client, prefer=prefer) == ("gpu-a", 0)
    # Outside node_ids: not taken either.
    await client.replica(a, index=1, in_flight=6)
    assert (await pick(client, prefer=prefer, node_ids=[b["id"]]))[0] == "gpu-b"


async def test_concurrent_picks_spread_over_replicas(
    client: Client, pg: asyncpg.Connection
) -> None:
    for i in range(4):
        node = await client.healthy_node(f"gpu-{i}")
        await client.replica(node)
    replies = await asyncio.gather(*(client.call("findlock", model="m") for _ in range(64)))
    assert len(replies) == 64
    counts = [r["in_flight"] for r in await pg.fetch("SELECT in_flight FROM replicas")]
    assert sum(counts) == 64
    assert max(counts) - min(counts) <= 2, counts


class CountedBatches(Batches):
    """The routing batches, recording what each statement carried: per node
    set, how many picks and how many releases."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.batches: Counter[tuple[tuple[str, ...], int]] = Counter()
        self.carried: list[tuple[int, int]] = []

    async def _place(self, node_ids: list[str], picks: Any, releases: Any) -> Any:
        self.batches[tuple(node_ids), len(picks)] += 1
        self.carried.append((len(picks), len(releases)))
        return await super()._place(node_ids, picks, releases)


async def test_a_node_sets_batch_lives_only_while_its_picks_run(
    daemon: Daemon, client: Client
) -> None:
    # Clients choose node sets freely: a batch kept per set ever seen would grow
    # the daemon with every new one (contract v1.1). Concurrent picks on one set
    # still share a statement.
    a, b = await client.healthy_node("gpu-a"), await client.healthy_node("gpu-b")
    await client.replica(a)
    await client.replica(b)
    assert daemon.db is not None
    picks = CountedBatches(daemon.db)
    sets = [(a["id"],), (b["id"],), (a["id"], b["id"])]
    burst = asyncio.gather(*(picks.pick("m", sets[i % 3], None) for i in range(30)))
    await asyncio.sleep(0)  # every pick has started: the first of each set is running
    assert len(picks) == 3
    placed = await burst
    assert all(p is not None for p in placed)
    # Per set, the first pick at once, and the nine that came meanwhile together.
    assert picks.batches == {(tuple(sorted(s)), n): 1 for s in sets for n in (1, 9)}
    assert len(picks) == 0
    # A set seen before gets a batch again.
    assert await picks.pick("m", [b["id"], a["id"]], None) is not None
    assert len(picks) == 0


async def test_a_model_is_counted_only_while_its_picks_run(daemon: Daemon, client: Client) -> None:
    # Releases look up which models have picks under way; clients name models
    # freely, made-up ones too, so a model ever seen must not stay in that map.
    await client.replica(await client.healthy_node("gpu-a"))
    assert daemon.db is not None
    batches = Batches(daemon.db)
    burst = asyncio.gather(
        batches.pick("m", [], None),
        *(batches.pick(f"made-up-{i}", [], None) for i in range(40_000)),
    )
    await asyncio.sleep(0)  # every pick has started: the first is running, the rest wait
    assert batches.models_picking == 40_001
    placed = await burst
    assert placed[0] is not None and placed[1:] == [None] * 40_000
    assert batches.models_picking == 0
    # A pick given up while it waits is forgotten too.
    first = asyncio.ensure_future(batches.pick("m", [], None))
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(batches.pick("gone", [], None))
    await asyncio.sleep(0)
    assert batches.models_picking == 2
    waiting.cancel()
    assert await first is not None
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert batches.models_picking == 0


async def test_releases_go_out_with_the_next_picks_and_count_first(
    daemon: Daemon, client: Client
) -> None:
    # A router's release and its next pick write the same rows: they share
    # one statement, and the picks see the replicas as the releases left them.
    a, b = await client.healthy_node("gpu-a"), await client.healthy_node("gpu-b")
    await client.replica(a, in_flight=5)
    await client.replica(b, in_flight=3)
    assert daemon.db is not None
    batches = CountedBatches(daemon.db)
    first = asyncio.ensure_future(batches.pick("m", [], None))
    await asyncio.sleep(0)  # the first pick is running: the rest wait for it
    meanwhile = [batches.release(a["id"], "m", 0) for _ in range(3)]
    meanwhile += [batches.pick("m", [], None) for _ in range(2)]
    done = await asyncio.gather(first, *meanwhile)
    assert batches.carried == [(1, 0), (2, 3)]
    placed = [p for p in done if p is not None]
    # First b (3 -> 4); then a, down to 2 by its three releases, takes both.
    assert [(p["node"]["name"], p["replica"]["in_flight"]) for p in placed] == [
        ("gpu-b", 4),
        ("gpu-a", 3),
        ("gpu-a", 4),
    ]
    for node in (a, b):
        row = await client.call("replica_get", node_id=node["id"], model="m")
        assert row["in_flight"] == 4, node["name"]


async def test_a_release_waits_only_for_picks_of_its_own_model(
    daemon: Daemon, client: Client, pg: asyncpg.Connection, database_url: str
) -> None:
    # A release rides with picks of its model (they write the same rows); a
    # release of another model shares no row with them and does not wait for
    # them, however long they take: here, a pick held up by a lock.
    a, b = await client.healthy_node("gpu-a"), await client.healthy_node("gpu-b")
    await client.replica(a, model="slow", in_flight=1)
    await client.replica(b, model="m", in_flight=1)
    assert daemon.db is not None
    batches = Batches(daemon.db)

    async def blocked() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )

    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM replicas WHERE model_name = 'slow' FOR UPDATE")
        picking = asyncio.ensure_future(batches.pick("slow", [], None))
        await eventually(blocked, "the pick to wait for the lock")
        await asyncio.wait_for(batches.release(b["id"], "m", 0), 10)  # not behind it
        riding = asyncio.ensure_future(batches.release(a["id"], "slow", 0))
        await asyncio.sleep(0.1)
        assert not picking.done() and not riding.done()  # it waits with the picks
        await tx.rollback()
        placed = await picking
        await riding
    finally:
        await holder.close()
    assert placed is not None and placed["replica"]["in_flight"] == 2
    counts = {r["model_name"]: r["in_flight"] for r in await pg.fetch("SELECT * FROM replicas")}
    assert counts == {"slow": 1, "m": 0}


async def test_each_pick_of_a_batch_says_what_it_left_and_holds_its_own_lease(
    daemon: Daemon, client: Client, pg: asyncpg.Connection
) -> None:
    # A batch sends each replica once, however many of its picks landed there:
    # every reply must still show the count its own pick left, as picks one
    # after the other would, and a leased pick its own lease, on its replica.
    loads = {"gpu-a": 0, "gpu-b": 3, "gpu-c": 1, "gpu-d": 6}
    for name, load in loads.items():
        await client.replica(await client.healthy_node(name), in_flight=load)
    assert daemon.db is not None
    batches = CountedBatches(daemon.db)
    first = asyncio.ensure_future(batches.pick("m", [], None))
    await asyncio.sleep(0)  # the first pick is running: the rest wait for it
    rest = [batches.pick("m", [], 30.0 if i % 3 == 0 else None) for i in range(11)]
    placed = [p for p in await asyncio.gather(first, *rest) if p is not None]
    assert batches.carried == [(1, 0), (11, 0)]

    # Water filling: each pick goes to a least loaded replica, one unit at a time.
    level = sorted(loads.values())
    expected = []
    for _ in range(12):
        level.sort()
        level[0] += 1
        expected.append(level[0])
    assert [p["replica"]["in_flight"] for p in placed] == expected
    final = {
        r["name"]: r["in_flight"]
        for r in await pg.fetch(
            "SELECT n.name, r.in_flight FROM replicas r JOIN nodes n ON n.id = r.node_id"
        )
    }
    seen: dict[str, list[int]] = {}
    for p in placed:
        seen.setdefault(p["node"]["name"], []).append(p["replica"]["in_flight"])
    for name, load in loads.items():  # each pick on a replica saw the one before it
        assert seen.get(name, []) == list(range(load + 1, final[name] + 1)), name

    leased = [p for i, p in enumerate(placed[1:]) if i % 3 == 0]
    assert all("lease_id" not in p["replica"] for p in placed if p not in leased)
    ids = [p["replica"]["lease_id"] for p in leased]
    assert len(set(ids)) == len(ids) == 4
    rows = await pg.fetch("SELECT id, replica_id FROM leases")
    assert {r["id"]: r["replica_id"] for r in rows} == {
        p["replica"]["lease_id"]: p["replica"]["id"] for p in leased
    }


async def test_routers_picking_and_releasing_at_once_lose_no_count(client: Client) -> None:
    # 32 routers, each picking and then releasing what it picked, some by
    # lease: every release comes back, whatever statement it rode in, and the
    # counts end where they started; the ones kept open are still counted.
    nodes = [await client.healthy_node(f"gpu-{i}") for i in range(3)]
    for node in nodes:
        await client.replica(node, in_flight=1)

    async def router(r: int) -> int:
        kept = 0
        for i in range(6):
            leased = (r + i) % 4 == 0
            got = await client.call("findlock", model="m", **({"lease_s": 60} if leased else {}))
            if (r + i) % 7 == 0:
                kept += 1  # still in flight at the end
            elif leased:
                await client.call("inflight_dec", lease_id=got["replica"]["lease_id"])
            else:
                ref = got["replica"]
                await client.call(
                    "inflight_dec",
                    node_id=ref["node_id"],
                    model="m",
                    replica_index=ref["replica_index"],
                )
        return kept

    kept = sum(await asyncio.gather(*(router(r) for r in range(32))))
    counts = [
        (await client.call("replica_get", node_id=n["id"], model="m"))["in_flight"] for n in nodes
    ]
    assert kept > 0 and sum(counts) == 3 + kept, counts
    assert min(counts) >= 1, counts


async def test_inflight_inc_needs_a_replica(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    with pytest.raises(CallError) as err:
        await client.call("inflight_inc", node_id=a["id"], model="m", replica_index=0)
    assert err.value.code == 404
    await client.replica(a)
    assert await client.call("inflight_inc", node_id=a["id"], model="m") == {}
    assert (await client.call("replica_get", node_id=a["id"], model="m"))["in_flight"] == 1


async def test_concurrent_decrements_lose_nothing_and_stop_at_zero(client: Client) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a, in_flight=40)
    ref = {"node_id": a["id"], "model": "m", "replica_index": 0}
    await asyncio.gather(*(client.call("inflight_dec", **ref) for _ in range(30)))
    assert (await client.call("replica_get", **ref))["in_flight"] == 10
    await asyncio.gather(*(client.call("inflight_dec", **ref) for _ in range(25)))
    assert (await client.call("replica_get", **ref))["in_flight"] == 0
    # Decrementing a replica that does not exist is not an error either (as in Go).
    assert await client.call("inflight_dec", node_id=a["id"], model="gone") == {}


async def test_decrements_one_at_a_time_stop_at_zero_on_their_replica(client: Client) -> None:
    # A quiet router's releases, each alone in its statement.
    a = await client.healthy_node("gpu-a")
    for index in (0, 1):
        await client.replica(a, index=index, in_flight=2)
    ref = {"node_id": a["id"], "model": "m", "replica_index": 1}
    for _ in range(3):
        assert await client.call("inflight_dec", **ref) == {}
    assert (await client.call("replica_get", **ref))["in_flight"] == 0
    other = await client.call("replica_get", node_id=a["id"], model="m", replica_index=0)
    assert other["in_flight"] == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "model"),
        ({"model": ""}, "model"),
        ({"model": "m", "node_ids": "a"}, "node_ids"),
        ({"model": "m", "node_ids": [1]}, "node_ids.0"),
        ({"model": "m", "prefer": {"replica_index": 0}}, "prefer.node_id"),
        ({"model": "m", "prefer": {"node_id": "a", "replica_index": -1}}, "prefer.replica_index"),
    ],
)
async def test_bad_findlock_requests_name_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(CallError) as err:
        await client.call("findlock", body)
    assert err.value.code == 400 and f"'{field}'" in err.value.message


async def test_bad_releases_never_reach_the_statement_other_routers_share(
    client: Client,
) -> None:
    # Releases ride in the statement that places other routers' picks, so one
    # that could fail there would fail theirs too. A Go client's zero values
    # and nulls, text PostgreSQL cannot store, an index past int4 and a
    # replica that does not exist, sent while 30 routers pick at once: the bad
    # ones are refused 400 on their own, the rest change nothing, and every
    # pick is placed.
    node = await client.healthy_node("gpu-a")
    await client.replica(node, in_flight=5)
    hostile: list[dict[str, Any] | bytes] = [
        {"node_id": node["id"], "model": "m\u0000", "replica_index": 0},
        b'{"node_id": "gpu\\ud800", "model": "m", "replica_index": 0}',
        {"node_id": node["id"], "model": "m", "replica_index": 2**40},
        {"node_id": node["id"], "model": None, "replica_index": 0},
        {"node_id": None, "model": None, "replica_index": 0, "lease_id": None},
    ]
    harmless = [
        {"node_id": node["id"], "model": "other", "replica_index": 0},
        {"node_id": "no-such-node", "model": "m", "replica_index": 0},
    ]

    async def refused(body: dict[str, Any] | bytes) -> int:
        try:
            await client.call("inflight_dec", body)
        except CallError as err:
            return err.code
        return 200

    picks, codes = await asyncio.gather(
        asyncio.gather(*(client.call("findlock", model="m") for _ in range(30))),
        asyncio.gather(*(refused(body) for body in hostile + harmless * 15)),
    )
    assert all(p["node"]["id"] == node["id"] for p in picks)
    assert codes[: len(hostile)] == [400] * len(hostile)
    assert set(codes[len(hostile) :]) == {200}
    row = await client.call("replica_get", node_id=node["id"], model="m")
    assert row["in_flight"] == 5 + 30


async def test_busy_routers_over_many_models_always_find_a_replica(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_url: str,
    pg: asyncpg.Connection,
) -> None:
    # 64 routers making findlock + inflight_dec pairs over 200 models of two
    # replicas each, against a daemon of its own process, as in production:
    # picks of some models and releases of others run in statements at the
    # same time and lock the same rows. Every pick must get a replica: the
    # benchmark's routers got 404 for a model with both replicas loaded,
    # healthy and idle, when a pick statement's row lock dropped a replica
    # it had chosen.
    await pg.execute(
        """INSERT INTO nodes (name, address, status, approved, available_vram, total_vram)
           SELECT 'gpu-' || g, 'a:1', 'healthy', true, 1 << 34, 1 << 35
             FROM generate_series(1, 400) g"""
    )
    await pg.execute(
        """INSERT INTO replicas (node_id, model_name, replica_index, state)
           SELECT n.id, 'm' || m, 0, 'loaded' FROM generate_series(1, 200) m,
                  LATERAL (SELECT id FROM nodes ORDER BY md5(name || m) LIMIT 2) n"""
    )
    await pg.execute("ANALYZE")  # plans for a table of this size
    # Rows with a history of versions since, as in any running cluster; the
    # pick statement lost rows only then.
    await pg.execute(
        """DO $$ BEGIN FOR i IN 1..3 LOOP
             UPDATE replicas SET in_flight = in_flight + 1, last_used = now();
             UPDATE replicas SET in_flight = in_flight - 1;
           END LOOP; END $$"""
    )
    registryd = await spawn(env={**daemon_env, "REGISTRY_STALE_AFTER": "3600"})
    nc = await connect(nats_url)
    client = Client(nc, daemon_env["REGISTRY_SUBJECT_PREFIX"])
    missed: list[str] = []

    async def router(seed: int) -> None:
        for i in range(250):
            model = f"m{(seed * 7919 + i * 104729) % 200 + 1}"
            try:
                got = await client.call("findlock", model=model)
            except CallError as exc:
                missed.append(f"{model}: {exc}")
                continue
            replica = got["replica"]
            await client.call(
                "inflight_dec",
                node_id=replica["node_id"],
                model=model,
                replica_index=replica["replica_index"],
            )

    try:
        await serving(client, registryd, within=60, limit=1)
        await asyncio.gather(*(router(seed) for seed in range(64)))
    finally:
        await nc.close()
    registryd.assert_running()
    assert missed == []
    assert await pg.fetchval("SELECT sum(in_flight) FROM replicas") == 0
