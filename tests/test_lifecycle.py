"""The daemon as a process: sd_notify, graceful SIGTERM, concurrent start-up, the
CLI and --embedded. Every registryd here is a real subprocess; every wait is a
poll with a deadline, never a sleep to let things settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import psutil
import pytest
from nats.errors import NoRespondersError

from daemon import __version__, embedded
from daemon.app import Daemon
from daemon.sdnotify import Notifier
from tests.conftest import REGISTRYD, with_database
from tests.support import Client, Registryd, connect, eventually, serving

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

T = TypeVar("T")

REGISTRYD_SCRIPT = Path(sys.executable).parent / "registryd"


# ---------------------------------------------------------------- helpers


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def run(
    *args: str, env: Mapping[str, str], cwd: Path | None = None, within: float = 30.0
) -> Result:
    """Run a registryd command to completion."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {within:g}s")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def registryd(*args: str, env: Mapping[str, str], **kw: Any) -> Result:
    return await run(*REGISTRYD, *args, env=env, **kw)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="rd-") as name:
        yield Path(name)


class NotifySocket:
    """The receiving end of sd_notify, as systemd binds it for a Type=notify unit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []

    async def next(self, within: float = 15.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), within)
        except TimeoutError:
            pytest.fail(f"no sd_notify message within {within:g}s; got {self.received}")
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(message)
        return message

    async def until(self, key: str, within: float = 15.0) -> list[dict[str, str]]:
        """Messages up to and including the first one that sets `key`."""
        deadline = time.monotonic() + within
        seen = []
        while True:
            message = await self.next(max(deadline - time.monotonic(), 0.01))
            seen.append(message)
            if key in message:
                return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(short_dir / "notify")
    yield sock
    sock.close()


@pytest.fixture
async def empty_database(pg_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Create databases without the schema; dropped after the test."""
    names: list[str] = []
    admin = await asyncpg.connect(pg_url)

    async def create() -> str:
        name = f"registryd_empty_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return with_database(pg_url, name)

    try:
        yield create
    finally:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- a. sd_notify


async def test_sd_notify_ready_watchdog_stopping(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    notify_socket: NotifySocket,
) -> None:
    env = {**daemon_env, "NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"}
    daemon = await spawn(env=env)

    first = await notify_socket.next(within=30)
    assert first.get("READY") == "1", f"first message is not READY=1: {first}"
    assert first.get("MAINPID") == str(daemon.pid)
    assert daemon_env["REGISTRY_SUBJECT_PREFIX"] in first.get("STATUS", "")

    # WATCHDOG_USEC=200000: a ping every 0.1 s.
    pings = 0
    while pings < 2:
        message = await notify_socket.next(within=5)
        assert message == {"WATCHDOG": "1"}, f"unexpected message before SIGTERM: {message}"
        pings += 1

    daemon.send(signal.SIGTERM)
    after = await notify_socket.until("STOPPING", within=10)
    assert after[-1]["STOPPING"] == "1"
    assert all(m == {"WATCHDOG": "1"} for m in after[:-1]), after
    assert await daemon.exit_code() == 0, daemon.output()


def test_notifier_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*_: Any, **__: Any) -> None:
        raise AssertionError("Notifier opened a socket without NOTIFY_SOCKET")

    monkeypatch.setattr("daemon.sdnotify.socket.socket", no_socket)
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("serving")
    notifier.watchdog()
    notifier.status("busy")
    notifier.stopping()


def test_notifier_abstract_socket() -> None:
    name = f"registryd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready("serving x.*")
        lines = sock.recv(65536).decode().splitlines()
    assert lines == ["READY=1", "STATUS=serving x.*", f"MAINPID={os.getpid()}"]


def test_notifier_send_failure_is_not_fatal(short_dir: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})
    notifier.ready("serving")  # logged, not raised


