"""Backend intents: queued in JetStream, delivered to a fake worker on LocalAI's subjects."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg

from daemon.app import Daemon
from daemon.delivery import sanitize
from infra.wire import NEXT_HEADER
from tests.support import CallError, Client, Worker, connect, eventually, fails, next_for, until

# Short intervals, so that retries and waits take fractions of a second.
FAST = {
    "drain_interval": 0.3,
    "backoff_base": 0.2,
    "backoff_cap": 0.4,
    "install_timeout": 0.5,
    "max_attempts": 3,
}


@pytest.fixture
async def fast(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> AsyncIterator[Client]:
    daemon = await start_daemon(**FAST)
    nc = await connect(nats_url)
    yield Client(nc, daemon.settings.subject_prefix)
    await nc.close()


async def intents(client: Client, **fields: Any) -> list[dict[str, Any]]:
    return await client.call("backend_ops", **fields)


async def test_an_intent_is_queued_and_listed(client: Client) -> None:
    node = await client.register("gpu-1")  # pending: nothing is delivered
    got = await client.call(
        "backend_op", node_id=node["id"], backend="llama-cpp", op="install", galleries='[{"a":1}]'
    )
    assert set(got) == {
        "id",
        "node_id",
        "backend",
        "op",
        "attempts",
        "last_error",
        "created_at",
        "next_retry_at",
        "dead",
    }
    assert (got["node_id"], got["backend"], got["op"]) == (node["id"], "llama-cpp", "install")
    assert (got["attempts"], got["last_error"], got["dead"]) == (0, "", False)
    assert isinstance(got["id"], int)
    assert got["created_at"] == got["next_retry_at"] and got["created_at"].endswith("Z")
    assert await intents(client) == [got]
    assert await client.call("backend_ops_count") == {"llama-cpp": 1}


async def test_reissuing_refreshes_the_one_intent(client: Client) -> None:
    node = await client.register("gpu-1")
    first = await client.call("backend_op", node_id=node["id"], backend="b", op="delete")
    again = await client.call("backend_op", node_id=node["id"], backend="b", op="delete")
    assert again["id"] == first["id"] and again["created_at"] == first["created_at"]
    assert again["next_retry_at"] >= first["next_retry_at"]
    other = await client.call("backend_op", node_id=node["id"], backend="b", op="install")
    assert other["id"] != first["id"]
    assert len(await intents(client)) == 2
    assert await client.call("backend_ops_count") == {"b": 2}


async def test_any_backend_name_is_its_own_intent(client: Client) -> None:
    node = await client.register("gpu-1")
    names = ["a.b", "a-b", "a b", "a*", "a>", ">", "*", "llama.cpp/cuda 12", "модель", "a_b", "🙂"]
    for name in names:
        await client.call("backend_op", node_id=node["id"], backend=name, op="install")
    listed = await intents(client)
    assert sorted(i["backend"] for i in listed) == sorted(names)
    assert len({i["id"] for i in listed}) == len(names)


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"node_id": "ghost", "backend": "b", "op": "install"}, 404, "ghost"),
        ({"backend": "b", "op": "install"}, 400, "'node_id'"),
        ({"node_id": "N", "backend": "", "op": "install"}, 400, "'backend'"),
        ({"node_id": "N", "backend": "  ", "op": "install"}, 400, "'backend'"),
        ({"node_id": "N", "backend": "b", "op": "reinstall"}, 400, "'op'"),
        ({"node_id": "N", "backend": "b", "op": "install", "galleries": [1]}, 400, "'galleries'"),
    ],
)
async def test_bad_intents_are_refused(
    client: Client, fields: dict[str, Any], code: int, needle: str
) -> None:
    node = await client.register("gpu-1")
    if fields.get("node_id") == "N":
        fields["node_id"] = node["id"]
    await fails(client.call("backend_op", **fields), code, needle)
    assert await intents(client, dead=True) == []


async def test_an_agent_node_takes_no_intents(client: Client) -> None:
    agent = await client.register("agent-1", node_type="agent")
    await fails(
        client.call("backend_op", node_id=agent["id"], backend="b", op="install"), 400, "agent"
    )


async def test_install_is_delivered_once_the_node_is_healthy(fast: Client) -> None:
    node = await fast.register("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    await fast.call(
        "backend_op", node_id=node["id"], backend="llama-cpp", op="install", galleries='[{"n":1}]'
    )
    # Pending: several drain intervals go by without a delivery.
    await asyncio.sleep(3 * FAST["drain_interval"])
    assert worker.requests == []
    await fast.call("approve", node_id=node["id"])
    requests = await worker.wait_for(1)
    assert requests == [("install", {"backend": "llama-cpp", "backend_galleries": '[{"n":1}]'})]
    assert await until(lambda: _empty(fast))
    assert await fast.call("backend_ops_count") == {}
    assert len(worker.requests) == 1


async def _empty(client: Client) -> bool:
    return await intents(client, dead=True) == []


async def test_delete_sends_only_the_backend(fast: Client) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    await fast.call(
        "backend_op", node_id=node["id"], backend="whisper", op="delete", galleries="[]"
    )
    assert await worker.wait_for(1) == [("delete", {"backend": "whisper"})]
    await until(lambda: _empty(fast))


async def test_upgrade_falls_back_to_install_with_force_for_an_old_worker(fast: Client) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start(ops=("install",))  # no backend.upgrade
    await fast.call("backend_op", node_id=node["id"], backend="vllm", op="upgrade")
    assert await worker.wait_for(1) == [("install", {"backend": "vllm", "force": True})]
    await until(lambda: _empty(fast))
    new = await Worker(fast, node["id"]).start(ops=("upgrade", "install"))
    await worker.stop()
    await fast.call("backend_op", node_id=node["id"], backend="vllm", op="upgrade")
    assert await new.wait_for(1) == [("upgrade", {"backend": "vllm"})]


async def test_failures_back_off_then_the_intent_is_abandoned(
    fast: Client, caplog: pytest.LogCaptureFixture
) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    worker.reply = {"success": False, "error": "disk full"}
    with caplog.at_level(logging.WARNING, logger="registryd.delivery"):
        sent = await fast.call("backend_op", node_id=node["id"], backend="b", op="install")
        first = await until(lambda: _one(fast, attempts=1))
        assert first["last_error"] == "disk full" and not first["dead"]
        wait = (_t(first["next_retry_at"]) - _t(sent["next_retry_at"])).total_seconds()
        assert wait >= FAST["backoff_base"] * 0.9
        dead = await until(lambda: _one(fast, dead=True))
    assert dead["attempts"] == FAST["max_attempts"] and dead["dead"] is True
    assert len(worker.requests) == FAST["max_attempts"]
    # Abandoned: no more deliveries, not pending, still listable until cancelled.
    assert await intents(fast) == [] and await fast.call("backend_ops_count") == {}
    assert any(
        "abandoned" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records
    )
    await fails(fast.call("backend_op_cancel", id=dead["id"] + 1), 404)
    assert await fast.call("backend_op_cancel", id=dead["id"]) == {}
    assert await intents(fast, dead=True) == []
    await fails(fast.call("backend_op_cancel", id=dead["id"]), 404)
    assert len(worker.requests) == FAST["max_attempts"]


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def _one(client: Client, **expect: Any) -> dict[str, Any] | None:
    listed = await intents(client, dead=True)
    if len(listed) == 1 and all(listed[0][k] == v for k, v in expect.items()):
        return listed[0]
    return None


# Slow: it waits out a real install timeout.
@pytest.mark.slow
async def test_a_silent_install_is_still_in_flight_not_a_failure(fast: Client) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    worker.reply = None
    await fast.call("backend_op", node_id=node["id"], backend="b", op="install")
    waiting = await until(lambda: _last_error(fast))
    assert waiting["attempts"] == 0 and "no reply" in waiting["last_error"]
    # It is asked again after the install timeout, still without counting.
    await worker.wait_for(2)
    worker.reply = {"success": True}
    await until(lambda: _empty(fast))


async def _last_error(client: Client) -> dict[str, Any] | None:
    listed = await intents(client)
    return listed[0] if listed and listed[0]["last_error"] else None


async def test_no_responders_marks_the_node_unhealthy(fast: Client) -> None:
    node = await fast.healthy_node("gpu-1")
    events = await fast.listen(f"{fast.prefix}.events.node.{node['id']}")
    await fast.call("backend_op", node_id=node["id"], backend="b", op="delete")
    _, event = await next_for(events, node["id"])
    assert (event["status"], event["previous_status"]) == ("unhealthy", "healthy")
    assert "intent" in event["reason"]
    got = await until(lambda: _one(fast, attempts=1))
    assert "no worker" in got["last_error"]
    assert (await fast.call("get", node_id=node["id"]))["status"] == "unhealthy"
    # Healthy again with a worker listening: it goes out at once.
    worker = await Worker(fast, node["id"]).start()
    await fast.call("healthy", node_id=node["id"])
    await worker.wait_for(1)
    await until(lambda: _empty(fast))


async def test_an_intent_for_a_deregistered_node_is_dropped(fast: Client) -> None:
    node = await fast.register("gpu-1")
    await fast.call("backend_op", node_id=node["id"], backend="b", op="install")
    await fast.call("deregister", node_id=node["id"])
    assert await intents(fast, dead=True) == []


async def test_a_reissue_during_delivery_is_neither_lost_nor_doubled(fast: Client) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    worker.gate = asyncio.Event()
    await fast.call("backend_op", node_id=node["id"], backend="b", op="install", galleries="v1")
    await worker.wait_for(1)
    await fast.call("backend_op", node_id=node["id"], backend="b", op="install", galleries="v2")
    worker.gate.set()
    requests = await worker.wait_for(2)
    await until(lambda: _empty(fast))
    assert [r[1]["backend_galleries"] for r in requests] == ["v1", "v2"]
    assert len(worker.requests) == 2


class SlowWorker:
    """A worker whose installs take `work` seconds, each in a task of its own.

    nats-py runs a subscription's callbacks one after the other, which would
    hide concurrent requests; handing each to a task lets them overlap as they
    would on a real worker, and records when each one started and ended.
    """

    def __init__(self, client: Client, node_id: str, work: float) -> None:
        self.client = client
        self.node_id = node_id
        self.work = work
        self.spans: list[tuple[str, float, float | None]] = []  # galleries, start, end
        self.running = 0
        self.most_at_once = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> SlowWorker:
        subject = f"nodes.{sanitize(self.node_id)}.backend.install"
        await self.client.nc.subscribe(subject, cb=self._arrive)
        await self.client.nc.flush()
        return self

    async def _arrive(self, msg: Msg) -> None:
        task = asyncio.create_task(self._install(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _install(self, msg: Msg) -> None:
        index = len(self.spans)
        galleries = orjson.loads(msg.data).get("backend_galleries", "")
        self.spans.append((galleries, time.monotonic(), None))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.work)  # installing
        finally:
            self.running -= 1
            self.spans[index] = (galleries, self.spans[index][1], time.monotonic())
        await msg.respond(orjson.dumps({"success": True}))

    def ended(self) -> list[tuple[str, float, float]]:
        return [(g, start, end) for g, start, end in self.spans if end is not None]


@pytest.fixture
async def installing(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> AsyncIterator[tuple[Daemon, Client, dict[str, Any], SlowWorker]]:
    """A healthy node whose worker takes 1.5 s an install, under an install
    timeout well past that: an attempt is answered, not timed out, and what
    comes meanwhile has to wait for that answer."""
    daemon = await start_daemon(**(FAST | {"install_timeout": 10}))
    nc = await connect(nats_url)
    client = Client(nc, daemon.settings.subject_prefix)
    node = await client.healthy_node("gpu-1")
    yield daemon, client, node, await SlowWorker(client, node["id"], work=1.5).start()
    await nc.close()


# Slow: a worker that takes 1.5 s per install, twice.
@pytest.mark.slow
async def test_a_reissue_during_delivery_waits_for_the_attempt_to_end(
    installing: tuple[Daemon, Client, dict[str, Any], SlowWorker],
) -> None:
    client, worker, op, _ = await _installing_v1(installing)
    again = await client.call("backend_op", **op, galleries="v2")
    # The daemon's bookkeeping stays off the wire, in the reply and the list.
    assert set(again) == WIRE_FIELDS
    assert [set(i) for i in await intents(client)] == [WIRE_FIELDS]
    await _one_after_the_other(client, worker)


async def _installing_v1(
    installing: tuple[Daemon, Client, dict[str, Any], SlowWorker],
) -> tuple[Client, SlowWorker, dict[str, Any], dict[str, Any]]:
    """Asks for an install of backend "b" (galleries v1) and waits until the
    worker is running it: the client, the worker, the op's fields, the intent."""
    _, client, node, worker = installing
    op = {"node_id": node["id"], "backend": "b", "op": "install"}
    first = await client.call("backend_op", **op, galleries="v1")
    await eventually(lambda: _started(worker, 1), "the first install to start")
    return client, worker, op, first


