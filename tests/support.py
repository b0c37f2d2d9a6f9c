"""Helpers the tests share: a NATS client for the registry, and a cuttable TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from daemon.delivery import sanitize
from infra.wire import ERROR_CODE_HEADER, ERROR_HEADER, NEXT_HEADER

# What a broken or hostile client sends, at the operations routers and workers
# use most, and a word the 400's message must hold (the field, or what is wrong).
MALFORMED: list[tuple[str, bytes, str]] = [
    ("findlock", b"{", "not valid JSON"),
    ("findlock", b"[]", "JSON object"),
    ("findlock", b'{"model": 5}', "'model'"),
    ("findlock", b'{"model": "m", "lease_s": -1}', "'lease_s'"),
    ("register", b'{"name": "a\\u0000b", "address": "x:1"}', "'name'"),
    ("register", b'{"address": "x:1"}', "'name'"),
    ("get", b'{"node_id": 7}', "'node_id'"),
    ("inflight_dec", b'{"node_id": null}', "'lease_id'"),
    ("list", b"\xff\xfe", "not valid JSON"),
    ("findlock", b'{"model": "m", "node_ids": "gpu-1"}', "'node_ids'"),
]


class CallError(Exception):
    """An error reply: the code and message from the headers, and the JSON body."""

    def __init__(self, code: int, message: str, body: dict[str, Any], headers: dict[str, str]):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.body = body
        self.headers = headers


@dataclass
class Client:
    """Talks to one registryd the way a router, worker or admin would."""

    nc: NATS
    prefix: str
    timeout: float = 10.0

    async def raw(self, op: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
        return await self.nc.request(
            f"{self.prefix}.{op}", data, timeout=self.timeout, headers=headers
        )

    async def call(self, op: str, body: Any = None, /, **fields: Any) -> Any:
        """Send a request; the parsed reply, or CallError for an error reply."""
        if body is None:
            body = fields
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        reply = await self.raw(op, data)
        return parse(reply)

    async def call_with_headers(self, op: str, /, **fields: Any) -> tuple[Any, dict[str, str]]:
        reply = await self.raw(op, orjson.dumps(fields))
        return parse(reply), dict(reply.headers or {})

    async def register(self, name: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("address", f"{name}.local:50051")
        return await self.call("register", name=name, **fields)

    async def healthy_node(self, name: str, **fields: Any) -> dict[str, Any]:
        """A registered and approved backend node."""
        node = await self.register(name, **fields)
        if node["status"] == "pending":
            node = await self.call("approve", node_id=node["id"])
        return node

    async def replica(
        self, node: dict[str, Any] | str, model: str = "m", index: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """Record a replica (loaded, unless `state` says otherwise) on a node."""
        fields.setdefault("state", "loaded")
        node_id = node if isinstance(node, str) else node["id"]
        return await self.call(
            "replica_set", node_id=node_id, model=model, replica_index=index, **fields
        )

    async def publish(self, subject: str, body: Any) -> None:
        await self.nc.publish(f"{self.prefix}.{subject}", orjson.dumps(body))
        await self.nc.flush()

    async def listen(self, subject: str) -> Listener:
        listener = Listener()
        listener.sub = await self.nc.subscribe(subject, cb=listener.put)
        await self.nc.flush()
        return listener


async def every_page(client: Client, op: str, /, **fields: Any) -> list[list[Any]]:
    """Each page of a list operation, following Registry-Next to the end."""
    pages: list[list[Any]] = []
    while True:
        items, headers = await client.call_with_headers(op, **fields)
        pages.append(items)
        if NEXT_HEADER not in headers:
            return pages
        assert len(pages) < 10, "paging does not end"
        fields["after"] = headers[NEXT_HEADER]


def parse(reply: Msg) -> Any:
    headers = dict(reply.headers or {})
    body = orjson.loads(reply.data) if reply.data else None
    if ERROR_CODE_HEADER in headers:
        raise CallError(int(headers[ERROR_CODE_HEADER]), headers[ERROR_HEADER], body, headers)
    return body


@dataclass
class Listener:
    """Collects the events published on one subject."""

    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    sub: Any = None

    async def put(self, msg: Msg) -> None:
        await self.queue.put((msg.subject, orjson.loads(msg.data)))

    async def next(self, timeout: float = 5.0) -> tuple[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def collect(self, count: int, timeout: float = 5.0) -> list[Any]:
        return [(await self.next(timeout))[1] for _ in range(count)]

    async def drained(self, nc: NATS) -> list[Any]:
        """Everything received so far, after a round trip that flushes in-flight events."""
        await nc.flush()
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait()[1])
        return items


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = 30.0) -> Any:
    """Poll `check` until it returns something other than None or False, or
    fail after `within` seconds: the one way the tests wait for a condition."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def fails(call: Awaitable[Any], code: int, *words: str) -> CallError:
    """Await a call that must fail with `code`; its message must contain `words`."""
    with pytest.raises(CallError) as info:
        await call
    err = info.value
    assert err.code == code, err
    assert err.body["error"]["code"] == code
    assert err.body["error"]["message"] == err.message
    for word in words:
        assert word in err.message, f"{word!r} not in {err.message!r}"
    return err


