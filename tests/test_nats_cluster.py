"""registryd on a three-server NATS cluster, its intent stream replicated three ways.

Each test starts its own cluster: three nats-server processes on loopback, routed
to one another, with clustered JetStream (a server_name each), and registryd
subprocesses with REGISTRY_STREAM_REPLICAS=3. The tests show that

* killing (SIGKILL) the nats-server a daemon is connected to, while that server
  also leads the intent stream and the delivery consumer, loses no intent: the
  daemon reconnects to a surviving server by itself and keeps answering, every
  intent is still listed, and each is delivered exactly once to a worker on
  another server once its node is healthy;
* two daemons, each connected to a different server of the cluster, are one
  service: what is written through one is read through the other, both answer
  requests, an intent goes to the worker once although both run a delivery loop
  on the shared durable consumer, and when one daemon stops the other answers
  the clients of its server too;
* a stream created with one replica is raised to three by a daemon started with
  REGISTRY_STREAM_REPLICAS=3, keeping its intents.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from daemon import embedded
from daemon.delivery import CONSUMER, sanitize
from tests.support import CallError, Client, Registryd, Worker, connect, eventually, serving

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

# Short intervals (as in test_intents_restart), so that waits and retries are brief.
FAST_ENV = {
    "REGISTRY_DRAIN_INTERVAL": "0.3",
    "REGISTRY_BACKOFF_BASE": "0.2",
    "REGISTRY_BACKOFF_CAP": "0.4",
    "REGISTRY_INSTALL_TIMEOUT": "2",
}

# What a client may see while a server is down or JetStream elects a new leader:
# a 503 from the daemon, or no reply to a request the dead server took with it.
TRANSIENT = (CallError, nats.errors.TimeoutError, nats.errors.NoRespondersError)

# ---------------------------------------------------------------- the cluster


@dataclass
class Server:
    """One nats-server of the cluster, which a test can kill."""

    name: str
    port: int
    route_port: int
    directory: Path
    process: embedded.NatsServer | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self, route_ports: list[int]) -> str:
        # start_nats gives its own flags (-a 127.0.0.1 -p <port> -js -sd <dir>):
        # the config names the same address, and no store_dir, which nats-server
        # refuses to be given twice. Each server lists every route, itself
        # included (it recognises and skips itself), so they all share one config.
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        return (
            f"server_name: {self.name}\n"  # clustered JetStream needs distinct names
            f"listen: 127.0.0.1:{self.port}\n"
            "jetstream: enabled\n"
            "cluster {\n"
            "  name: registryd-test\n"
            f"  listen: 127.0.0.1:{self.route_port}\n"
            f"  routes: [{routes}]\n"
            "}\n"
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.process.kill()
        self.process.process.wait()


@dataclass
class Cluster:
    servers: list[Server] = field(default_factory=list)

    def urls(self, *servers: Server) -> str:
        """A REGISTRY_NATS_URL naming these servers (all of them when none are given)."""
        return ",".join(s.url for s in servers or self.servers)

    def at(self, address: str) -> Server:
        """The server listening on `address` (host:port)."""
        port = int(address.rsplit(":", 1)[1])
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for server in self.servers:
            if server.process is not None:
                server.process.stop()


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = embedded.free_port()
        if port not in ports:
            ports.append(port)
    return ports


async def jetstream_ready(url: str) -> None:
    """Wait until the cluster can place a stream of three replicas.

    The servers accept clients before their routes are up and before the
    JetStream meta group has a leader; a daemon started then would only wait in
    its own retry loop. A throwaway R3 stream, created and deleted, shows that
    the meta leader is elected and sees all three servers.
    """
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=2)

    async def placed() -> bool | None:
        try:
            await js.add_stream(StreamConfig(name="PROBE", subjects=["probe"], num_replicas=3))
        except Exception:  # timeouts and 503s until the meta leader is elected
            return None
        return True

    try:
        await eventually(placed, "a JetStream meta leader with three peers", within=30)
        await js.delete_stream("PROBE")
    finally:
        await nc.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nats-servers routed into one JetStream cluster; all stopped after the test."""
    ports = distinct_free_ports(6)
    client_ports, route_ports = ports[:3], ports[3:]
    cluster = Cluster(
        [
            Server(f"n{i + 1}", client_ports[i], route_ports[i], tmp_path / f"n{i + 1}")
            for i in range(3)
        ]
    )
    try:
        for server in cluster.servers:
            server.directory.mkdir()
            conf = server.directory / "nats.conf"
            conf.write_text(server.config(route_ports))
            server.process = embedded.start_nats(
                server.directory, port=server.port, extra_args=["-c", str(conf)]
            )
        await jetstream_ready(cluster.servers[0].url)
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- daemons and clients