async def _one_after_the_other(client: Client, worker: SlowWorker) -> None:
    """Both installs, v1 then v2, the second only once the first ended."""
    await eventually(lambda: _ended(worker, 2), "both installs to end")
    await until(lambda: _empty(client))
    first, second = worker.ended()
    assert [first[0], second[0]] == ["v1", "v2"]
    assert worker.most_at_once == 1 and second[1] >= first[2]
    assert len(worker.spans) == 2


# Slow: a worker that takes 1.5 s per install, twice.
@pytest.mark.slow
async def test_a_cancel_then_a_new_request_during_delivery_waits_for_the_attempt(
    installing: tuple[Daemon, Client, dict[str, Any], SlowWorker],
) -> None:
    # Cancelling the intent being delivered, then asking for it again, must
    # not hand the worker a second install beside the one it is running.
    client, worker, op, first = await _installing_v1(installing)
    assert await client.call("backend_op_cancel", id=first["id"]) == {}
    # Gone from every view at once, and not cancellable twice.
    assert await intents(client, dead=True) == []
    assert await client.call("backend_ops_count") == {}
    await fails(client.call("backend_op_cancel", id=first["id"]), 404)
    again = await client.call("backend_op", **op, galleries="v2")
    assert set(again) == WIRE_FIELDS and again["attempts"] == 0
    assert [i["id"] for i in await intents(client)] == [first["id"]]
    await _one_after_the_other(client, worker)


