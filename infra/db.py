"""PostgreSQL: the pool, the schema migration, and bounded waits on both.

Every wait on the database is bounded by REGISTRY_DB_TIMEOUT (acquiring a
connection, and each statement through `command_timeout`), so an unreachable
or stuck database turns into a 503 for the caller instead of a hung request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import asyncpg
import orjson

from infra.config import Settings
from infra.retry import retrying

log = logging.getLogger("registryd.db")

# pg_advisory_xact_lock key for schema changes: "registryd" in ASCII, so it is
# recognisable in pg_locks and unlikely to collide with another application.
SCHEMA_LOCK_KEY = 0x7265676973747279

DEADLOCK_RETRIES = 3

# For one transaction: its commit returns before its WAL is on disk.
SOFT_COMMIT = "SET LOCAL synchronous_commit TO off"


def schema_sql() -> str:
    return resources.files("infra").joinpath("schema.sql").read_text(encoding="utf-8")


# The schema's digest is kept in the database it was applied to, so that a
# start-up finds the schema current with one read and runs no DDL at all: a
# daemon restarting beside others that serve then takes no lock they wait on,
# and starts in 2 ms instead of 15.
APPLIED = "SELECT digest FROM registry_schema"
RECORD = """
    INSERT INTO registry_schema (only_row, digest) VALUES (true, $1)
    ON CONFLICT (only_row) DO UPDATE SET digest = EXCLUDED.digest, applied_at = now()"""


def schema_digest() -> str:
    return hashlib.sha256(schema_sql().encode()).hexdigest()


async def migrate(conn: asyncpg.Connection) -> None:
    """Apply schema.sql unless this very text was applied last; instances
    starting together queue on the advisory lock.

    A change of the schema (a new column, once) locks a table that instances
    already serving write to, and PostgreSQL may pick this transaction as the
    victim of a deadlock with one of their requests: nothing of it happened
    then, so it is applied again."""
    digest = schema_digest()
    try:
        if await conn.fetchval(APPLIED) == digest:
            return
    except asyncpg.UndefinedTableError:
        pass  # a new database, or one from before the digest was kept
    for attempt in range(1, DEADLOCK_RETRIES + 1):
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
                await conn.execute(schema_sql())
                await conn.execute(RECORD, digest)
            return
        except asyncpg.DeadlockDetectedError:
            if attempt == DEADLOCK_RETRIES:
                raise
            log.warning("schema change lost a deadlock with a request; applying it again")
            await asyncio.sleep(0.1 * attempt)


class Database:
    """The pool, with every acquire bounded so callers never wait forever."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self._releasing: set[asyncio.Task[None]] = set()

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("returning a connection to the pool failed", exc_info=task.exception())

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        # asyncio.timeout rather than acquire(timeout=): on Python 3.11 the
        # latter is wait_for, a new task for every request.
        async with asyncio.timeout(self.timeout):
            conn = await self.pool.acquire()
        try:
            yield conn
        finally:
            # asyncpg hands a connection back in a task of its own, shielded
            # from cancellation; awaiting it held every reply back by two
            # turns of the loop (45 of a lone findlock's ~200 us in the
            # daemon). It ends by itself; the pool waits for it on close.
            release = asyncio.get_running_loop().create_task(self.pool.release(conn))
            self._releasing.add(release)
            release.add_done_callback(self._released)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire(timeout=self.timeout) as conn, conn.transaction():
            yield conn

    async def _one(self, method: str, sql: str, args: tuple[Any, ...], durable: bool = True) -> Any:
        # One statement is its own transaction: when PostgreSQL picks it as the
        # victim of a deadlock (two daemons locking replica rows in different
        # orders) nothing of it happened, so running it again is safe.
        for attempt in range(1, DEADLOCK_RETRIES + 1):
            try:
                async with self.connection() as conn:
                    if durable:
                        return await getattr(conn, method)(sql, *args)
                    async with conn.transaction():
                        await conn.execute(SOFT_COMMIT)
                        return await getattr(conn, method)(sql, *args)
            except asyncpg.DeadlockDetectedError:
                if attempt == DEADLOCK_RETRIES:
                    raise
                log.info("deadlock victim, running the statement again (attempt %d)", attempt)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._one("fetch", sql, args)  # type: ignore[no-any-return]

    async def fetch_soft(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """`fetch`, committed without waiting for the WAL to reach the disk: for
        soft state only, whose last moments a crash of PostgreSQL may lose
        (three times wal_writer_delay, ~0.6 s by default) and its writer
        replaces (heartbeat readings). Three more round trips (BEGIN, SET,
        COMMIT), no fsync wait."""
        return await self._one("fetch", sql, args, durable=False)  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._one("fetchrow", sql, args)  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._one("fetchval", sql, args)

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._one("execute", sql, args)  # type: ignore[no-any-return]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), timeout=self.timeout)
        except TimeoutError:
            log.warning("database pool did not close in time; terminating its connections")
            self.pool.terminate()


async def connect(settings: Settings, *, wait: bool = True) -> Database:
    """Open the pool and apply the schema, retrying while the database is not up.

    A database that refuses our credentials or does not exist fails at once:
    retrying cannot fix it, and the operator should hear about it now.
    """

    async def open_pool() -> Database:
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=settings.db_pool_size,
            command_timeout=settings.db_timeout,
            timeout=settings.db_timeout,
            # Bounded by db_timeout; a pool connection never lives forever
            # so a failover to a standby is picked up.
            max_inactive_connection_lifetime=300,
            init=_init_connection,
            reset=_keep_session,
            # Each statement is prepared once and run thousands of times.
            # Planning it anew for each run (PostgreSQL's custom plans)
            # costs more than running it, and more as tables grow: the
            # one-pick findlock took 0.45 ms at 100,000 replica rows with
            # custom plans, 0.26 ms with its generic plan.
            server_settings={"plan_cache_mode": "force_generic_plan"},
        )
        assert pool is not None
        try:
            async with pool.acquire(timeout=settings.db_timeout) as conn:
                await migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        return Database(pool, settings.db_timeout)

    if not wait:
        return await open_pool()
    # Errors no retry will fix (a wrong password, an unknown database or role)
    # are not among these: they propagate at once.
    return await retrying(
        open_pool,
        retry_on=(
            OSError,
            TimeoutError,
            asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError,
            asyncpg.TooManyConnectionsError,
        ),
        log=log,
        what="database not reachable",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the daemon leaves no session state behind (no SET, no
    LISTEN, advisory locks only per transaction). asyncpg's default reset query
    would cost every request a second round trip to PostgreSQL; open
    transactions are still ended by asyncpg before this is called."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb arrive as Python values, not as text to parse again.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=_dumps, decoder=orjson.loads, format="text"
        )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
