"""registryd's benchmark: every figure against a baseline measured in the same run.

    .venv/bin/python -m tests.bench            # a few minutes
    .venv/bin/python -m tests.bench --quick    # shorter runs, rougher figures

It starts a throwaway PostgreSQL and nats-server (or uses REGISTRY_TEST_DATABASE_URL
and REGISTRY_TEST_NATS_URL), runs one registryd as a separate process on them,
seeds a cluster, and prints a table. Everything runs on loopback and stops by
itself. Baselines, sent straight to PostgreSQL with asyncpg from this process:

  A  LocalAI's own approach: one transaction per pick (SELECT … FOR UPDATE of
     the best replica, UPDATE of its counter, SELECT of its node), then a
     separate decrement: what FindAndLockNodeWithModel + DecrementInFlight do.
  B  the best single statement per pick (one UPDATE … RETURNING), then the
     decrement: the floor for any service in front of the database.
  H  one UPDATE per heartbeat.
  F  the floor for one request: a NATS round trip to a bare echo service plus
     the best single statement for the operation, each on its own connection,
     measured in turn with the daemon's requests so they see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.errors
import nats.js.errors
import orjson
import psutil

from daemon import embedded
from infra import db as dbmod
from registryd import NoResponders, Registry
from tests import bench_table
from tests.conftest import with_database
from tests.support import MALFORMED

PICK_A_SELECT = """
    SELECT r.id, r.node_id FROM replicas r JOIN nodes n ON n.id = r.node_id
     WHERE r.model_name = $1 AND r.state = 'loaded' AND n.status = 'healthy'
     ORDER BY r.in_flight, r.last_used, n.available_vram DESC
     LIMIT 1 FOR UPDATE OF r"""
PICK_A_UPDATE = "UPDATE replicas SET in_flight = in_flight + 1, last_used = now() WHERE id = $1"
PICK_A_NODE = "SELECT * FROM nodes WHERE id = $1 AND status = 'healthy'"
# What the echo service is sent: a findlock's body, parsed on return as a reply is.
ECHO_BODY = {"model": "floor1"}
DEC = "UPDATE replicas SET in_flight = in_flight - 1 WHERE id = $1 AND in_flight > 0"
PICK_B = """
    WITH pick AS (
        SELECT r.id FROM replicas r JOIN nodes n ON n.id = r.node_id
         WHERE r.model_name = $1 AND r.state = 'loaded' AND n.status = 'healthy'
         ORDER BY r.in_flight, r.last_used, n.available_vram DESC
         LIMIT 1 FOR UPDATE OF r SKIP LOCKED)
    UPDATE replicas r SET in_flight = in_flight + 1, last_used = now()
      FROM pick WHERE r.id = pick.id
    RETURNING r.*, (SELECT row_to_json(n) FROM nodes n WHERE n.id = r.node_id)"""
# The best single statement for each operation the floor section measures.
GET_ONE = """
    SELECT n.*, (SELECT json_object_agg(key, value) FROM node_labels WHERE node_id = n.id)
      FROM nodes n WHERE n.id = $1"""
REGISTER_ONE = """
    INSERT INTO nodes (name, address, status, approved) VALUES ($1, $2, 'healthy', true)
    ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, last_heartbeat = now()
    RETURNING *"""
HEARTBEAT_ONE = """
    UPDATE nodes SET last_heartbeat = now(), available_vram = $2, reserved_vram = 0
     WHERE id = $1 AND status NOT IN ('pending', 'offline')"""


class Usage:
    """CPU of each party to a run (% of one core), and of the whole machine.

    Says what bounds throughput: the daemon is one thread, so near 100% it is
    the bound; near the machine's cores in all, the machine is. (PostgreSQL's
    own commit counter is no help here: a backend reports it up to 10 s late,
    so one run's commits land in the next; the daemon's STATS count its
    statements instead.)"""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def _find(self) -> dict[str, list[psutil.Process]]:
        daemon = psutil.Process(self.bench.daemon.pid)
        groups: dict[str, list[psutil.Process]] = {
            "daemon": [daemon],
            "bench": [psutil.Process()],
            "postgres": [],
            "nats-server": [],
        }
        for proc in psutil.process_iter(["name"]):
            name = proc.info["name"] or ""
            if name.startswith("postgres"):
                groups["postgres"].append(proc)
            elif name.startswith("nats-server"):
                groups["nats-server"].append(proc)
        return groups

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
        out = {}
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            out[proc.pid] = times.user + times.system
        return out

    async def __aenter__(self) -> Usage:
        self.before = {name: self._cpu(procs) for name, procs in self._find().items()}
        self.machine = psutil.cpu_times()
        self.started = time.monotonic()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.elapsed = time.monotonic() - self.started
        machine = psutil.cpu_times()
        self.busy = (
            sum(machine) - machine.idle - (sum(self.machine) - self.machine.idle)
        ) / self.elapsed
        self.share: dict[str, float] = {}
        # Found again: a pool that grows during the run starts PostgreSQL
        # backends, whose time all falls within it.
        for name, procs in self._find().items():
            after = self._cpu(procs)
            used = sum(t - self.before[name].get(pid, 0.0) for pid, t in after.items())
            self.share[name] = used / self.elapsed

    def per_pair(self, rate: float) -> str:
        """Each party's CPU for one pair, in microseconds."""
        return ", ".join(
            f"{name} {share / rate * 1e6:.0f}" for name, share in self.share.items() if share
        )

    def summary(self) -> str:
        parts = ", ".join(f"{name} {share:.0%}" for name, share in self.share.items())
        cores = psutil.cpu_count() or 1
        return f"CPU (of one core): {parts}; machine {self.busy:.0%} of {cores * 100}%"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[tuple[str, str, str, str]] = []
        self.cut_off = False  # nats-server disconnected the daemon under the heartbeat flood
        self._service_id: str | None = None

    def report(self, what: str, value: str, baseline: str, ratio: str) -> None:
        self.rows.append((what, value, baseline, ratio))
        print(f"  {what}: {value}  (baseline {baseline}; {ratio})", flush=True)

    # ------------------------------------------------------------ set-up

    async def setup(self, workdir: Path) -> None:
        """The servers, and the bench's own NATS connection: shared by every section."""
        pg_url = os.environ.get("REGISTRY_TEST_DATABASE_URL")
        nats_url = os.environ.get("REGISTRY_TEST_NATS_URL")
        self.workdir = workdir
        self.servers: list[Any] = []
        if not pg_url:
            pg = embedded.start_postgres(workdir / "postgres")
            self.servers.append(pg)
            pg_url = pg.url
        if not nats_url:
            ns = embedded.start_nats(workdir / "nats")
            self.servers.append(ns)
            nats_url = ns.url
        self.admin_url = pg_url
        self.nats_url = nats_url
        self.nc = await nats.connect(
            nats_url, pending_size=256 * 1024 * 1024, **connection_notes("bench client")
        )
        await self.open()

    async def open(self) -> None:
        """A database, subject prefix, stream and daemon of their own, for one
        section: what a section leaves behind (rows, dead row versions on a
        server whose autovacuum is off, counters) never weighs on the next."""
        self.prefix = f"bench{uuid.uuid4().hex[:6]}"
        self.stream = f"BENCH_{self.prefix}"
        self._service_id = None
        self.dbname = f"registryd_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(self.admin_url)
        await admin.execute(f'CREATE DATABASE "{self.dbname}"')
        await admin.close()
        self.db_url = with_database(self.admin_url, self.dbname)
        conn = await asyncpg.connect(self.db_url)
        await dbmod.migrate(conn)
        await conn.close()
        self.pool = await asyncpg.create_pool(self.db_url, min_size=4, max_size=64)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env |= {
            "REGISTRY_NATS_URL": self.nats_url,
            "REGISTRY_DATABASE_URL": self.db_url,
            "REGISTRY_SUBJECT_PREFIX": self.prefix,
            "REGISTRY_STREAM": self.stream,
            "REGISTRY_AUTO_APPROVE": "true",
            "REGISTRY_LOG_LEVEL": "warning",
            "REGISTRY_STALE_AFTER": "3600",
        }
        self.log = (self.workdir / f"registryd-{self.prefix}.log").open("wb")
        self.daemon = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon",
            env=env,
            stdout=self.log,
            stderr=self.log,
            stdin=asyncio.subprocess.DEVNULL,
        )
        self.registry = Registry(self.nc, self.prefix, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.call("list", limit=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await self.service_id()

    async def close(self) -> None:
        """Stop the section's daemon and drop what `open` made."""
        self.daemon.terminate()
        await self.daemon.wait()
        self.log.close()
        try:  # file storage on a server that may outlive this run
            await self.nc.jetstream().delete_stream(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        await self.pool.close()
        admin = await asyncpg.connect(self.admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        await admin.close()

    async def next_section(self) -> None:
        await self.close()
        await self.open()

    async def teardown(self) -> None:
        await self.close()
        await self.nc.close()
        for server in self.servers:
            server.stop()

    async def service_id(self) -> str:
        """Our daemon's service id: other daemons named `registry` may share the server."""
        if self._service_id is not None:
            return self._service_id
        inbox = self.nc.new_inbox()
        found: list[str] = []
        ours = asyncio.Event()

        async def on_info(msg: Any) -> None:
            info = orjson.loads(msg.data)
            subjects = [e.get("subject", "") for e in info.get("endpoints", [])]
            if any(s.startswith(f"{self.prefix}.") for s in subjects):
                found.append(info["id"])
                ours.set()

        sub = await self.nc.subscribe(inbox, cb=on_info)
        await self.nc.publish("$SRV.INFO.registry", b"", reply=inbox)
        try:
            await asyncio.wait_for(ours.wait(), 10)
        except TimeoutError:
            raise RuntimeError("the daemon's service did not answer $SRV.INFO.registry") from None
        finally:
            await sub.unsubscribe()
        self._service_id = found[0]
        return self._service_id

    async def endpoint_stats(self, timeout: float = 10) -> dict[str, dict[str, Any]]:
        """Our daemon's `$SRV.STATS`, by endpoint name."""
        subject = f"$SRV.STATS.registry.{await self.service_id()}"
        msg = await self.nc.request(subject, b"", timeout=timeout)
        return {e["name"]: e for e in orjson.loads(msg.data)["endpoints"]}

    async def call(self, op: str, **body: Any) -> Any:
        # The client's raw call: the parsed reply, an error reply raised as
        # its class. The typed methods would add pydantic's parsing to every
        # figure, which is the client's cost, not the daemon's.
        return await self.registry.call(op, body)

    # ------------------------------------------------------------ seeding

    async def seed(self, nodes: int, models: int, replicas_per_model: int, prefix: str) -> None:
        """Nodes, and loaded replicas of `models` models spread over them, in bulk."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO nodes (name, address, status, approved, available_vram, total_vram)
                   SELECT $1 || g, 'a:1', 'healthy', true, 1 << 34, 1 << 35
                     FROM generate_series(1, $2) g""",
                f"{prefix}-",
                nodes,
            )
            await conn.execute(
                """INSERT INTO replicas (node_id, model_name, replica_index, state)
                   SELECT n.id, $1 || m, 0, 'loaded'
                     FROM generate_series(1, $2) m,
                          LATERAL (SELECT id FROM nodes WHERE name LIKE $1 || '-%'
                                   ORDER BY md5(name || m) LIMIT $3) n""",
                prefix,
                models,
                replicas_per_model,
            )
            await conn.execute("ANALYZE")

    async def reset_counters(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE replicas SET in_flight = 0 WHERE in_flight <> 0")

    # ------------------------------------------------------------ drivers

    async def run_pairs(
        self,
        pair: Callable[[str], Awaitable[None]],
        models: list[str],
        routers: int,
        seconds: float,
    ) -> tuple[float, list[float]]:
        """Pairs per second and each pair's latency, `routers` at a time."""
        latencies: list[float] = []
        stop = time.monotonic() + seconds
        rng = random.Random(1)

        async def router() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                await pair(rng.choice(models))
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(router() for _ in range(routers)))
        return len(latencies) / (time.monotonic() - started), latencies

    async def pair_a(self, model: str) -> None:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                row = await conn.fetchrow(PICK_A_SELECT, model)
                await conn.execute(PICK_A_UPDATE, row["id"])
                await conn.fetchrow(PICK_A_NODE, row["node_id"])
        async with self.pool.acquire() as conn:
            await conn.execute(DEC, row["id"])

    async def pair_b(self, model: str) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(PICK_B, model)
            await conn.execute(DEC, row["id"])

    async def pair_daemon(self, model: str) -> None:
        got = await self.call("findlock", model=model)
        replica = got["replica"]
        await self.call(
            "inflight_dec",
            node_id=replica["node_id"],
            model=model,
            replica_index=replica["replica_index"],
        )

    # ------------------------------------------------------------ the sections

    async def findlock(self) -> None:
        seconds = self.args.seconds
        print("findlock + inflight_dec pairs", flush=True)
        await self.seed(200, 1, 4, "one")
        await self.seed(400, 200, 2, "many")
        one = ["one1"]
        many = [f"many{m}" for m in range(1, 201)]
        for label, models in (("4 replicas of one model", one), ("200 models", many)):
            await self.reset_counters()
            async with Usage(self) as usage_a:
                a64, _ = await self.run_pairs(self.pair_a, models, 64, seconds)
            await self.reset_counters()
            before = await self.endpoint_stats()
            async with Usage(self) as usage:
                d64, _ = await self.run_pairs(self.pair_daemon, models, 64, seconds)
            after = await self.endpoint_stats()
            self.report(
                f"64 routers, {label}",
                f"{d64:,.0f} pairs/s",
                f"A {a64:,.0f} pairs/s",
                f"{d64 / a64:.2f}x A (target >= 4x)",
            )
            self.report(f"64 routers, {label}: where the time went", usage.summary(), "-", "-")
            self.report(
                f"64 routers, {label}: the daemon's statements",
                batching(before, after, usage.elapsed),
                "-",
                "-",
            )
            # The machine's CPU is shared by every party here; what each pair
            # costs it, against A's, says how far 4x A is from what it has.
            cores = psutil.cpu_count() or 1
            others = usage.busy - usage.share["daemon"]
            self.report(
                f"64 routers, {label}: machine CPU per pair",
                f"{usage.busy / d64 * 1e6:.0f} us ({usage.per_pair(d64)})",
                f"A {usage_a.busy / a64 * 1e6:.0f} us ({usage_a.per_pair(a64)})",
                f"at 4x A this path would need {usage.busy / d64 * 4 * a64:.0%} "
                f"of the machine's {cores * 100}%, {others / d64 * 4 * a64:.0%} "
                "without the daemon's own",
            )
            await self.reset_counters()
            _, lat_b = await self.run_pairs(self.pair_b, models, 1, seconds)
            await self.reset_counters()
            _, lat_d = await self.run_pairs(self.pair_daemon, models, 1, seconds)
            p50_b, p50_d = statistics.median(lat_b), statistics.median(lat_d)
            self.report(
                f"1 router, {label}, p50",
                f"{p50_d * 1e3:.3f} ms",
                f"B {p50_b * 1e3:.3f} ms",
                f"{p50_d / p50_b:.2f}x B (target <= 1.5x)",
            )
        # What NATS itself costs: a pair through any service is two request/
        # replies, so B plus two echo round trips is the floor for the 1-router
        # figures above.
        echo = await self.echo_p50(seconds)
        floor = p50_b + 2 * echo
        self.report(
            "NATS request/reply to a bare echo service, p50",
            f"{echo * 1e3:.3f} ms",
            f"floor for a pair: B + 2 x echo = {floor * 1e3:.3f} ms",
            f"{floor / p50_b:.2f}x B",
        )

    async def floor(self) -> None:
        """One request at a time: each operation against its floor (F)."""
        print("one request at a time, against the floor", flush=True)
        await self.seed(8, 1, 4, "floor")
        async with self.pool.acquire() as conn:
            node_id = await conn.fetchval("SELECT id FROM nodes WHERE name = 'floor-1'")
            replica = await conn.fetchrow(
                "SELECT id, node_id, replica_index FROM replicas"
                " WHERE model_name = 'floor1' LIMIT 1"
            )
        await self.call("register", name="floor-bare", address="f:1")
        conn = await asyncpg.connect(self.db_url)
        echo = await self.echo_service()
        dec = {
            "node_id": replica["node_id"],
            "model": "floor1",
            "replica_index": replica["replica_index"],
        }
        # Each: (daemon request, the best statement for it). inflight_dec
        # follows its findlock so that counters stay where they were.
        cases: dict[str, tuple[dict[str, Any], Callable[[], Awaitable[Any]]]] = {
            "findlock": ({"model": "floor1"}, lambda: conn.fetchrow(PICK_B, "floor1")),
            "inflight_dec": (dec, lambda: conn.execute(DEC, replica["id"])),
            "get": ({"node_id": node_id}, lambda: conn.fetchrow(GET_ONE, node_id)),
            "register": (
                {"name": "floor-bare", "address": "f:1"},
                lambda: conn.fetchrow(REGISTER_ONE, "floor-bare", "f:1"),
            ),
        }
        timings: dict[str, tuple[list[float], list[float]]] = {op: ([], []) for op in cases}
        echoes: list[float] = []

        async def loop(step: Callable[[], Awaitable[Any]]) -> float:
            """p50 of `step` run back to back (every party stays warm)."""
            taken: list[float] = []
            until = time.monotonic() + self.args.seconds / 2
            while time.monotonic() < until or len(taken) < 50:
                started = time.perf_counter()
                if await step() is not False:  # False: an echo that waited, dropped
                    taken.append(time.perf_counter() - started)
            return statistics.median(taken)

        try:
            # Back to back first: each of the three in a loop of its own.
            echo_warm = await loop(self.echo)
            pick_warm = await loop(cases["findlock"][1])
            await self.reset_counters()
            daemon_warm = await loop(lambda: self.call("findlock", model="floor1"))
            await self.reset_counters()
        except BaseException:
            await echo()
            await conn.close()
            raise
        stop = time.monotonic() + 2 * self.args.seconds
        try:
            while time.monotonic() < stop or len(echoes) < 50:
                started = time.perf_counter()
                if await self.echo():
                    echoes.append(time.perf_counter() - started)
                for op, (request, statement) in cases.items():
                    daemon, direct = timings[op]
                    started = time.perf_counter()
                    await statement()
                    direct.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await self.call(op, **request)
                    daemon.append(time.perf_counter() - started)
        finally:
            await echo()
            await conn.close()
        e50 = statistics.median(echoes)
        self.report(
            "NATS round trip to a bare echo service, p50",
            f"{e50 * 1e3:.3f} ms",
            "-",
            f"{len(echoes)} requests",
        )
        floor_warm = echo_warm + pick_warm
        self.report(
            "1 client, findlock back to back, p50",
            f"{daemon_warm * 1e3:.3f} ms",
            f"F {floor_warm * 1e3:.3f} ms (echo {echo_warm * 1e3:.3f} + statement "
            f"{pick_warm * 1e3:.3f}, each back to back)",
            f"{daemon_warm / floor_warm:.2f}x F",
        )
        for op, (daemon, direct) in timings.items():
            d50, s50 = statistics.median(daemon), statistics.median(direct)
            self.report(
                f"1 client, {op}, p50",
                f"{d50 * 1e3:.3f} ms (p99 {quantile(daemon, 0.99) * 1e3:.3f})",
                f"F {(e50 + s50) * 1e3:.3f} ms (echo + {s50 * 1e3:.3f} statement)",
                f"{d50 / (e50 + s50):.2f}x F (target <= 1.25x)",
            )

    async def echo_service(self) -> Callable[[], Awaitable[None]]:
        """A nats-py service in another process that only echoes, on <prefix>.echo;
        returns what stops it."""
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import asyncio, sys, nats\n"
            "def note(what):\n"
            "    async def cb(*args): print('echo service:', what, *args, file=sys.stderr)\n"
            "    return cb\n"
            "async def main():\n"
            "    nc = await nats.connect(sys.argv[1], error_cb=note('error'),\n"
            "        disconnected_cb=note('disconnected'), reconnected_cb=note('reconnected'))\n"
            "    async def echo(msg): await msg.respond(msg.data)\n"
            "    await nc.subscribe(sys.argv[2], cb=echo)\n"
            "    await nc.flush(); print('ready', flush=True)\n"
            "    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)\n"
            "asyncio.run(main())\n",
            self.nats_url,
            f"{self.prefix}.echo",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None and child.stdin is not None
        assert await child.stdout.readline() == b"ready\n"
        await self.echo()

        async def stop() -> None:
            assert child.stdin is not None
            child.stdin.close()
            await child.wait()

        return stop

    async def echo(self) -> bool:
        """One request to the echo service, through the client the daemon's
        figures go through, so that both sides of a ratio pay for the same one.
        False (a sample to drop) when it had to wait for a connection of the
        echo service or of this client to come back: once in a default run
        on a busy machine, nats-server closed one of them (UnexpectedEOF)."""
        give_up = time.monotonic() + 10
        waited = False
        while True:
            try:
                await self.registry.request("echo", ECHO_BODY)
                return not waited
            except NoResponders:
                if time.monotonic() > give_up:
                    raise
                waited = True
                await asyncio.sleep(0.05)

    async def echo_p50(self, seconds: float) -> float:
        """p50 of a request to a nats-py service, in another process, that only echoes."""
        stop_echo = await self.echo_service()
        latencies = []
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.perf_counter()
            if await self.echo():
                latencies.append(time.perf_counter() - started)
        await stop_echo()
        return statistics.median(latencies)

    async def heartbeats(self) -> None:
        print("heartbeats", flush=True)
        count = self.args.nodes
        await self.seed(count, 0, 0, "hb")
        async with self.pool.acquire() as conn:
            ids = [r[0] for r in await conn.fetch("SELECT id FROM nodes WHERE name LIKE 'hb-%'")]
        seconds = self.args.seconds
        # Baseline H: one UPDATE per heartbeat, 64 at a time.
        done = 0
        stop = time.monotonic() + seconds

        async def writer(offset: int) -> None:
            nonlocal done
            i = offset
            while time.monotonic() < stop:
                async with self.pool.acquire() as conn:
                    await conn.execute(HEARTBEAT_ONE, ids[i % len(ids)], i)
                done += 1
                i += 64

        started = time.monotonic()
        await asyncio.gather(*(writer(k) for k in range(64)))
        base = done / (time.monotonic() - started)
        # The daemon: publish as fast as this process can, for as long; the
        # daemon's own statistics say how many it took in, and by when.
        before = await self.heartbeat_count()
        sent = 0
        started = time.monotonic()
        stop = started + seconds
        while time.monotonic() < stop:
            for node_id in ids:
                await self.nc.publish(
                    f"{self.prefix}.heartbeat.{node_id}", orjson.dumps({"available_vram": sent})
                )
                sent += 1
            await self.nc.flush()
        taken, last_change = before, time.monotonic()
        while time.monotonic() - last_change < 1.0:
            now_taken = await self.heartbeat_count()
            if now_taken != taken:
                taken, last_change = now_taken, time.monotonic()
            if taken - before >= sent:
                break
            await asyncio.sleep(0.1)
        absorbed = (taken - before) / (last_change - started)
        self.report(
            f"heartbeats from {count:,} nodes",
            f"{absorbed:,.0f}/s taken in",
            f"H {base:,.0f}/s",
            f"{absorbed / base:.1f}x H (targets >= 10,000/s and >= 3x); "
            f"{sent - (taken - before):,} of {sent:,} dropped by NATS as too many"
            + (" (nats-server cut the daemon off as a slow consumer)" if self.cut_off else ""),
        )
        # Then one last, known reading per node: how soon are all of them written?
        marker = 1 << 40
        for node_id in ids:
            await self.nc.publish(
                f"{self.prefix}.heartbeat.{node_id}", orjson.dumps({"available_vram": marker})
            )
        await self.nc.flush()
        published = time.monotonic()
        while True:
            async with self.pool.acquire() as conn:
                behind = await conn.fetchval(
                    "SELECT count(*) FROM nodes WHERE name LIKE 'hb-%' AND available_vram <> $1",
                    marker,
                )
            if behind == 0 or time.monotonic() - published > 30:
                break
            await asyncio.sleep(0.01)
        lag = time.monotonic() - published
        self.report(
            f"a reading from each of {count:,} nodes, all in the database",
            f"{lag:.2f} s after publishing",
            "-",
            f"{behind} not written (target: all within 1 s)",
        )

    async def heartbeat_count(self) -> int:
        # Behind a backlog of heartbeats this request waits its turn in the
        # daemon's socket like any other message. If the bench outran the
        # daemon for long enough, nats-server has cut it off as a slow consumer
        # (its buffer for the daemon was full): it reconnects by itself, and
        # its counters carry on.
        deadline = time.monotonic() + 60
        while True:
            try:
                stats = await self.endpoint_stats()
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                self.cut_off = True
                await asyncio.sleep(0.2)
        return int(stats["heartbeat"]["num_requests"])

    async def scale(self) -> None:
        print("scale", flush=True)
        # The small cluster is the findlock section's; the big one grows from it.
        await self.seed(200, 1, 4, "one")
        await self.seed(400, 200, 2, "many")
        models = ["one1"]
        await self.reset_counters()
        _, small = await self.run_pairs(self.pair_daemon, models, 1, self.args.seconds)
        async with self.pool.acquire() as conn:
            have_nodes = await conn.fetchval("SELECT count(*) FROM nodes")
            have_rows = await conn.fetchval("SELECT count(*) FROM replicas")
        grow_nodes = max(0, self.args.nodes - have_nodes)
        await self.seed(grow_nodes, 0, 0, "big")
        async with self.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO replicas (node_id, model_name, replica_index, state)
                   SELECT id, 'filler' || g, 0, 'loaded'
                     FROM nodes, generate_series(1, $1) AS g""",
                max(1, (self.args.replicas - have_rows) // max(1, self.args.nodes)),
            )
            rows = await conn.fetchval("SELECT count(*) FROM replicas")
            nodes = await conn.fetchval("SELECT count(*) FROM nodes")
            await conn.execute("ANALYZE")
        await self.reset_counters()
        _, big = await self.run_pairs(self.pair_daemon, models, 1, self.args.seconds)
        p_small, p_big = statistics.median(small), statistics.median(big)
        self.report(
            f"findlock p50 with {nodes:,} nodes, {rows:,} rows",
            f"{p_big * 1e3:.3f} ms",
            f"{p_small * 1e3:.3f} ms with {have_rows:,} rows",
            f"{p_big / p_small:.2f}x (target <= 1.3x)",
        )
        started = time.monotonic()
        after, pages, listed = None, 0, 0
        while True:
            body: dict[str, Any] = {"extras": True, "limit": 1000}
            if after:
                body["after"] = after
            msg = await self.nc.request(f"{self.prefix}.list", orjson.dumps(body), timeout=30)
            listed += len(orjson.loads(msg.data))
            pages += 1
            after = (msg.headers or {}).get("Registry-Next")
            if not after:
                break
        took = time.monotonic() - started
        self.report(
            f"list with extras of all {listed:,} nodes",
            f"{took:.2f} s in {pages} pages",
            "-",
            "target < 1 s",
        )
        rss = psutil.Process(self.daemon.pid).memory_info().rss / 2**20
        self.report("daemon resident memory", f"{rss:.0f} MB", "-", "target < 200 MB")

    async def malformed(self) -> None:
        """One router's pairs while another client sends 10,000 malformed requests."""
        print("a burst of malformed requests", flush=True)
        await self.seed(4, 1, 4, "burst")
        await self.reset_counters()
        _, quiet = await self.run_pairs(self.pair_daemon, ["burst1"], 1, self.args.seconds)

        # The burst comes from another process, as it would: sent from this
        # one, it would hold up the router being measured here too.
        count = 10_000
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import asyncio, sys; from tests.bench import burst; "
            "asyncio.run(burst(sys.argv[1], sys.argv[2], int(sys.argv[3])))",
            self.nats_url,
            self.prefix,
            str(count),
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        assert await child.stdout.readline() == b"start\n"
        during: list[float] = []
        finished = asyncio.create_task(child.stdout.readline())
        while not finished.done():
            started = time.perf_counter()
            await self.pair_daemon("burst1")
            during.append(time.perf_counter() - started)
        answered, took = (float(x) for x in (await finished).split())
        await child.wait()
        await self.reset_counters()
        _, after = await self.run_pairs(self.pair_daemon, ["burst1"], 1, self.args.seconds)
        self.report(
            f"{count:,} malformed requests from another client",
            f"{answered:,.0f} answered 400 in {took:.2f} s",
            "-",
            f"{answered / took:,.0f}/s",
        )
        for when, lat in (("during", during), ("after", after)):
            for name, q in (("p50", 0.5), ("p99", 0.99)):
                d, b = quantile(lat, q), quantile(quiet, q)
                self.report(
                    f"1 router {when} that burst, {name}",
                    f"{d * 1e3:.3f} ms ({len(lat)} pairs)",
                    f"same router before it: {b * 1e3:.3f} ms",
                    f"{d / b:.2f}x before",
                )

    async def explain(self) -> None:
        """registry.explain of one model over --nodes nodes, a page of 100."""
        print("explain", flush=True)
        count = self.args.nodes
        model = "explained"
        # A cluster in which every rule keeps some nodes out: a tenth never
        # approved, some draining, some agents, two zones, VRAM from 0 to
        # 23 GiB with some reserved, replica caps of 1 or 2, the model loaded
        # on a fifth of the nodes and ten other models on half of them.
        async with self.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO nodes (name, address, approved, status, node_type,
                                      available_vram, reserved_vram, total_vram,
                                      max_replicas_per_model)
                   SELECT 'ex-' || g, 'a:1', g % 10 <> 0,
                          CASE WHEN g % 10 = 0 THEN 'pending'
                               WHEN g % 7 = 0 THEN 'draining' ELSE 'healthy' END,
                          CASE WHEN g % 50 = 1 THEN 'agent' ELSE 'backend' END,
                          (g % 24)::bigint << 30, (g % 3)::bigint << 30, 24::bigint << 30,
                          1 + g % 2
                     FROM generate_series(1, $1) g""",
                count,
            )
            await conn.execute(
                """INSERT INTO node_labels (node_id, key, value)
                   SELECT id, 'zone', CASE WHEN hashtext(name) % 2 = 0 THEN 'eu' ELSE 'us' END
                     FROM nodes WHERE name LIKE 'ex-%'"""
            )
            await conn.execute(
                """INSERT INTO replicas (node_id, model_name, replica_index, state)
                   SELECT id, $1, 0, 'loaded' FROM nodes
                    WHERE name LIKE 'ex-%' AND hashtext(name || $1) % 5 = 0""",
                model,
            )
            await conn.execute(
                """INSERT INTO replicas (node_id, model_name, replica_index, state)
                   SELECT n.id, 'ex-other' || m, 0, 'loaded'
                     FROM nodes n, generate_series(1, 10) m
                    WHERE n.name LIKE 'ex-%' AND hashtext(n.name || m) % 2 = 0"""
            )
            nodes = await conn.fetchval("SELECT count(*) FROM nodes")
            await conn.execute("ANALYZE")
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("explain", "", {"model": model, "limit": 100}),
            (
                "explain",
                ", with a selector and min_bytes",
                {"model": model, "limit": 100, "selector": {"zone": "eu"}, "min_bytes": 8 << 30},
            ),
            ("free_slots", "", {"model": model, "limit": 100}),
        ]
        p50s = []
        for op, _, body in cases:
            latencies = await self.latencies(op, body, self.args.seconds)
            p50s.append((statistics.median(latencies), quantile(latencies, 0.99), len(latencies)))
        reply = await self.call("explain", **cases[0][2])
        print(f"  {reply['summary']}", flush=True)
        base = p50s[-1][0]
        for (_, label, _), (p50, p99, n) in zip(cases[:2], p50s[:2], strict=True):
            self.report(
                f"explain over {nodes:,} nodes{label}, a page of 100, p50",
                f"{p50 * 1e3:.1f} ms (p99 {p99 * 1e3:.1f} ms, {n} requests)",
                f"free_slots, a page of 100: {base * 1e3:.1f} ms",
                f"{p50 / base:.1f}x free_slots (target: under 1 s)",
            )

    async def latencies(self, op: str, body: dict[str, Any], seconds: float) -> list[float]:
        """Each request's latency, one after the other, for `seconds` (20 at least)."""
        latencies: list[float] = []
        stop = time.monotonic() + seconds
        while time.monotonic() < stop or len(latencies) < 20:
            started = time.perf_counter()
            await self.call(op, **body)
            latencies.append(time.perf_counter() - started)
        return latencies

    async def table(self) -> None:
        await bench_table.table(self)


def connection_notes(who: str) -> dict[str, Any]:
    """nats-py callbacks that say, on stderr, whose connection failed or came back
    (not when it closed: nats-py calls disconnected_cb on close too)."""

    def note(what: str) -> Callable[..., Awaitable[None]]:
        async def noted(*args: Any) -> None:
            print(f"{who}: {what}", *args, file=sys.stderr, flush=True)

        return noted

    return {
        "error_cb": note("error"),
        "reconnected_cb": note("reconnected"),
    }


SECTIONS = ("floor", "findlock", "heartbeats", "scale", "malformed", "explain", "table")


async def burst(url: str, prefix: str, count: int) -> None:
    """Send `count` malformed requests at once; print how many got a 400, and when."""
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    inbox = nc.new_inbox()
    answered = 0
    all_answered = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        nonlocal answered
        if msg.headers and msg.headers.get("Nats-Service-Error-Code") == "400":
            answered += 1
        if answered == count:
            all_answered.set()

    await nc.subscribe(inbox + ".*", cb=on_reply)
    print("start", flush=True)
    started = time.perf_counter()
    for i in range(count):
        op, data, _ = MALFORMED[i % len(MALFORMED)]
        await nc.publish(f"{prefix}.{op}", data, reply=f"{inbox}.{i}")
    await nc.flush()
    try:
        await asyncio.wait_for(all_answered.wait(), 60)
    finally:
        print(answered, time.perf_counter() - started, flush=True)
        await nc.close()


def batching(before: dict[str, Any], after: dict[str, Any], elapsed: float) -> str:
    """What findlock's and inflight_dec's statements carried between two STATS:
    requests a statement, time a statement, and the share of the run one was
    running. Near 100% the batches follow each other without a gap, and
    statement time, more than anything else, bounds the rate."""
    parts = []
    for name, what in (("findlock", "picks"), ("inflight_dec", "releases")):
        was, now = before[name]["data"], after[name]["data"]
        writes = now["writes"] - was["writes"]
        if not writes:
            continue
        carried = now["batched_requests"] - was["batched_requests"]
        took = (now["write_time"] - was["write_time"]) / 1e9
        parts.append(
            f"{what} {carried / writes:.1f} a statement, {took / writes * 1e3:.2f} ms each, "
            f"one running {took / elapsed:.0%} of the time"
        )
    return "; ".join(parts)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (rough figures)")
    parser.add_argument("--seconds", type=float, default=None, help="length of each run")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=100_000)
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="length of the soak (section soak)"
    )
    parser.add_argument(
        "sections",
        nargs="*",
        metavar="section",
        help=f"which to run (default all but soak): {', '.join(SECTIONS)}, soak",
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections) - {*SECTIONS, "soak"}
    if unknown:
        parser.error(f"no section {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.sections = args.sections or list(SECTIONS)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 8.0
    bench = Bench(args)
    passed = True
    with tempfile.TemporaryDirectory(prefix="registryd-bench-") as workdir:
        await bench.setup(Path(workdir))
        try:
            for n, section in enumerate(args.sections):
                if n:
                    await bench.next_section()
                if section == "soak":
                    from tests.soak import soak

                    passed = await soak(bench, args.minutes)
                else:
                    await getattr(bench, section)()
        finally:
            await bench.teardown()
    if bench.rows:  # none when the soak ran alone: it prints its own table
        print()
        print("| measured | registryd | baseline (same run) | ratio |")
        print("|---|---|---|---|")
        for row in bench.rows:
            print("| " + " | ".join(row) + " |")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
