"""The admin commands (`registryd nodes`, `node`, `models`, `intents`,
`approve`, `drain`, `deregister`, `status`, `metrics`) against a real daemon:
as tables, in a pseudo-terminal and not, and as --json."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import struct
import sys
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from daemon import cli as registryd_cli
from daemon.app import Daemon
from registryd import Registry, TooLarge, admin
from tests.support import connect, eventually

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

GiB = 2**30
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def registry(daemon: Daemon, nc: NATS) -> Registry:
    return Registry(nc, daemon.settings.subject_prefix)


Run = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[[Daemon], Run]:
    """`registryd ARGS` in this process (in a thread: it runs its own event
    loop), with a daemon's NATS and prefix: exit code, stdout, stderr."""

    def against(daemon: Daemon) -> Run:
        async def run_(*args: str) -> tuple[int, str, str]:
            capsys.readouterr()
            flags = [
                f"--nats-url={daemon.settings.nats_url}",
                f"--subject-prefix={daemon.settings.subject_prefix}",
            ]

            def main() -> int:
                try:
                    return registryd_cli.main([args[0], *flags, *args[1:]])
                except SystemExit as exc:  # argparse's exit 2
                    return int(exc.code or 0)

            code = await asyncio.to_thread(main)
            out, err = capsys.readouterr()
            return code, out, err

        return run_

    return against


@pytest.fixture
def run(daemon: Daemon, cli: Callable[[Daemon], Run]) -> Run:
    return cli(daemon)


async def cluster(registry: Registry) -> dict[str, str]:
    """gpu-a healthy with two replicas, gpu-b pending with an intent, gpu-c draining."""
    a = await registry.register(
        "gpu-a",
        address="a:1",
        total_vram=24 * GiB,
        available_vram=18 * GiB,
        labels={"zone": "eu", "engine": "vllm"},
    )
    await registry.approve(a.id)
    await registry.replica_set(a.id, "qwen3-8b", state="loaded", address="a:8000")
    await registry.replica_set(a.id, "qwen3-8b", 1, state="loaded", address="a:8001")
    await registry.findlock("qwen3-8b")
    b = await registry.register("gpu-b", address="b:1", labels={"zone": "us"})
    await registry.backend_op(b.id, "llama-cpp", "install")
    c = await registry.register("gpu-c", address="c:1")
    await registry.approve(c.id)
    await registry.drain(c.id)
    return {"gpu-a": a.id, "gpu-b": b.id, "gpu-c": c.id}


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


async def test_nodes_as_a_table_filtered_and_as_json(registry: Registry, run: Run) -> None:
    await cluster(registry)
    code, out, err = await run("nodes")
    assert code == 0, err
    table = rows(out)
    assert table[0] == [
        "NAME",
        "STATUS",
        "VRAM",
        "FREE/TOTAL",
        "REPLICAS",
        "IN-FLIGHT",
        "HEARTBEAT",
        "LABELS",
    ]
    assert [r[:2] for r in table[1:]] == [
        ["gpu-a", "healthy"],
        ["gpu-b", "pending"],
        ["gpu-c", "draining"],
    ]
    a = table[1]
    assert a[2:5] == ["18.0/24.0", "GiB", "2"] and a[5] == "1"
    assert re.fullmatch(r"\d+s", a[6])
    assert a[7].startswith("engine=vllm,zone=eu")
    assert "\x1b[" not in out  # not a terminal: no colour

    code, out, _ = await run("nodes", "--status", "pending", "--status", "draining")
    assert [r[0] for r in rows(out)[1:]] == ["gpu-b", "gpu-c"]
    code, out, _ = await run("nodes", "--label", "zone=eu")
    assert [r[0] for r in rows(out)[1:]] == ["gpu-a"]

    code, out, _ = await run("nodes", "--json")
    listed = orjson.loads(out)
    assert code == 0 and [n["name"] for n in listed] == ["gpu-a", "gpu-b", "gpu-c"]
    assert listed[0]["labels"]["zone"] == "eu" and listed[0]["in_flight_count"] == 1


