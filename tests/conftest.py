"""Real PostgreSQL and a real nats-server with JetStream, never mocks.

Where REGISTRY_TEST_DATABASE_URL / REGISTRY_TEST_NATS_URL are given, the suite
uses those servers; otherwise it starts throwaway ones from the same wheels as
`registryd --embedded`. Either way each run is isolated: its own template
database (schema applied once), a copy of it for every test (emptied and
reused by the next one), and a subject prefix and stream of its own for every
daemon (deleted after the test).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from daemon import embedded
from daemon.app import Daemon
from infra import config, db
from tests.support import Client, Proxy, Registryd, connect

RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def unix_socket_of(url: str) -> str | None:
    """The socket path of a DSN such as postgresql://u@/db?host=/run/pg (or None)."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{parts.port or 5432}"
    return None


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: it prunes the base directories of older sessions,
    # which pulls the ground from under a second test run going on at once.
    path = Path(tempfile.mkdtemp(prefix="registryd-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_url(servers_dir: Path) -> Iterator[str]:
    given = os.environ.get("REGISTRY_TEST_NATS_URL")
    if given:
        yield given
        return
    server = embedded.start_nats(servers_dir / "nats")
    yield server.url
    server.stop()


@pytest.fixture
def nats_with(tmp_path: Path) -> Iterator[Callable[[str], embedded.NatsServer]]:
    """Start nats-servers of this test with a config file; all stopped after it."""
    started: list[embedded.NatsServer] = []

    def start(config: str) -> embedded.NatsServer:
        directory = tmp_path / f"nats-{len(started)}"
        directory.mkdir()
        conf = directory / "nats.conf"
        conf.write_text(config)
        # -c goes with start_nats's own flags: loopback, a free port, JetStream.
        server = embedded.start_nats(directory, extra_args=["-c", str(conf)])
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(servers_dir: Path) -> Iterator[str]:
    given = os.environ.get("REGISTRY_TEST_DATABASE_URL")
    if given:
        yield given
        return
    server = embedded.start_postgres(servers_dir / "postgres")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
async def template_db(pg_url: str) -> AsyncIterator[str]:
    name = f"registryd_tpl_{RUN_ID}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(pg_url, name))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# The schema of a database as its catalog has it: columns, indexes,
# constraints, triggers and the digest of the schema.sql applied.
SHAPE = """
    SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
        SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || a.attnotnull AS x
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         WHERE c.relnamespace = current_schema()::regnamespace
           AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()
        UNION ALL SELECT conname || pg_get_constraintdef(oid) FROM pg_constraint
                   WHERE connamespace = current_schema()::regnamespace
        UNION ALL SELECT tgname FROM pg_trigger WHERE NOT tgisinternal
        UNION ALL SELECT digest FROM registry_schema) s"""


class Databases:
    """Copies of the template database, emptied and handed to the next test.

    CREATE DATABASE and DROP DATABASE cost 0.14 s a test, most of a short
    test's time. A copy a test is done with is emptied instead: its other
    connections are cut (a daemon's pool, a proxy's), and a DELETE of every
    table of the template's schema, in one round trip, takes under 1 ms
    (TRUNCATE takes 10: it makes new files). A copy whose schema is no longer
    the template's (a test renamed a table or dropped a column and did not put
    it back) is dropped, not reused: its catalog's fingerprint tells."""

    def __init__(self, pg_url: str, template: str, admin: asyncpg.Connection) -> None:
        self.pg_url, self.template, self.admin = pg_url, template, admin
        self.free: list[tuple[str, asyncpg.Connection]] = []
        self.empty = ""
        self.shape = ""

    async def take(self) -> tuple[str, asyncpg.Connection]:
        if self.free:
            return self.free.pop()
        name = f"registryd_{RUN_ID}_{next(_counter)}"
        await self.admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        keeper = await asyncpg.connect(with_database(self.pg_url, name))
        if not self.empty:
            rows = await keeper.fetch(
                "SELECT quote_ident(tablename) AS t FROM pg_tables"
                " WHERE schemaname = current_schema() AND tablename <> 'registry_schema'"
                " ORDER BY 1"
            )
            self.empty = "; ".join(f"DELETE FROM {r['t']}" for r in rows)
            self.shape = await keeper.fetchval(SHAPE)
        return name, keeper

    async def give_back(self, name: str, keeper: asyncpg.Connection) -> None:
        try:
            await self.admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> $2",
                name,
                keeper.get_server_pid(),
            )
            await keeper.execute(self.empty)
            intact = await keeper.fetchval(SHAPE) == self.shape
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            intact = False
        if intact:
            self.free.append((name, keeper))
        else:
            await self.drop(name, keeper)

    async def drop(self, name: str, keeper: asyncpg.Connection) -> None:
        keeper.terminate()
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def close(self) -> None:
        while self.free:
            await self.drop(*self.free.pop())


@pytest.fixture(scope="session")
async def databases(pg_url: str, template_db: str) -> AsyncIterator[Databases]:
    admin = await asyncpg.connect(pg_url)
    pool = Databases(pg_url, template_db, admin)
    try:
        yield pool
    finally:
        await pool.close()
        await admin.close()


@pytest.fixture
async def database_url(pg_url: str, databases: Databases) -> AsyncIterator[str]:
    """An empty database with the schema, this test's alone while it runs."""
    name, keeper = await databases.take()
    try:
        yield with_database(pg_url, name)
    finally:
        await databases.give_back(name, keeper)


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to this test's database, to look behind the daemon."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


class Streams:
    """Deletes the JetStream streams of a test's daemons once it is over, so
    a run leaves nothing behind on a nats-server that outlives it."""

    def __init__(self, nc: NATS) -> None:
        self.js = nc.jetstream()

    async def delete(self, name: str) -> None:
        try:
            await self.js.delete_stream(name)
        except nats.js.errors.NotFoundError:
            pass  # never created, or on a server of the test's own


@pytest.fixture(scope="session")
async def streams(nats_url: str) -> AsyncIterator[Streams]:
    nc = await connect(nats_url)
    yield Streams(nc)
    await nc.close()


@pytest.fixture
async def settings_for(
    nats_url: str, database_url: str, streams: Streams
) -> AsyncIterator[Callable[..., config.Settings]]:
    """Settings of a daemon of this test: its own subject prefix and stream."""
    test_id = f"t{RUN_ID}{next(_counter)}"

    def make(**overrides: Any) -> config.Settings:
        values: dict[str, Any] = {
            "nats_url": nats_url,
            "database_url": database_url,
            "subject_prefix": test_id,
            "stream": f"REGISTRY_{test_id}",
            "db_timeout": 3.0,
        }
        values.update(overrides)
        return config.Settings.model_validate(values)

    yield make
    await streams.delete(f"REGISTRY_{test_id}")


@pytest.fixture
async def start_daemon(
    settings_for: Callable[..., config.Settings],
) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """Start in-process daemons with setting overrides; all stopped after the test."""
    daemons: list[Daemon] = []

    async def start(**overrides: Any) -> Daemon:
        daemon = Daemon(settings_for(**overrides), env={})
        daemons.append(daemon)
        await daemon.start()
        return daemon

    yield start
    for daemon in reversed(daemons):
        await daemon.stop(grace=5)


@pytest.fixture
async def daemon(start_daemon: Callable[..., Awaitable[Daemon]]) -> Daemon:
    return await start_daemon()


@pytest.fixture
async def client(daemon: Daemon, nats_url: str) -> AsyncIterator[Client]:
    nc = await connect(nats_url)
    yield Client(nc, daemon.settings.subject_prefix)
    await nc.close()


@pytest.fixture
async def clients(nats_url: str) -> AsyncIterator[Callable[[Daemon], Awaitable[Client]]]:
    """Clients for daemons a test starts itself (start_daemon); closed after it."""
    conns = []

    async def make(daemon: Daemon) -> Client:
        nc = await connect(nats_url)
        conns.append(nc)
        return Client(nc, daemon.settings.subject_prefix)

    yield make
    for nc in conns:
        await nc.close()


@pytest.fixture
async def daemon_env(
    nats_url: str, database_url: str, streams: Streams
) -> AsyncIterator[dict[str, str]]:
    """Environment for a registryd subprocess of this test."""
    test_id = f"t{RUN_ID}{next(_counter)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(
        REGISTRY_NATS_URL=nats_url,
        REGISTRY_DATABASE_URL=database_url,
        REGISTRY_SUBJECT_PREFIX=test_id,
        REGISTRY_STREAM=f"REGISTRY_{test_id}",
        REGISTRY_STATE_DIR=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"registryd-{test_id}"),
    )
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    yield env
    await streams.delete(f"REGISTRY_{test_id}")