def test_notifier_watchdog_interval_and_pid() -> None:
    usec = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000"}
    assert Notifier(usec).watchdog_interval == pytest.approx(0.1)
    assert Notifier({**usec, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == (
        pytest.approx(0.1)
    )
    # The watchdog is meant for another process (we were started by a wrapper).
    other = os.getppid()
    assert Notifier({**usec, "WATCHDOG_PID": str(other)}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "abc"}).watchdog_interval is None


# ---------------------------------------------------------------- b. graceful SIGTERM


async def test_sigterm_finishes_the_request_in_progress(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_url: str,
    database_url: str,
    pg: asyncpg.Connection,
    notify_socket: NotifySocket,
) -> None:
    # The blocked statement must outlive the test's steps: no 5 s statement timeout.
    env = {**daemon_env, "NOTIFY_SOCKET": str(notify_socket.path), "REGISTRY_DB_TIMEOUT": "60"}
    daemon = await spawn(env=env)
    await notify_socket.until("READY", within=30)

    nc = await connect(nats_url)
    watcher = await asyncpg.connect(database_url)
    try:
        client = Client(nc, daemon_env["REGISTRY_SUBJECT_PREFIX"], timeout=60)
        node = await client.healthy_node("gpu-1")

        lock = pg.transaction()
        await lock.start()
        try:
            await pg.execute("SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE", node["id"])
            offline = asyncio.create_task(client.call("offline", node_id=node["id"]))

            async def blocked() -> bool | None:
                # A separate connection: pg_stat_activity is a snapshot per transaction.
                waiting = await watcher.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE datname = current_database() AND wait_event_type = 'Lock'
                          AND pid <> pg_backend_pid()"""
                )
                return True if waiting else None

            await eventually(blocked, "the offline request to wait on the row lock")

            daemon.send(signal.SIGTERM)
            await notify_socket.until("STOPPING", within=10)

            # Stopping: the daemon unsubscribes and new requests find nobody, while
            # the request in progress still waits on the lock. (A request that
            # reached the daemon before its unsubscription is still answered,
            # which is what draining means; so poll until nobody answers.)
            async def refused() -> bool | None:
                try:
                    await nc.request(f"{client.prefix}.list", b"{}", timeout=5)
                except NoRespondersError:
                    return True
                return None

            await eventually(refused, "the stopping daemon to stop taking requests", 10)
            with pytest.raises(NoRespondersError):
                await nc.request(f"{client.prefix}.get", orjson.dumps(node), timeout=5)
            assert not offline.done()
            daemon.assert_running()
        finally:
            await lock.commit()

        assert await asyncio.wait_for(offline, 30) == {}
        status = await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"])
        assert status == "offline"
        assert await daemon.exit_code() == 0, daemon.output()
    finally:
        await watcher.close()
        await nc.close()


# ---------------------------------------------------------------- c. concurrent start-up


async def ping_ids(nc: Any, prefix: str, expect: int, within: float = 1.0) -> set[str]:
    """Ids of the `registry` instances serving `prefix` that answer one $SRV.PING.

    Returns as soon as `expect` of them have answered, or after `within` seconds
    with those that did.
    """
    inbox = nc.new_inbox()
    ids: set[str] = set()
    enough = asyncio.Event()

    async def collect(msg: Any) -> None:
        reply = orjson.loads(msg.data)
        if (reply.get("metadata") or {}).get("subject_prefix") == prefix:
            ids.add(reply["id"])
            if len(ids) >= expect:
                enough.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish("$SRV.PING.registry", b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), within)
    finally:
        await sub.unsubscribe()
    return set(ids)


async def test_three_daemons_start_together_on_an_empty_database(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_url: str,
    empty_database: Callable[[], Awaitable[str]],
) -> None:
    url = await empty_database()
    env = {**daemon_env, "REGISTRY_DATABASE_URL": url}
    prefix = env["REGISTRY_SUBJECT_PREFIX"]
    daemons = await asyncio.gather(*(spawn(env=env) for _ in range(3)))

    nc = await connect(nats_url)
    try:

        async def three() -> set[str] | None:
            for daemon in daemons:
                daemon.assert_running()
            ids = await ping_ids(nc, prefix, expect=3)
            return ids if len(ids) == 3 else None

        await eventually(three, "three registry instances to answer $SRV.PING", 60)
        client = Client(nc, prefix)
        node = await client.register("gpu-1")
        for _ in range(6):
            assert [n["id"] for n in await client.call("list")] == [node["id"]]
    finally:
        await nc.close()
    for daemon in daemons:
        daemon.send(signal.SIGTERM)
    for daemon in daemons:
        assert await daemon.exit_code() == 0, daemon.output()


async def test_migrate_three_times_at_once(
    daemon_env: dict[str, str], empty_database: Callable[[], Awaitable[str]]
) -> None:
    url = await empty_database()
    env = {**daemon_env, "REGISTRY_DATABASE_URL": url}
    results = await asyncio.gather(*(registryd("migrate", env=env) for _ in range(3)))
    for result in results:
        assert result.code == 0, result.stderr
    conn = await asyncpg.connect(url)
    try:
        tables = {
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
    finally:
        await conn.close()
    assert {"nodes", "replicas", "node_labels"} <= tables


# ---------------------------------------------------------------- d. the CLI


async def test_version(daemon_env: dict[str, str]) -> None:
    for command in (REGISTRYD, [str(REGISTRYD_SCRIPT)]):
        result = await run(*command, "--version", env=daemon_env)
        assert result.code == 0, result.stderr
        assert result.stdout.strip() == f"registryd {__version__}"


@pytest.mark.parametrize(
    ("override", "args", "variable"),
    [
        ({"REGISTRY_NATS_URL": "not-a-url"}, [], "REGISTRY_NATS_URL"),
        ({"REGISTRY_CHECK_INTERVAL": "-1"}, [], "REGISTRY_CHECK_INTERVAL"),
        ({"REGISTRY_LOG_FORMAT": "yaml"}, [], "REGISTRY_LOG_FORMAT"),
        ({}, ["--stale-after=abc"], "REGISTRY_STALE_AFTER"),
        ({}, ["migrate", "--db-pool-size=0"], "REGISTRY_DB_POOL_SIZE"),
        ({"REGISTRY_CHECK_INTERVAL": "-1"}, ["call", "list"], "REGISTRY_CHECK_INTERVAL"),
    ],
)
async def test_bad_setting_exits_2_with_one_line(
    daemon_env: dict[str, str], override: dict[str, str], args: list[str], variable: str
) -> None:
    result = await registryd(*args, env={**daemon_env, **override})
    assert result.code == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert result.stdout == ""


async def test_call(daemon: Daemon, daemon_env: dict[str, str], nats_url: str) -> None:
    # An in-process daemon serves; the CLI is the subprocess under test.
    env = {**daemon_env, "REGISTRY_SUBJECT_PREFIX": daemon.settings.subject_prefix}
    registered = await registryd(
        "call", "register", '{"name":"gpu-1","address":"10.0.0.5:50051"}', env=env
    )
    assert registered.code == 0, registered.stderr
    node = orjson.loads(registered.stdout)
    assert node["name"] == "gpu-1"

    listed = await registryd("call", "list", env=env)
    assert listed.code == 0, listed.stderr
    nodes = orjson.loads(listed.stdout)
    assert isinstance(nodes, list)
    assert [n["id"] for n in nodes] == [node["id"]]

    missing = await registryd("call", "approve", '{"node_id":"nope"}', env=env)
    assert missing.code == 1
    assert "404" in missing.stderr
    assert missing.stdout == ""

    bad = await registryd("call", "register", "{not json", env=env)
    assert bad.code == 1
    assert "400" in bad.stderr


async def test_call_without_a_daemon(daemon_env: dict[str, str]) -> None:
    env = {**daemon_env, "REGISTRY_SUBJECT_PREFIX": f"nobody{uuid.uuid4().hex[:8]}"}
    result = await registryd("call", "list", env=env)
    assert result.code == 1
    assert result.stdout == ""
    assert f"no registryd is serving {env['REGISTRY_SUBJECT_PREFIX']}.list" in result.stderr


async def test_call_without_nats(daemon_env: dict[str, str]) -> None:
    port = embedded.free_port()  # nothing listens there
    env = {**daemon_env, "REGISTRY_NATS_URL": f"nats://127.0.0.1:{port}"}
    result = await registryd("call", "list", env=env)
    assert result.code == 1
    assert "cannot reach NATS" in result.stderr


# ---------------------------------------------------------------- e. --embedded


async def test_embedded_smoke(
    spawn: Callable[..., Awaitable[Registryd]], daemon_env: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in daemon_env.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_STATE_DIR"] = str(state)
    daemon = await spawn("--embedded", env=env, cwd=tmp_path)

    async def answers() -> Result | None:
        daemon.assert_running()
        result = await registryd("call", "list", env=env, cwd=tmp_path)
        return result if result.code == 0 else None

    first = await eventually(answers, "the embedded daemon to answer `call list`", 60)
    assert orjson.loads(first.stdout) == []

    registered = await registryd(
        "call", "register", '{"name":"gpu-1","address":"10.0.0.5:50051"}', env=env, cwd=tmp_path
    )
    assert registered.code == 0, registered.stderr
    listed = await registryd("call", "list", env=env, cwd=tmp_path)
    assert listed.code == 0, listed.stderr
    assert [n["name"] for n in orjson.loads(listed.stdout)] == ["gpu-1"]

    # The servers it started, to check they are gone afterwards.
    state_file = state / embedded.STATE_FILE
    nats_url = orjson.loads(state_file.read_text())["nats_url"]
    pid_file = state / "postgres" / "postmaster.pid"
    postgres_pid = int(pid_file.read_text().splitlines()[0])
    children = psutil.Process(daemon.pid).children()
    nats_pids = [c.pid for c in children if c.name() == "nats-server"]
    assert len(nats_pids) == 1, children
    assert alive(postgres_pid)

    daemon.send(signal.SIGINT)
    assert await daemon.exit_code(60) == 0, daemon.output()
    assert not state_file.exists()
    assert not pid_file.exists()
    assert not alive(nats_pids[0])
    assert not alive(postgres_pid)
    host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass
    assert processes_using(state) == []
    # A client started now no longer finds it through embedded.json.
    gone = await registryd("call", "list", "--timeout=2", env=env, cwd=tmp_path)
    assert gone.code == 1


def processes_using(directory: Path) -> list[psutil.Process]:
    """Live processes whose command line names `directory` (our servers do)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(directory) in arg for arg in proc.info["cmdline"] or ()) and alive(proc.pid):
                found.append(proc)
    return found