async def test_one_node_in_full(registry: Registry, run: Run) -> None:
    ids = await cluster(registry)
    code, out, err = await run("node", "gpu-a")
    assert code == 0, err
    assert out.splitlines()[0] == "gpu-a"
    assert ids["gpu-a"] in out and "18.0/24.0 GiB" in out
    assert "  zone=eu" in out and "  engine=vllm" in out
    replica_rows = [r for r in rows(out) if r and r[0] == "qwen3-8b"]
    assert [r[1:3] for r in replica_rows] == [["0", "loaded"], ["1", "loaded"]]

    code, out, _ = await run("node", ids["gpu-b"])  # by id
    assert code == 0 and out.splitlines()[0] == "gpu-b"
    assert any(r[1:4] == ["llama-cpp", "install", "0"] for r in rows(out))

    code, out, _ = await run("node", "gpu-b", "--json")
    detail = orjson.loads(out)
    assert detail["node"]["id"] == ids["gpu-b"] and detail["replicas"] == []
    assert [i["backend"] for i in detail["intents"]] == ["llama-cpp"]

    code, out, err = await run("node", "nope")
    assert code == 1 and out == "" and err.startswith("error 404: ")


async def test_models_and_intents(registry: Registry, run: Run) -> None:
    ids = await cluster(registry)
    code, out, err = await run("models")
    assert code == 0, err
    assert rows(out) == [
        ["MODEL", "REPLICAS", "NODES", "IN-FLIGHT", "ON"],
        ["qwen3-8b", "2", "1", "1", "gpu-a"],
    ]
    code, out, _ = await run("models", "--json")
    assert orjson.loads(out) == [
        {"model": "qwen3-8b", "replicas": 2, "nodes": ["gpu-a"], "in_flight": 1}
    ]

    code, out, err = await run("intents")
    assert code == 0, err
    table = rows(out)
    assert table[0][:5] == ["ID", "NODE", "BACKEND", "OP", "ATTEMPTS"]
    assert table[1][1:6] == ["gpu-b", "llama-cpp", "install", "0", "queued"]
    code, out, _ = await run("intents", "--json")
    assert [(i["node_id"], i["dead"]) for i in orjson.loads(out)] == [(ids["gpu-b"], False)]


async def test_a_dead_intent_is_listed_with_dead(
    start_daemon: Callable[..., Awaitable[Daemon]], nc: NATS, cli: Callable[[Daemon], Run]
) -> None:
    # A daemon that gives up after one attempt, and the only one delivering.
    fast = await start_daemon(max_attempts=1, drain_interval=0.2, backoff_base=0.1)
    run = cli(fast)
    registry = Registry(nc, fast.settings.subject_prefix)
    node = await registry.register("gpu-x", address="x:1")
    await registry.approve(node.id)  # healthy: delivered, and nobody answers
    await registry.backend_op(node.id, "vllm", "install")

    async def dead() -> bool | None:
        return any([i.dead async for i in registry.backend_ops(dead=True)]) or None

    await eventually(dead, "the intent to be abandoned")
    code, out, _ = await run("intents")
    assert code == 0 and rows(out)[1:] == []
    code, out, _ = await run("intents", "--dead")
    assert rows(out)[1][1:6] == ["gpu-x", "vllm", "install", "1", "dead"]