async def next_for(listener: Listener, node_id: str, timeout: float = 5.0) -> tuple[str, Any]:
    """The next event about `node_id` (events about other nodes are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        subject, body = await listener.next(max(0.01, deadline - time.monotonic()))
        if body.get("node_id") == node_id:
            return subject, body


async def drained_for(listener: Listener, client: Client, *node_ids: str) -> list[Any]:
    """Events about `node_ids` received so far, after a flushing round trip
    (the invalidation subject is global, so other nodes' events are ignored)."""
    return [e for e in await listener.drained(client.nc) if e.get("node_id") in node_ids]


async def add_cooldowns(pg: asyncpg.Connection, *models: str) -> None:
    """Scheduling configs in cooldown, as the reconciler leaves them."""
    for model in models:
        await pg.execute(
            """INSERT INTO scheduling_configs (model_name, unsatisfiable_ticks, unsatisfiable_until)
               VALUES ($1, 3, now() + interval '1 hour')""",
            model,
        )


async def cooldowns(pg: asyncpg.Connection) -> list[tuple[int, Any]]:
    rows = await pg.fetch(
        """SELECT unsatisfiable_ticks, unsatisfiable_until
             FROM scheduling_configs ORDER BY model_name"""
    )
    return [(r[0], r[1]) for r in rows]


async def connect(url: str) -> NATS:
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


class Worker:
    """A fake LocalAI worker: answers nodes.<id>.backend.* as told, and records requests."""

    def __init__(self, client: Client, node_id: str) -> None:
        self.client = client
        self.node_id = node_id
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.reply: dict[str, Any] | None = {"success": True}  # None: stay silent
        self.gate: asyncio.Event | None = None  # set: hold replies until it is set
        self.arrived = asyncio.Event()
        self._subs: list[Any] = []

    async def start(
        self, ops: tuple[str, ...] = ("install", "upgrade", "delete"), with_probe: bool = False
    ) -> Worker:
        # The probe, subscribed last, shows when the others are known
        # elsewhere in a cluster (see test_nats_cluster.heard_from).
        for op in ops + (("probe",) if with_probe else ()):
            subject = f"nodes.{sanitize(self.node_id)}.backend.{op}"
            self._subs.append(await self.client.nc.subscribe(subject, cb=self._serve))
        await self.client.nc.flush()
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    async def _serve(self, msg: Msg) -> None:
        op = msg.subject.rsplit(".", 1)[-1]
        self.requests.append((op, orjson.loads(msg.data)))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.reply is not None:
            await msg.respond(orjson.dumps(self.reply))

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
        async def arrived() -> bool:
            return len(self.requests) >= count

        await eventually(arrived, f"{count} worker requests (got {self.requests})", timeout)
        return self.requests


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy (as `eventually`)."""

    async def truthy() -> Any:
        return await check() or None

    return await eventually(truthy, "a condition", timeout)


class Proxy:
    """A TCP proxy in front of PostgreSQL that a test can cut and restore.

    `cut()` closes every proxied connection and refuses new ones, which is what
    a client sees when the database host goes away.
    """

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.open = True

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    def cut(self) -> None:
        self.open = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Registryd:
    """One registryd subprocess; its stdout and stderr go to a log file."""

    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, within: float = 30.0) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            pytest.fail(
                f"registryd (pid {self.pid}) still running after {within:g}s:\n" + self.output()
            )

    def assert_running(self) -> None:
        if not self.running:
            pytest.fail(f"registryd exited with {self.proc.returncode}:\n{self.output()}")


# What a client meets while a daemon starts, or reconnects after NATS comes
# back: nobody subscribed yet, no answer in time, its own connection still
# reconnecting, or 503 (the daemon up, its database not yet).
NOT_YET = (
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
)


async def serving(
    client: Client,
    daemon: Registryd | None = None,
    op: str = "list",
    within: float = 30.0,
    **fields: Any,
) -> Any:
    """The first answer to `op` through `client`, once a daemon serves it.

    Fails at once, with its log, if `daemon` exits meanwhile; any error reply
    but 503 fails too, rather than being waited out as "not yet"."""

    async def answered() -> Any:
        if daemon is not None:
            daemon.assert_running()
        try:
            return await client.call(op, **fields)
        except NOT_YET:
            return None
        except CallError as err:
            if err.code == 503:
                return None
            raise

    return await eventually(answered, f"the daemon to answer {op!r}", within)