async def test_embedded_interrupted_while_starting(
    spawn: Callable[..., Awaitable[Registryd]], daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """Ctrl-C during initdb: the servers still come up, and are then stopped."""
    state = tmp_path / "state"
    env = {k: v for k, v in daemon_env.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_STATE_DIR"] = str(state)
    daemon = await spawn("--embedded", env=env, cwd=tmp_path)

    async def starting() -> bool | None:
        daemon.assert_running()
        return True if (state / "postgres").exists() else None

    await eventually(starting, "the embedded PostgreSQL to be initialised", 30)
    daemon.send(signal.SIGINT)
    try:
        assert await daemon.exit_code(60) == 0, daemon.output()
        assert "serving" not in daemon.output(), "the signal came too late to test start-up"
        assert not (state / embedded.STATE_FILE).exists()
        assert not (state / "postgres" / "postmaster.pid").exists()
        leftovers = processes_using(state)
        assert leftovers == [], leftovers
    finally:
        for orphan in processes_using(state):  # only when the test failed
            orphan.terminate()


async def test_json_logs_are_one_object_per_line_with_the_facts_as_fields(
    spawn: Callable[..., Awaitable[Registryd]], daemon_env: dict[str, str], nats_url: str
) -> None:
    env = daemon_env | {"REGISTRY_LOG_FORMAT": "json"}
    daemon = await spawn(env=env)
    nc = await connect(nats_url)
    client = Client(nc, env["REGISTRY_SUBJECT_PREFIX"])
    try:
        assert await serving(client, daemon) == []
        node = await client.register("gpu-1")
        await client.call("approve", node_id=node["id"])
    finally:
        await nc.close()
    daemon.send(signal.SIGTERM)
    assert await daemon.exit_code() == 0
    lines = [orjson.loads(line) for line in daemon.output().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    approved = [line for line in lines if line.get("reason") == "approved"]
    assert len(approved) == 1
    assert approved[0]["node_id"] == node["id"] and approved[0]["status"] == "healthy"
    assert approved[0]["previous_status"] == "pending"