async def test_approve_drain_deregister(registry: Registry, run: Run) -> None:
    ids = await cluster(registry)
    code, out, err = await run("approve", "gpu-b")
    assert code == 0, err
    assert out == f"gpu-b ({ids['gpu-b']}) approved: healthy\n"
    code, _, err = await run("approve", "gpu-b")
    assert code == 1 and err.startswith("error 409: ")

    code, out, _ = await run("drain", ids["gpu-a"])
    assert code == 0 and "draining" in out
    assert (await registry.get(ids["gpu-a"])).status == "draining"

    await registry.auth_refs(ids["gpu-c"], auth_user_id="u-7", api_key_id="k-7")
    code, out, _ = await run("deregister", "gpu-c", "--json")
    assert code == 0 and orjson.loads(out) == {
        "auth_refs": {"auth_user_id": "u-7", "api_key_id": "k-7"}
    }
    code, out, _ = await run("nodes", "--json")
    assert [n["name"] for n in orjson.loads(out)] == ["gpu-a", "gpu-b"]
    code, _, err = await run("deregister", "gpu-c")
    assert code == 1 and "404" in err

    # Bad usage and bad settings are 2, as for every registryd command.
    assert (await run("approve"))[0] == 2
    assert (await run("nodes", "--status", "sleepy"))[0] == 2
    code, _, err = await run("nodes", "--log-level=loud")
    assert code == 2 and "REGISTRY_LOG_LEVEL" in err
    # A setting of the daemon's, not a client's, is no flag of a command.
    code, _, err = await run("nodes", "--check-interval=-1")
    assert code == 2 and "unrecognized arguments: --check-interval" in err
    # No NATS there, and no daemon on that prefix: 1, and why.
    code, _, err = await run("nodes", "--nats-url=nats://127.0.0.1:1")
    assert code == 1 and err.startswith("registryd: cannot reach NATS at nats://127.0.0.1:1")
    code, _, err = await run("nodes", "--subject-prefix=nobody-serves-this")
    assert code == 1 and err == "registryd: no registryd is serving nobody-serves-this.*\n"


async def test_status_and_metrics_of_two_instances(
    daemon: Daemon,
    start_daemon: Callable[..., Awaitable[Daemon]],
    registry: Registry,
    run: Run,
    tmp_path: Path,
) -> None:
    second = await start_daemon()  # a second instance on the same prefix
    await cluster(registry)
    code, out, err = await run("status", "--json", "--wait=0.3")
    assert code == 0, err
    status = orjson.loads(out)
    assert len(status["instances"]) == 2
    assert daemon.service is not None and second.service is not None
    assert {i["id"] for i in status["instances"]} == {daemon.service.id, second.service.id}
    assert sum(i["requests"] for i in status["instances"]) > 0
    assert status["nodes"]["healthy"] == 1 and status["nodes"]["pending"] == 1
    assert status["nodes"]["draining"] == 1
    assert status["replicas_loaded"] == 2 and status["in_flight"] == 1
    assert status["intents"] == {"pending": 1, "dead": 0}
    assert 0 <= status["oldest_healthy_heartbeat_s"] < 60
    # cluster()'s one findlock went to the database as one batched write.
    findlocks = [e for i in status["instances"] for e in i["endpoints"] if e["name"] == "findlock"]
    assert sum(e["batched"] for e in findlocks) == 1 and sum(e["writes"] for e in findlocks) == 1
    assert sum(e["write_s"] for e in findlocks) > 0

    code, out, _ = await run("status", "--wait=0.3")
    text = out.splitlines()
    assert text[0].startswith("2 instances of registry")
    assert "nodes     3: 1 pending, 1 healthy, 1 draining" in out
    assert "replicas  2 loaded, 1 request in flight" in out
    assert "intents   1 pending, 0 dead" in out

    code, out, _ = await run("metrics", "--wait=0.3")
    assert code == 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(out)
        for s in family.samples
    }
    assert samples[("registryd_instances", ())] == 2
    assert samples[("registryd_nodes", (("status", "healthy"),))] == 1
    assert samples[("registryd_replicas_loaded", ())] == 2
    assert samples[("registryd_intents", (("state", "pending"),))] == 1
    assert any(
        name == "registryd_requests_total" and value > 0 for (name, _), value in samples.items()
    )
    batched = {
        dict(labels)["endpoint"]: value
        for (name, labels), value in samples.items()
        if name == "registryd_batched_requests_total"
    }
    assert batched == {"findlock": 1}

    prom = tmp_path / "registryd.prom"
    code, out, _ = await run("metrics", "--wait=0.3", f"--output={prom}")
    assert code == 0 and out == "" and "registryd_instances 2.0" in prom.read_text()