Start = Callable[..., Awaitable[Registryd]]
ClientOn = Callable[[Server], Awaitable[Client]]


@pytest.fixture
def start_on(cluster: Cluster, spawn: Start, daemon_env: dict[str, str]) -> Start:
    """Start a registryd subprocess connected to `servers` of the cluster (default: all).

    Every daemon of a test shares the subject prefix, stream and database
    (daemon_env), so together they are one service. This fixture asks for the
    cluster before spawn, so pytest stops the daemons before the servers.
    """

    async def start(*servers: Server, replicas: int = 3) -> Registryd:
        env = daemon_env | FAST_ENV
        env["REGISTRY_NATS_URL"] = cluster.urls(*servers)
        env["REGISTRY_STREAM_REPLICAS"] = str(replicas)
        return await spawn(env=env)

    return start


@pytest.fixture
async def client_on(cluster: Cluster, daemon_env: dict[str, str]) -> AsyncIterator[ClientOn]:
    """Clients connected to one given server of the cluster; closed after the test."""
    conns: list[NATS] = []

    async def make(server: Server) -> Client:
        nc = await connect(server.url)
        conns.append(nc)
        return Client(nc, daemon_env["REGISTRY_SUBJECT_PREFIX"], timeout=5)

    yield make
    for nc in conns:
        await nc.close()


async def logged(daemon: Registryd, pattern: str, what: str) -> re.Match[str]:
    """The first line of the daemon's output matching `pattern`, once there is one."""

    async def found() -> re.Match[str] | None:
        return re.search(pattern, daemon.output())

    match: re.Match[str] = await eventually(found, what, within=30)
    return match


async def serving_on(daemon: Registryd, cluster: Cluster) -> Server:
    """The server the daemon connected to at start, as its 'serving … on' line says."""
    return cluster.at((await logged(daemon, r"serving \S+ on (\S+)", "'serving'")).group(1))


async def delivered_all(client: Client) -> None:
    """Wait until no intent (not even a dead one) is left."""

    async def empty() -> bool | None:
        try:
            return True if await client.call("backend_ops", dead=True) == [] else None
        except TRANSIENT:
            return None

    await eventually(empty, "every intent to be delivered", within=30)


async def heard_from(worker: Worker, *clients: Client) -> None:
    """Wait until the worker's subscriptions, made on a server of its own,
    have crossed the cluster's routes to the servers of `clients`: the flush
    after subscribing covers only the worker's server, and a daemon elsewhere
    that finds no responder for an intent marks the node unhealthy, which
    holds every intent until a heartbeat this test never sends."""
    subject = f"nodes.{sanitize(worker.node_id)}.backend.probe"
    for client in clients:

        async def answered(client: Client = client) -> bool | None:
            try:
                await client.nc.request(subject, b"{}", timeout=1)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                return None
            return True

        await eventually(answered, "the worker's subscriptions across the cluster")
    worker.requests = [r for r in worker.requests if r[0] != "probe"]


def sent(intent: dict[str, Any]) -> str:
    """The request a worker gets for an intent queued without galleries, as text."""
    return repr((intent["op"], {"backend": intent["backend"]}))