# Slow: a worker that takes 1.5 s per install, twice.
@pytest.mark.slow
async def test_thirty_cancels_and_thirty_requests_at_once_during_delivery(
    installing: tuple[Daemon, Client, dict[str, Any], SlowWorker],
) -> None:
    # The same cancel and the same request, 30 times each and all at once,
    # while the worker installs: no 500, one intent left, never two installs.
    client, worker, op, first = await _installing_v1(installing)

    async def code_of(call: Awaitable[Any]) -> int:
        try:
            await call
            return 200
        except CallError as err:
            return err.code

    codes = await asyncio.gather(
        *(code_of(client.call("backend_op_cancel", id=first["id"])) for _ in range(30))
    )
    assert set(codes) <= {200, 404} and 200 in codes, codes
    codes = await asyncio.gather(
        *(code_of(client.call("backend_op", **op, galleries="v2")) for _ in range(30))
    )
    assert set(codes) == {200}, codes
    assert [i["id"] for i in await intents(client)] == [first["id"]]
    await _one_after_the_other(client, worker)


# Slow: a worker that takes 1.5 s per install.
@pytest.mark.slow
async def test_an_intent_cancelled_during_delivery_is_not_sent_again(
    installing: tuple[Daemon, Client, dict[str, Any], SlowWorker],
) -> None:
    daemon, client, node, worker = installing
    got = await client.call("backend_op", node_id=node["id"], backend="b", op="install")
    await eventually(lambda: _started(worker, 1), "the install to start")
    await client.call("backend_op_cancel", id=got["id"])
    await eventually(lambda: _ended(worker, 1), "the install to end")
    # The stream is empty too: nothing is left to be delivered later.
    js = client.nc.jetstream()
    await eventually(lambda: _stream_empty(js, daemon.settings.stream), "the intent to go")
    await asyncio.sleep(1)  # three drain intervals: time for a wrong second attempt
    assert len(worker.spans) == 1