def test_status_says_how_many_requests_a_batched_statement_carried() -> None:
    taken = datetime.now(UTC)
    endpoints = [
        admin.Endpoint("findlock", 900, 0, 0.002, 1.8, writes=100, batched=880, write_s=0.15),
        admin.Endpoint("get", 50, 1, 0.001, 0.05),
    ]
    snap = admin.Snapshot(
        taken, "registry", [admin.Instance("i1", "1", taken, endpoints)], {}, 0, 0, 0, 0, None
    )
    lines = [line.split() for line in admin.status_text(snap, colour=False)]
    assert [
        "findlock",
        "900",
        "avg",
        "2.00",
        "ms",
        "8.8",
        "a",
        "statement,",
        "avg",
        "1.50",
        "ms",
        "each",
    ] in lines
    assert ["get", "50", "avg", "1.00", "ms"] in lines


async def test_ten_thousand_nodes_print_page_by_page(
    registry: Registry, run: Run, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        """INSERT INTO nodes (name, address, status, approved, total_vram, available_vram)
           SELECT 'node-' || lpad(i::text, 5, '0'), 'n' || i || ':1', 'healthy', true,
                  25769803776, 12884901888
             FROM generate_series(1, 10000) AS i"""
    )
    with pytest.raises(TooLarge):  # all at once would be over the payload limit
        await registry.list_page(extras=True)
    code, out, err = await run("nodes")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 10_001 and lines[-1].startswith("node-10000  healthy")
    code, out, _ = await run("nodes", "--json")
    assert len(orjson.loads(out)) == 10_000


# ---------------------------------------------------------------- a terminal


REGISTRYD = [sys.executable, "-m", "daemon"]


async def in_terminal(args: list[str], env: dict[str, str], columns: int) -> str:
    """What `registryd ARGS` writes to a pseudo-terminal `columns` wide."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = await asyncio.create_subprocess_exec(
        *REGISTRYD, *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    try:
        output = await asyncio.to_thread(read_all)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, output
    finally:
        with contextlib.suppress(OSError):
            os.close(master)
    return output.decode().replace("\r\n", "\n")


async def in_a_pipe(args: list[str], env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *REGISTRYD,
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    return out.decode()


async def test_colour_in_a_terminal_only_and_tables_fit_its_width(
    daemon: Daemon, registry: Registry, daemon_env: dict[str, str]
) -> None:
    await cluster(registry)
    node = await registry.get(name="gpu-a")
    await registry.labels_set(node.id, {f"label-{i}": "a-rather-long-value" for i in range(8)})
    env = {k: v for k, v in daemon_env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["REGISTRY_SUBJECT_PREFIX"] = daemon.settings.subject_prefix

    out = await in_terminal(["nodes"], env, columns=90)
    assert "\x1b[32mhealthy\x1b[0m" in out  # green
    assert "\x1b[33mpending\x1b[0m" in out and "\x1b[33mdraining\x1b[0m" in out  # yellow
    plain = ANSI.sub("", out)
    assert all(len(line) <= 90 for line in plain.splitlines()), plain
    gpu_a = next(line for line in plain.splitlines() if line.startswith("gpu-a "))
    assert len(gpu_a) == 90 and "label-0=a-rather" in gpu_a and gpu_a.endswith("…")
    # Colour codes do not move the columns: the plain text is aligned.
    header, first = plain.splitlines()[:2]
    assert first.index("healthy") == header.index("STATUS")

    out = await in_terminal(["nodes"], env | {"NO_COLOR": "1"}, columns=90)
    assert "\x1b[" not in out and "healthy" in out

    out = await in_a_pipe(["nodes"], env | {"COLUMNS": "80"})  # as a shell exports it
    assert "\x1b[" not in out and "healthy" in out
    assert max(len(line) for line in out.splitlines()) == 80, out
    out = await in_a_pipe(["status", "--wait=0.2"], env)
    assert "\x1b[" not in out and "1 healthy" in out

    out = await in_terminal(["status", "--wait=0.2"], env, columns=90)
    assert "\x1b[32m1 healthy\x1b[0m" in out