def by_id(intents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(intents, key=lambda i: i["id"])


def stream_of(client: Client) -> str:
    return f"REGISTRY_{client.prefix}"  # as daemon_env names it


async def leader(info: Callable[[], Awaitable[Any]]) -> str | None:
    """The name of the leader in a stream or consumer info (None: none, or no info)."""
    try:
        cluster_info = (await info()).cluster
    except Exception:  # not there yet, or an election under way
        return None
    return (cluster_info.leader or None) if cluster_info else None


async def move_leader(
    nc: NATS, subject: str, to: Server, info: Callable[[], Awaitable[Any]]
) -> None:
    """Have JetStream elect `to` as the leader of a stream or consumer (a stepdown
    naming the preferred server; again until it holds)."""

    async def moved() -> bool | None:
        if await leader(info) == to.name:
            return True
        body = json.dumps({"placement": {"preferred": to.name}}).encode()
        try:
            await nc.request(subject, body, timeout=2)
        except nats.errors.TimeoutError:
            pass  # an election under way
        return None

    await eventually(moved, f"{to.name} to lead ({subject})", within=20)


async def service_stats(nc: NATS, prefix: str, instances: int) -> dict[str, int]:
    """The requests each instance of our `registry` service counted ($SRV.STATS).

    Every instance answers a $SRV request (they are no queue group), so this
    collects replies until `instances` of ours came, or for at most 5 s.
    """
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def got(msg: Any) -> None:
        await replies.put(orjson.loads(msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=got)
    counts: dict[str, int] = {}
    try:
        await nc.publish("$SRV.STATS.registry", b"", reply=inbox)
        while len(counts) < instances:
            try:
                stats = await asyncio.wait_for(replies.get(), 5)
            except TimeoutError:
                break
            if stats.get("metadata", {}).get("subject_prefix") == prefix:
                counts[stats["id"]] = sum(e["num_requests"] for e in stats["endpoints"])
    finally:
        await sub.unsubscribe()
    return counts


# ---------------------------------------------------------------- the tests


async def test_killing_the_server_of_the_daemon_loses_no_intent(
    cluster: Cluster, start_on: Start, client_on: ClientOn
) -> None:
    # All three servers in its list, as in production; nats-py picks one at
    # random, so the daemon's log tells which one to kill.
    daemon = await start_on()
    victim = await serving_on(daemon, cluster)
    survivors = [s for s in cluster.servers if s is not victim]
    client = await client_on(survivors[0])
    worker_client = await client_on(survivors[1])
    await serving(client, daemon, "backend_ops", dead=True)

    js = client.nc.jetstream(timeout=5)
    stream = stream_of(client)
    info = await js.stream_info(stream)
    assert info.config.num_replicas == 3 and info.cluster is not None
    assert len(info.cluster.replicas or []) == 2, info.cluster

    # The worst case: the victim also leads the stream and the delivery consumer
    # (which the daemon's delivery loop creates once it runs). A write only its
    # leader held would die with it; JetStream acknowledges a write once a quorum
    # (two of three) holds it, so none is lost.
    def stream_info() -> Awaitable[Any]:
        return js.stream_info(stream)

    def consumer_info() -> Awaitable[Any]:
        return js.consumer_info(stream, CONSUMER)

    await eventually(lambda: leader(consumer_info), "the delivery consumer")
    stepdown = "$JS.API.STREAM.LEADER.STEPDOWN." + stream
    await move_leader(client.nc, stepdown, victim, stream_info)
    stepdown = f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{CONSUMER}"
    await move_leader(client.nc, stepdown, victim, consumer_info)

    # A pending node: nothing is delivered, so every intent stays queued.
    node = await client.register("gpu-1")
    assert node["status"] == "pending"
    queued = [
        await client.call("backend_op", node_id=node["id"], backend=backend, op=op)
        for backend, op in [
            ("llama-cpp", "install"),
            ("whisper", "install"),
            ("vllm", "delete"),
            ("diffusers", "upgrade"),
            ("llama.cpp/cuda 12", "install"),
            ("whisper", "delete"),
        ]
    ]
    assert by_id(await client.call("backend_ops")) == by_id(queued)

    victim.kill()

    # The same daemon process goes on, through a surviving server: it says it
    # reconnected there, and answers a client of another server with every intent.
    async def listed() -> list[dict[str, Any]] | None:
        daemon.assert_running()
        try:
            return await client.call("backend_ops")
        except TRANSIENT:
            return None  # 503 until JetStream has elected new leaders

    assert by_id(await eventually(listed, "the intents after the kill")) == by_id(queued)
    reconnected = await logged(daemon, r"NATS reconnected to (\S+)", "the daemon to reconnect")
    assert cluster.at(reconnected.group(1)) in survivors, daemon.output()
    assert await leader(stream_info) in {s.name for s in survivors}

    # Once the node is healthy, a worker on the other survivor gets each intent once.
    worker = await Worker(worker_client, node["id"]).start(with_probe=True)
    await heard_from(worker, await client_on(cluster.at(reconnected.group(1))))
    await client.call("approve", node_id=node["id"])
    await delivered_all(client)
    assert sorted(map(repr, worker.requests)) == sorted(map(sent, queued))
    # None comes twice later (a negative check, so a short wait: a few drain intervals).
    await asyncio.sleep(1.0)
    assert len(worker.requests) == len(queued), worker.requests
    daemon.assert_running()


async def test_two_daemons_on_different_servers_are_one_service(
    cluster: Cluster, start_on: Start, client_on: ClientOn
) -> None:
    n1, n2, n3 = cluster.servers
    # Each daemon is given only its own server. Both start at once, as a
    # deployment's do, and create the stream and the consumer concurrently
    # (spawn returns as soon as the process runs; one at a time, as it numbers
    # the log files as it goes).
    one = await start_on(n1)
    two = await start_on(n2)
    on1, on2 = await client_on(n1), await client_on(n2)
    await serving(on1, one, "backend_ops", dead=True)
    await serving(on2, two, "backend_ops", dead=True)
    assert await serving_on(one, cluster) is n1
    assert await serving_on(two, cluster) is n2
    js = on1.nc.jetstream(timeout=5)
    stream = stream_of(on1)
    assert (await js.stream_info(stream)).config.num_replicas == 3

    # Written through one server, read and changed through the other: one
    # database, one stream, one service.
    node = await on1.register("gpu-1")
    assert (await on2.call("get", name="gpu-1"))["id"] == node["id"]
    assert (await on2.call("approve", node_id=node["id"]))["status"] == "healthy"
    assert [n["status"] for n in await on1.call("list")] == ["healthy"]

    # Both daemons answer: two instances of the service count requests of their own.
    for _ in range(10):
        await on1.call("list")
        await on2.call("list")
    stats = await service_stats(on1.nc, on1.prefix, instances=2)
    assert len(stats) == 2 and all(requests > 0 for requests in stats.values()), stats

    # One durable consumer, fed to both daemons' delivery loops: a worker on the
    # third server gets every intent, queued through either daemon, exactly once.
    # (The daemons create it concurrently: it may still be electing its leader.)
    await eventually(lambda: leader(lambda: js.consumer_info(stream, CONSUMER)), "the consumer")
    info = await js.stream_info(stream)
    assert info.state.consumer_count == 1, info.state
    worker = await Worker(await client_on(n3), node["id"]).start(with_probe=True)
    await heard_from(worker, on1, on2)
    queued = []
    for i in range(8):
        via = (on1, on2)[i % 2]
        op = ("install", "upgrade", "delete")[i % 3]
        queued.append(await via.call("backend_op", node_id=node["id"], backend=f"b{i}", op=op))
    await delivered_all(on1)
    assert sorted(map(repr, worker.requests)) == sorted(map(sent, queued))
    await asyncio.sleep(1.0)  # a negative check: no second delivery comes later
    assert len(worker.requests) == len(queued), worker.requests

    # One daemon stops: the clients of its server are answered by the other one,
    # over the cluster's routes, and what they write is seen everywhere.
    one.send(signal.SIGTERM)
    assert await one.exit_code() == 0, one.output()
    other = await on1.register("gpu-2")
    assert sorted(n["id"] for n in await on2.call("list")) == sorted([node["id"], other["id"]])
    two.assert_running()


async def test_a_stream_of_one_replica_is_raised_to_three(
    cluster: Cluster, start_on: Start, client_on: ClientOn
) -> None:
    # A stream made with one replica (the default), then REGISTRY_STREAM_REPLICAS=3:
    # the next daemon to start updates the stream in place. (A daemon leaves a
    # stream that already has its settings alone; this is the case where not.)
    first = await start_on(replicas=1)
    client = await client_on(cluster.servers[0])
    await serving(client, first, "backend_ops", dead=True)
    js: JetStreamContext = client.nc.jetstream(timeout=5)
    assert (await js.stream_info(stream_of(client))).config.num_replicas == 1
    node = await client.register("gpu-1")
    queued = await client.call("backend_op", node_id=node["id"], backend="b", op="install")
    first.send(signal.SIGTERM)
    assert await first.exit_code() == 0, first.output()

    second = await start_on(replicas=3)
    await serving(client, second, "backend_ops", dead=True)

    async def replicated() -> bool | None:
        info = await js.stream_info(stream_of(client))
        peers = (info.cluster.replicas or []) if info.cluster else []
        if info.config.num_replicas == 3 and len(peers) == 2 and all(p.current for p in peers):
            return True
        return None

    await eventually(replicated, "three current replicas")
    assert await client.call("backend_ops") == [queued]