async def _stream_empty(js: Any, stream: str) -> bool | None:
    return (await js.stream_info(stream)).state.messages == 0 or None


WIRE_FIELDS = {
    "id",
    "node_id",
    "backend",
    "op",
    "attempts",
    "last_error",
    "created_at",
    "next_retry_at",
    "dead",
}


async def _started(worker: SlowWorker, count: int) -> bool | None:
    return True if len(worker.spans) >= count else None


async def _ended(worker: SlowWorker, count: int) -> bool | None:
    return True if len(worker.ended()) >= count else None


async def test_a_failed_attempt_reissued_meanwhile_is_counted_then_delivered(
    fast: Client,
) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    first_gate = worker.gate = asyncio.Event()
    worker.reply = {"success": False, "error": "disk full"}
    op = {"node_id": node["id"], "backend": "b", "op": "install"}
    await fast.call("backend_op", **op, galleries="v1")
    await worker.wait_for(1)
    await fast.call("backend_op", **op, galleries="v2")
    worker.gate = asyncio.Event()  # holds the next request, not the first
    first_gate.set()
    # The failure is counted on the reissued intent, which goes out again.
    requests = await worker.wait_for(2)
    counted = await until(lambda: _one(fast, attempts=1, last_error="disk full"))
    assert not counted["dead"]
    worker.reply = {"success": True}
    worker.gate.set()
    await until(lambda: _empty(fast))
    assert [r[1]["backend_galleries"] for r in requests] == ["v1", "v2"]
    assert len(worker.requests) == 2