REGISTRYD = [sys.executable, "-m", "daemon"]


@pytest.fixture
async def spawn(
    tmp_path: Path, database_url: str, nats_url: str, daemon_env: dict[str, str]
) -> AsyncIterator[Callable[..., Awaitable[Registryd]]]:
    """Start registryd subprocesses; any still running at the end are stopped.

    It asks for the test's database, NATS and daemon_env so that pytest stops
    the daemons before it empties the one and deletes the stream on the other
    (teardown runs in reverse order of set-up)."""
    started: list[Registryd] = []
    numbers = itertools.count()  # taken before any await: starts may overlap

    async def start(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> Registryd:
        log = tmp_path / f"registryd-{next(numbers)}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *REGISTRYD,
                *args,
                env=dict(env),
                cwd=cwd or tmp_path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        daemon = Registryd(proc, log)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.running:
            # SIGTERM, not SIGKILL: an --embedded daemon stops its servers then.
            daemon.send(signal.SIGTERM)
            try:
                await asyncio.wait_for(daemon.proc.wait(), 30)
            except TimeoutError:
                daemon.proc.kill()
                await daemon.proc.wait()


def through(url: str, port: int) -> str:
    """The same database, reached over TCP on 127.0.0.1:port (the proxy)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    auth = user + (f":{parts.password}" if parts.password else "")
    return urlunsplit(("postgresql", f"{auth}@127.0.0.1:{port}", parts.path, "", ""))


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[Proxy]:
    """A TCP proxy in front of this test's database, to cut it and restore it."""
    parts = urlsplit(database_url)
    proxy = Proxy(
        unix_socket_of(database_url) or (parts.hostname or "127.0.0.1", parts.port or 5432)
    )
    await proxy.start()
    yield proxy
    await proxy.close()