async def test_an_intent_cancelled_during_delivery_stays_cancelled(
    fast: Client, caplog: pytest.LogCaptureFixture
) -> None:
    node = await fast.healthy_node("gpu-1")
    worker = await Worker(fast, node["id"]).start()
    worker.gate = asyncio.Event()
    worker.reply = {"success": False, "error": "disk full"}
    op = {"node_id": node["id"], "backend": "b", "op": "install"}
    with caplog.at_level(logging.INFO, logger="registryd.delivery"):
        sent = await fast.call("backend_op", **op, galleries="v1")
        await worker.wait_for(1)
        await fast.call("backend_op", **op, galleries="v2")  # reissued, then cancelled
        assert await fast.call("backend_op_cancel", id=sent["id"]) == {}
        worker.gate.set()
        await eventually(lambda: _logged(caplog, "disk full"), "the failure to be recorded")
    # Neither the failure nor the reissue brought the cancelled intent back.
    assert await intents(fast, dead=True) == []
    worker.reply = {"success": True}
    await fast.call("backend_op", **op, galleries="v3")
    await worker.wait_for(2)
    await until(lambda: _empty(fast))
    assert [r[1]["backend_galleries"] for r in worker.requests] == ["v1", "v3"]


async def _logged(caplog: pytest.LogCaptureFixture, needle: str) -> bool | None:
    return True if any(needle in r.getMessage() for r in caplog.records) else None


async def test_intents_survive_a_daemon_restart(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> None:
    first = await start_daemon(**FAST)
    nc = await connect(nats_url)
    client = Client(nc, first.settings.subject_prefix)
    try:
        node = await client.healthy_node("gpu-1")
        await client.call("offline", node_id=node["id"])
        queued = await client.call("backend_op", node_id=node["id"], backend="b", op="install")
        await first.stop()
        await start_daemon(**FAST)
        assert await intents(client) == [queued]
        worker = await Worker(client, node["id"]).start()
        await client.register("gpu-1")  # the worker comes back: healthy again
        await worker.wait_for(1)
        await until(lambda: _empty(client))
        assert len(worker.requests) == 1
    finally:
        await nc.close()


async def test_two_daemons_deliver_each_intent_once(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> None:
    one = await start_daemon(**FAST)
    await start_daemon(**FAST)
    nc = await connect(nats_url)
    client = Client(nc, one.settings.subject_prefix)
    try:
        workers = []
        for i in range(4):
            node = await client.healthy_node(f"gpu-{i}")
            workers.append(await Worker(client, node["id"]).start())
        for worker in workers:
            for b in range(10):
                await client.call(
                    "backend_op", node_id=worker.node_id, backend=f"b{b}", op="install"
                )
        await until(lambda: _empty(client), timeout=30)
        for worker in workers:
            got = sorted(r[1]["backend"] for r in worker.requests)
            assert got == sorted(f"b{b}" for b in range(10))
    finally:
        await nc.close()


async def test_paging_through_intents(client: Client) -> None:
    node = await client.register("gpu-1")
    for b in "dcba":
        await client.call("backend_op", node_id=node["id"], backend=b, op="install")
    first, headers = await client.call_with_headers("backend_ops", limit=3)
    rest, more = await client.call_with_headers("backend_ops", limit=3, after=headers[NEXT_HEADER])
    assert [i["backend"] for i in first + rest] == ["a", "b", "c", "d"]
    assert NEXT_HEADER not in more


async def test_a_node_turning_healthy_gets_its_intents_at_once(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> None:
    # A drain interval far longer than the test: only the wake-up can deliver in time.
    daemon = await start_daemon(**(FAST | {"drain_interval": 120}))
    nc = await connect(nats_url)
    client = Client(nc, daemon.settings.subject_prefix)
    try:
        node = await client.register("gpu-1")
        worker = await Worker(client, node["id"]).start()
        await client.call("backend_op", node_id=node["id"], backend="b", op="install")
        js = nc.jetstream()

        async def waiting() -> bool:  # seen by the delivery loop, put back for later
            info = await js.consumer_info(daemon.settings.stream, "registryd-delivery")
            return info.num_ack_pending == 1

        await until(waiting)
        await client.call("approve", node_id=node["id"])
        await worker.wait_for(1, timeout=10)
    finally:
        await nc.close()
