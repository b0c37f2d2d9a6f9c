"""The worker agent against a real daemon: registration, heartbeats, restarts of
the daemon and of nats-server, deregistration, SIGTERM, the node key kept in
the state directory; and NVML's readings through a fake `pynvml` (there is no
GPU here)."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import stat
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from daemon import embedded
from daemon.app import Daemon
from registryd import OwnNode, Registry, Replica, ReplicaName
from registryd.agent import (
    OWN_REPLICAS,
    Agent,
    CommandVram,
    FixedVram,
    NvmlVram,
    Served,
    Vram,
    load_node_key,
    missing_replicas,
    node_key_path,
    parse_bytes,
    served_models,
    vram_source,
)
from registryd.errors import NoResponders, NotFound, Timeout
from tests.support import Registryd, connect, eventually

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

GiB = 2**30
FAST = 0.1  # heartbeat interval of the agents in these tests


class Settable:
    """A VRAM source a test changes as it goes."""

    description = "the test"
    gpu_vendor = "testgpu"

    def __init__(self, available: int, total: int) -> None:
        self.reading = Vram(available, total)
        self.closed = False

    async def read(self) -> Vram:
        return self.reading

    def close(self) -> None:
        self.closed = True


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await connect(nats_url)
    yield conn
    await conn.close()


class Running:
    """An agent running in a task of the test; stopped (and awaited) at the end."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task = asyncio.create_task(agent.run())

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def agents() -> AsyncIterator[Callable[[Agent], Running]]:
    started: list[Running] = []

    def start(agent: Agent) -> Running:
        running = Running(agent)
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            await running.stop()


async def node_row(pg: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await pg.fetchrow(
        "SELECT id, status, available_vram, total_vram, last_heartbeat FROM nodes WHERE name = $1",
        name,
    )


async def beats_after(agent: Agent, count: int) -> None:
    """Wait until the registry has answered `count` more heartbeats of the agent."""
    target = agent.confirmed + count
    await eventually(
        lambda: _true(agent.confirmed >= target), f"{count} confirmed heartbeats", within=20
    )


async def _true(value: bool) -> bool | None:
    return value or None


async def test_the_agent_registers_heartbeats_and_goes_offline(
    daemon: Daemon, nc: NATS, pg: asyncpg.Connection, agents: Callable[[Agent], Running]
) -> None:
    registry = Registry(nc, daemon.settings.subject_prefix)
    vram = Settable(20 * GiB, 24 * GiB)
    agent = Agent(
        registry,
        "gpu-1",
        address="10.0.0.5:8000",
        labels={"engine": "vllm"},
        vram=vram,
        interval=FAST,
        confirm_every=3600,  # one heartbeat confirmed, the others published
    )
    running = agents(agent)
    await asyncio.wait_for(agent.registered.wait(), 10)
    node = await registry.get(name="gpu-1")
    assert node.id == agent.node_id and node.status == "pending"
    assert (node.available_vram, node.total_vram, node.gpu_vendor) == (
        20 * GiB,
        24 * GiB,
        "testgpu",
    )
    assert node.labels["engine"] == "vllm" and node.address == "10.0.0.5:8000"
    assert node.total_ram > 0
    await registry.approve(node.id)

    vram.reading = Vram(7 * GiB, 24 * GiB)  # a model loaded: published heartbeats say so

    async def updated() -> bool | None:
        row = await node_row(pg, "gpu-1")
        return (row is not None and row["available_vram"] == 7 * GiB) or None

    await eventually(updated, "the published heartbeat with the new free VRAM")
    assert agent.registrations == 1

    await running.stop()
    row = await node_row(pg, "gpu-1")
    assert row is not None and row["status"] == "offline"
    assert vram.closed


async def test_the_agent_registers_again_when_an_admin_deregisters_it(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = Registry(nc, daemon.settings.subject_prefix)
    agent = Agent(registry, "gpu-1", address="a:1", vram=FixedVram(1, 2), interval=FAST)
    agents(agent)
    await asyncio.wait_for(agent.registered.wait(), 10)
    first = agent.node_id
    assert first is not None
    await registry.deregister(first)

    async def back() -> str | None:
        try:
            node = await registry.get(name="gpu-1")
        except Exception:
            return None
        return node.id if node.id != first else None

    second = await eventually(back, "the agent to register again")
    assert agent.node_id == second and agent.registrations == 2


async def test_the_agent_rides_out_a_daemon_restart(
    start_daemon: Callable[..., Awaitable[Daemon]],
    nc: NATS,
    pg: asyncpg.Connection,
    agents: Callable[[Agent], Running],
) -> None:
    daemon = await start_daemon()
    registry = Registry(nc, daemon.settings.subject_prefix, timeout=2)
    agent = Agent(registry, "gpu-1", address="a:1", vram=FixedVram(1, 2), interval=FAST)
    agents(agent)
    await asyncio.wait_for(agent.registered.wait(), 10)
    await beats_after(agent, 1)

    await daemon.stop(grace=5)  # nobody answers: heartbeats find no responders
    await eventually(lambda: _true(agent.heartbeats_failing), "a heartbeat to fail")
    row = await node_row(pg, "gpu-1")
    assert row is not None
    stopped_at = row["last_heartbeat"]
    confirmed = agent.confirmed

    await start_daemon()  # the same database, prefix and settings
    await beats_after(agent, 2)
    assert agent.confirmed > confirmed and agent.registrations == 1  # same node, not a new one
    row = await node_row(pg, "gpu-1")
    assert row is not None and row["last_heartbeat"] > stopped_at


# ---------------------------------------------------------------- served models


async def routed_to(registry: Registry, model: str) -> tuple[str, str]:
    """The node id and address a router's findlock picks for `model` (the unit
    given back at once)."""
    async with registry.routed(model, lease_s=30) as pick:
        return pick.node.id, pick.replica.address


async def not_routed(registry: Registry, model: str) -> None:
    with pytest.raises(NotFound):
        await registry.findlock(model)


async def test_an_agent_serving_models_is_routed_to_once_approved(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = Registry(nc, daemon.settings.subject_prefix)

    def gpu_1() -> Agent:
        models = ["qwen3-8b", ("llama-70b", "10.0.0.5:8001")]
        return Agent(
            registry,
            "gpu-1",
            address="10.0.0.5:8000",
            models=models,
            vram=FixedVram(1, 2),
            interval=FAST,
        )

    agent = gpu_1()
    running = agents(agent)
    await asyncio.wait_for(agent.serving.wait(), 10)
    node_id = agent.node_id
    assert node_id is not None
    replica = await registry.replica_get(node_id, "qwen3-8b")
    assert (replica.state, replica.address, replica.replica_index) == ("loaded", "10.0.0.5:8000", 0)
    assert (await registry.replica_get(node_id, "llama-70b")).address == "10.0.0.5:8001"

    await not_routed(registry, "qwen3-8b")  # pending: recorded, but no router picks it
    await registry.approve(node_id)
    assert await routed_to(registry, "qwen3-8b") == (node_id, "10.0.0.5:8000")
    assert await routed_to(registry, "llama-70b") == (node_id, "10.0.0.5:8001")

    # The worker restarts: stopping marks it offline (its replicas cleared),
    # starting registers it again (approved: healthy) and records them again.
    await running.stop()
    await not_routed(registry, "qwen3-8b")
    again = gpu_1()
    agents(again)
    await asyncio.wait_for(again.serving.wait(), 10)
    assert again.node_id == node_id
    assert await routed_to(registry, "qwen3-8b") == (node_id, "10.0.0.5:8000")


async def routed_agent(
    registry: Registry, agents: Callable[[Agent], Running], **options: Any
) -> tuple[Agent, str]:
    """gpu-1 serving qwen3-8b at 10.0.0.5:8000, approved, and routed to."""
    agent = Agent(
        registry,
        "gpu-1",
        address="10.0.0.5:8000",
        models=["qwen3-8b"],
        vram=FixedVram(1, 2),
        interval=FAST,
        **options,
    )
    agents(agent)
    await asyncio.wait_for(agent.serving.wait(), 10)
    node_id = agent.node_id
    assert node_id is not None
    await registry.approve(node_id)
    assert await routed_to(registry, "qwen3-8b") == (node_id, "10.0.0.5:8000")
    return agent, node_id


async def test_an_agent_deregistered_registers_again_with_its_models(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = Registry(nc, daemon.settings.subject_prefix)
    agent, first = await routed_agent(registry, agents)

    await registry.deregister(first)  # the node, its replicas and its approval go

    async def back() -> str | None:
        if agent.registrations < 2 or agent.node_id is None:
            return None
        try:
            replica = await registry.replica_get(agent.node_id, "qwen3-8b")
        except NotFound:
            return None
        return replica.node_id if replica.state == "loaded" else None

    second = await eventually(back, "the agent to register again with its replica")
    assert second != first
    node = await registry.get(second)
    assert node.status == "pending"  # a new node: approved anew before routers see it
    await not_routed(registry, "qwen3-8b")
    await registry.approve(second)
    assert await routed_to(registry, "qwen3-8b") == (second, "10.0.0.5:8000")


async def test_an_agent_brought_back_by_a_heartbeat_records_its_models_again(
    start_daemon: Callable[..., Awaitable[Daemon]],
    nc: NATS,
    agents: Callable[[Agent], Running],
) -> None:
    # Offline clears a node's replicas; the sweep brings an approved node back
    # on its next heartbeat, healthy but with nothing for routers to pick.
    daemon = await start_daemon(check_interval=0.1)
    registry = Registry(nc, daemon.settings.subject_prefix)
    agent, node_id = await routed_agent(registry, agents, replicas_check_every=FAST)

    await registry.offline(node_id)  # an admin takes it offline: its replica goes

    async def routed_again() -> tuple[str, str] | None:
        if (await registry.get(node_id)).status != "healthy":
            return None
        try:
            return await routed_to(registry, "qwen3-8b")
        except NotFound:
            return None

    assert await eventually(routed_again, "the node back with its replica") == (
        node_id,
        "10.0.0.5:8000",
    )
    assert agent.registrations == 1  # recorded again, not registered again


def serving_m(registry: Registry, agents: Callable[[Agent], Running]) -> Agent:
    """gpu-1, started, serving model m at a:1."""
    agent = Agent(
        registry, "gpu-1", address="a:1", models=["m"], vram=FixedVram(1, 2), interval=FAST
    )
    agents(agent)
    return agent


async def m_recorded(registry: Registry, agent: Agent) -> None:
    await asyncio.wait_for(agent.serving.wait(), 10)
    assert agent.node_id is not None
    assert (await registry.replica_get(agent.node_id, "m")).state == "loaded"


class Unanswering(Registry):
    """A registry whose replica_set on the node's own subject gets no reply
    (as when the agent's NATS user may not publish it) until `answer` is set."""

    answer = False

    async def replica_set_self(self, *args: Any, **kwargs: Any) -> Any:
        if not self.answer:
            raise Timeout("no reply on registry.replica_set.<node id> within 5s")
        return await super().replica_set_self(*args, **kwargs)


async def test_heartbeats_go_on_while_the_models_cannot_be_recorded(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = Unanswering(nc, daemon.settings.subject_prefix)
    agent = serving_m(registry, agents)
    await asyncio.wait_for(agent.registered.wait(), 10)
    await beats_after(agent, 3)  # the node stays fresh meanwhile
    assert not agent.serving.is_set() and agent.registrations == 1
    registry.answer = True  # retried at the next heartbeat
    await m_recorded(registry, agent)


class WithoutOwnReplicaSubject(Registry):
    """A registry from before registry.replica_set.<node_id>: nobody serves it."""

    async def replica_set_self(self, *args: Any, **kwargs: Any) -> Any:
        raise NoResponders("no registryd serves registry.replica_set.<node id>")


async def test_against_an_older_daemon_the_models_go_on_the_shared_subject(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = WithoutOwnReplicaSubject(nc, daemon.settings.subject_prefix)
    await m_recorded(registry, serving_m(registry, agents))


async def test_the_agent_records_again_the_replica_it_lost_not_a_count(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = Registry(nc, daemon.settings.subject_prefix)
    agent, node_id = await routed_agent(registry, agents, replicas_check_every=FAST)
    # A scheduler loads another model on the node, then the agent's replica
    # goes: the node still has one loaded replica, as many as the agent
    # serves, but not the one routers ask it for.
    await registry.replica_set(node_id, "other", state="loaded", address="10.0.0.5:9000")
    await registry.replica_remove(node_id, "qwen3-8b")

    async def routed() -> tuple[str, str] | None:
        try:
            return await routed_to(registry, "qwen3-8b")
        except NotFound:
            return None

    assert await eventually(routed, "the replica recorded again") == (node_id, "10.0.0.5:8000")
    assert (await registry.replica_get(node_id, "other")).state == "loaded"
    assert agent.registrations == 1


async def unloading(registry: Registry, node_id: str, in_flight: int) -> None:
    """A scheduler begins unloading qwen3-8b while routers still hold requests on it."""
    await registry.replica_set(
        node_id, "qwen3-8b", state="unloading", address="10.0.0.5:8000", in_flight=in_flight
    )


async def test_the_agent_leaves_a_replica_a_scheduler_is_unloading(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = Registry(nc, daemon.settings.subject_prefix)
    agent, node_id = await routed_agent(registry, agents, replicas_check_every=FAST)
    await unloading(registry, node_id, in_flight=3)
    await beats_after(agent, 5)  # a check after each, due every FAST
    replica = await registry.replica_get(node_id, "qwen3-8b")
    assert (replica.state, replica.in_flight) == ("unloading", 3)


class WriteOnlyReplicas(WithoutOwnReplicaSubject):
    """A NATS user that may publish the shared replica_set but not replica_get."""

    async def replica_get(self, *args: Any, **kwargs: Any) -> Any:
        raise Timeout("no reply on registry.replica_get within 5s")


async def test_against_an_older_daemon_a_user_that_cannot_read_replicas_still_records(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = WriteOnlyReplicas(nc, daemon.settings.subject_prefix)
    # Read back by a user that may read replicas.
    await m_recorded(Registry(nc, daemon.settings.subject_prefix), serving_m(registry, agents))


class OlderDaemon(WithoutOwnReplicaSubject):
    """Nor did its `self` reply name the node's replicas."""

    async def own_node(self, node_id: str) -> OwnNode:
        return (await super().own_node(node_id)).model_copy(update={"replicas": None})


async def test_against_an_older_daemon_a_replica_recorded_again_keeps_its_requests(
    daemon: Daemon, nc: NATS, agents: Callable[[Agent], Running]
) -> None:
    registry = OlderDaemon(nc, daemon.settings.subject_prefix)
    agent, node_id = await routed_agent(registry, agents, replicas_check_every=FAST)
    # No names to compare: the count (0 loaded of 1) makes the agent record
    # it again, on the shared subject, which sets in_flight as well.
    await unloading(registry, node_id, in_flight=2)

    async def loaded() -> Replica | None:
        replica = await registry.replica_get(node_id, "qwen3-8b")
        return replica if replica.state == "loaded" else None

    replica = await eventually(loaded, "the replica recorded again")
    assert replica.in_flight == 2  # the routers' two requests still counted
    assert agent.registrations == 1


def own(replicas: list[tuple[str, int]] | None, model_count: int = 0) -> OwnNode:
    names = (
        None
        if replicas is None
        else [ReplicaName(model_name=m, replica_index=i, state="loaded") for m, i in replicas]
    )
    return OwnNode(id="n", name="gpu-1", status="healthy", model_count=model_count, replicas=names)


def test_what_a_node_is_missing_of_what_its_worker_serves() -> None:
    m, n, zz = Served("m", 0, "a:1"), Served("n", 0, "a:1"), Served("zz", 0, "a:1")
    # By name: another model's replica does not stand for a lost one.
    assert missing_replicas([m, n], own([("m", 0), ("x", 0)])) == [n]
    assert missing_replicas([m, Served("m", 1, "a:1")], own([("m", 1)])) == [m]
    assert missing_replicas([m, n], own([("m", 0), ("n", 0)])) == []
    # A full listing (the first OWN_REPLICAS by model and index): what would
    # sort past its last name may be there unnamed, and is left alone.
    full = [(f"k-{i:04d}", 0) for i in range(OWN_REPLICAS)]
    assert missing_replicas([Served("a", 0, "a:1"), zz], own(full)) == [Served("a", 0, "a:1")]
    assert missing_replicas([zz], own(full[:-1])) == [zz]  # not full: all named
    # An older daemon gives only a count of loaded replicas.
    assert missing_replicas([m, n], own(None, model_count=1)) == [m, n]
    assert missing_replicas([m, n], own(None, model_count=2)) == []


def test_served_models() -> None:
    assert served_models(None, "a:1") == ()
    assert served_models(["m", ("n", "b:2"), "m"], "a:1") == (
        Served("m", 0, "a:1"),
        Served("n", 0, "b:2"),
        Served("m", 1, "a:1"),  # a second server of m: the next replica index
    )
    assert served_models({"m": None, "n": "b:2"}, "a:1") == (
        Served("m", 0, "a:1"),
        Served("n", 0, "b:2"),
    )
    with pytest.raises(ValueError, match="no address"):
        served_models(["m"], None)
    with pytest.raises(ValueError, match="1-255 characters"):
        served_models(["x" * 256], "a:1")


class OwnNats:
    """A nats-server of this test's own, stopped and started on the same port."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = embedded.free_port()
        self.server = embedded.start_nats(store, self.port)

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = embedded.start_nats(self.store, self.port)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    server = OwnNats(tmp_path / "nats")
    yield server
    server.stop()


async def test_the_agent_rides_out_a_nats_restart(
    own_nats: OwnNats,  # first: torn down after the daemon
    start_daemon: Callable[..., Awaitable[Daemon]],
    pg: asyncpg.Connection,
    agents: Callable[[Agent], Running],
) -> None:
    daemon = await start_daemon(nats_url=own_nats.url)
    registry = await Registry.connect(daemon.settings, request_timeout=1, reconnect_time_wait=0.2)
    try:
        agent = Agent(registry, "gpu-1", address="a:1", vram=FixedVram(1, 2), interval=FAST)
        running = agents(agent)
        await asyncio.wait_for(agent.registered.wait(), 10)
        await beats_after(agent, 1)

        own_nats.stop()
        await eventually(lambda: _true(agent.heartbeats_failing), "a heartbeat to fail")
        row = await node_row(pg, "gpu-1")
        assert row is not None
        stopped_at = row["last_heartbeat"]
        confirmed = agent.confirmed
        own_nats.start()

        await beats_after(agent, 2)  # the agent and the daemon are both back
        assert agent.confirmed > confirmed and agent.registrations == 1
        row = await node_row(pg, "gpu-1")
        assert row is not None and row["last_heartbeat"] > stopped_at
        await running.stop()
        assert (await node_row(pg, "gpu-1"))["status"] == "offline"  # type: ignore[index]
    finally:
        await registry.close()


async def test_registryd_agent_goes_offline_on_sigterm_and_exits_0(
    start_daemon: Callable[..., Awaitable[Daemon]],
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    daemon = await start_daemon(registration_token="s3cret")
    key = tmp_path / "node.key"
    key.write_text("a-node-key-of-32-characters-....\n")
    env = daemon_env | {
        "REGISTRY_SUBJECT_PREFIX": daemon.settings.subject_prefix,
        "REGISTRY_REGISTRATION_TOKEN": "s3cret",  # the token, from the environment
    }
    agent = await spawn(
        "agent",
        "--name=worker-7",
        "--address=10.0.0.7:8000",
        "--label=engine=sglang",
        "--interval=0.2",
        "--vram-command=echo 12345",
        "--total-vram=24GiB",
        f"--node-key-file={key}",
        env=env,
    )

    async def registered() -> asyncpg.Record | None:
        agent.assert_running()
        row = await node_row(pg, "worker-7")
        return row if row is not None and row["available_vram"] == 12345 else None

    row = await eventually(registered, "registryd agent to register worker-7")
    assert row["total_vram"] == 24 * GiB and row["status"] == "pending"
    labels = await pg.fetchval(
        "SELECT jsonb_object_agg(key, value) FROM node_labels WHERE node_id = $1", row["id"]
    )
    assert '"engine": "sglang"' in labels
    nc = await connect(daemon.settings.nats_url)
    try:
        await Registry(nc, daemon.settings.subject_prefix).approve(row["id"])
    finally:
        await nc.close()

    agent.send(signal.SIGTERM)
    assert await agent.exit_code() == 0, agent.output()
    assert (await node_row(pg, "worker-7"))["status"] == "offline"  # type: ignore[index]
    assert "marked offline" in agent.output()


async def test_registryd_agent_with_a_model_is_routed_to_once_approved(
    daemon: Daemon,
    nc: NATS,
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = daemon_env | {
        "REGISTRY_SUBJECT_PREFIX": daemon.settings.subject_prefix,
        "REGISTRY_STATE_DIR": str(tmp_path / "state"),
    }
    agent = await spawn(
        "agent",
        "--name=gpu-1",
        "--address=127.0.0.1:8000",
        "--model=qwen3-8b",
        "--model=embed=127.0.0.1:8001",
        "--interval=0.2",
        env=env,
    )
    registry = Registry(nc, daemon.settings.subject_prefix)

    async def serving() -> str | None:
        agent.assert_running()
        try:
            node = await registry.get(name="gpu-1")
            await registry.replica_get(node.id, "embed")
        except NotFound:
            return None
        return node.id

    node_id = await eventually(serving, "registryd agent to record its models")
    await not_routed(registry, "qwen3-8b")
    await registry.approve(node_id)
    assert await routed_to(registry, "qwen3-8b") == (node_id, "127.0.0.1:8000")
    assert await routed_to(registry, "embed") == (node_id, "127.0.0.1:8001")
    output = agent.output()
    assert "waits for approval (registryd approve gpu-1)" in output
    assert "serves qwen3-8b (replica 0) at 127.0.0.1:8000" in output

    agent.send(signal.SIGTERM)
    assert await agent.exit_code() == 0, agent.output()
    await not_routed(registry, "qwen3-8b")  # offline: its replicas cleared

    homeless = await spawn("agent", "--name=gpu-2", "--model=qwen3-8b", env=env)
    assert await homeless.exit_code() == 2
    assert "--model qwen3-8b needs --address" in homeless.output()


@pytest.mark.parametrize(
    "command", ["agent", "call", "why", "nodes", "node", "models", "intents", "status", "approve"]
)
def test_a_client_commands_help_shows_only_what_a_client_uses(command: str) -> None:
    def help_of(*command: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "daemon", *command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    shown = help_of(command)
    for unused in ("--database-url", "--stream", "--install-timeout", "--max-concurrency"):
        assert unused not in shown
    for used in ("--nats-url", "--nats-creds", "--nats-tls-cert", "--subject-prefix"):
        assert used in shown
    assert "--state-dir" in shown  # where a daemon started with --embedded is found
    if command == "agent":
        assert "--registration-token" in shown and "--model" in shown
    assert "--database-url" in help_of() and "--database-url" in help_of("serve")


async def test_registryd_agent_with_a_wrong_token_exits_1(
    start_daemon: Callable[..., Awaitable[Daemon]],
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    tmp_path: Path,
) -> None:
    daemon = await start_daemon(registration_token="s3cret")
    env = daemon_env | {
        "REGISTRY_SUBJECT_PREFIX": daemon.settings.subject_prefix,
        "REGISTRY_STATE_DIR": str(tmp_path / "state"),
    }
    agent = await spawn("agent", "--name=w", "--address=a:1", "--token=wrong", env=env)
    assert await agent.exit_code() == 1
    assert "401" in agent.output()


# ---------------------------------------------------------------- the node key


def key_hash(pg_row: asyncpg.Record | None) -> str:
    assert pg_row is not None
    return str(pg_row["node_key_hash"])


async def key_row(pg: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await pg.fetchrow(
        "SELECT id, status, address, available_vram, node_key_hash FROM nodes WHERE name = $1",
        name,
    )


@pytest.fixture
async def start_agent(
    start_daemon: Callable[..., Awaitable[Daemon]],
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
) -> Callable[..., Awaitable[Registryd]]:
    """`registryd agent --name=worker-7 ARGS` against a daemon of this test, its
    REGISTRY_STATE_DIR the given directory."""
    daemon = await start_daemon()
    env = daemon_env | {"REGISTRY_SUBJECT_PREFIX": daemon.settings.subject_prefix}

    async def start(state_dir: Path, *args: str) -> Registryd:
        return await spawn(
            "agent",
            "--name=worker-7",
            "--interval=0.2",
            *args,
            env=env | {"REGISTRY_STATE_DIR": str(state_dir)},
        )

    return start


async def registered_with(pg: asyncpg.Connection, agent: Registryd, vram: int) -> asyncpg.Record:
    """worker-7's row once the agent registered it with `vram` free bytes."""

    async def registered() -> asyncpg.Record | None:
        agent.assert_running()
        row = await key_row(pg, "worker-7")
        ok = row is not None and row["available_vram"] == vram and row["status"] != "offline"
        return row if ok else None

    row: asyncpg.Record = await eventually(registered, f"worker-7 registered with {vram} free")
    return row


async def test_registryd_agent_keeps_its_node_key_in_its_state_directory(
    start_agent: Callable[..., Awaitable[Registryd]], pg: asyncpg.Connection, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = await start_agent(state, "--address=10.0.0.7:8000", "--vram-command=echo 111")
    row = await registered_with(pg, first, 111)
    key_file = state / "agent" / "worker-7.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert key_hash(row) == hashlib.sha256(key.encode()).hexdigest()  # bound to the name
    assert [p.name for p in key_file.parent.iterdir()] == ["worker-7.key"]  # no leftovers
    first.send(signal.SIGTERM)
    assert await first.exit_code() == 0, first.output()
    assert "generated a node key" in first.output()

    second = await start_agent(state, "--address=10.0.0.7:8000", "--vram-command=echo 222")
    again = await registered_with(pg, second, 222)  # the same key: accepted
    assert again["id"] == row["id"] and key_hash(again) == key_hash(row)
    assert key_file.read_text().strip() == key
    assert "generated a node key" not in second.output()
    second.send(signal.SIGTERM)
    assert await second.exit_code() == 0, second.output()


async def test_registryd_agent_with_another_key_cannot_take_the_name(
    start_agent: Callable[..., Awaitable[Registryd]], pg: asyncpg.Connection, tmp_path: Path
) -> None:
    owner = await start_agent(tmp_path / "a", "--address=10.0.0.7:8000", "--vram-command=echo 1")
    row = await registered_with(pg, owner, 1)

    other = await start_agent(tmp_path / "b", "--address=10.6.6.6:8000")  # its own new key
    assert await other.exit_code() == 1, other.output()
    output = other.output()
    assert "401" in output and "bound to a node key other than" in output
    assert "node_key_reset" in output and str(tmp_path / "b") in output
    keyless = await start_agent(tmp_path / "c", "--no-node-key", "--address=10.6.6.6:8000")
    assert await keyless.exit_code() == 1, keyless.output()
    assert "401" in keyless.output() and "--no-node-key sends none" in keyless.output()

    owner.assert_running()
    now = await key_row(pg, "worker-7")
    assert now is not None and now["address"] == "10.0.0.7:8000" and now["id"] == row["id"]
    assert key_hash(now) == key_hash(row)


async def test_registryd_agent_without_a_node_key(
    start_agent: Callable[..., Awaitable[Registryd]], pg: asyncpg.Connection, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    agent = await start_agent(state, "--no-node-key", "--address=a:1", "--vram-command=echo 5")
    row = await registered_with(pg, agent, 5)
    assert key_hash(row) == ""  # no key bound: v1
    assert not (state / "agent").exists()
    agent.send(signal.SIGTERM)
    assert await agent.exit_code() == 0, agent.output()


async def test_registryd_agent_with_a_node_key_too_short_exits_2(
    start_agent: Callable[..., Awaitable[Registryd]], tmp_path: Path
) -> None:
    key = tmp_path / "short.key"
    key.write_text("short\n")
    agent = await start_agent(tmp_path / "state", f"--node-key-file={key}", "--address=a:1")
    assert await agent.exit_code() == 2
    assert "16-256 characters" in agent.output()


def test_one_node_key_however_many_start_at_once(tmp_path: Path) -> None:
    path = node_key_path(tmp_path / "state", "gpu-1")
    with ThreadPoolExecutor(16) as pool:
        keys = set(pool.map(lambda _: load_node_key(path), range(64)))
    assert len(keys) == 1 and path.read_text().strip() in keys
    assert sorted(p.name for p in path.parent.iterdir()) == ["gpu-1.key"]
    assert load_node_key(path) in keys  # and the same on every later start


def test_node_key_file_names_stay_in_the_agent_directory(tmp_path: Path) -> None:
    names = ["gpu-1.example.com", "a/b", "..", ".", "../x", "ü" * 200, "x" * 255]
    paths = [node_key_path(tmp_path, name) for name in names]
    assert paths[0].name == "gpu-1.example.com.key"
    assert len(set(paths)) == len(names)
    for path in paths:
        assert path.parent == tmp_path / "agent" and not path.name.startswith(".")
        assert len(path.name.encode()) <= 255
    load_node_key(paths[1])
    assert (tmp_path / "agent").is_dir() and len(list((tmp_path / "agent").iterdir())) == 1


# ---------------------------------------------------------------- VRAM sources


class FakeMemory:
    def __init__(self, free: int, total: int) -> None:
        self.free = free
        self.total = total
        self.used = total - free


def fake_pynvml(devices: list[tuple[int, int]], calls: list[str]) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's pynvml with `devices` as (free, total)."""
    module = types.ModuleType("pynvml")

    def record(name: str, result: Any = None) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls.append(name)
            return result(*args) if callable(result) else result

        return call

    module.nvmlInit = record("init")  # type: ignore[attr-defined]
    module.nvmlShutdown = record("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = record("count", len(devices))  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = record("handle", lambda i: ("handle", i))  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = record(  # type: ignore[attr-defined]
        "memory", lambda handle: FakeMemory(*devices[handle[1]])
    )
    return module


async def test_nvml_readings_sum_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    devices = [(10 * GiB, 24 * GiB), (3 * GiB, 80 * GiB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices, calls))
    source = vram_source()  # nothing given: NVML, since pynvml is there
    assert isinstance(source, NvmlVram)
    assert source.description == "NVML (2 GPUs)" and source.gpu_vendor == "nvidia"
    assert await source.read() == Vram(13 * GiB, 104 * GiB)
    source.close()
    assert calls[0] == "init" and calls[-1] == "shutdown"
    assert calls.count("memory") == 2

    # Given figures or a command win over NVML.
    assert isinstance(vram_source(available=5), FixedVram)
    assert isinstance(vram_source(command="echo 1"), CommandVram)


async def test_nvml_that_fails_is_no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fake_pynvml([(1, 2)], [])

    def lost(handle: Any) -> Any:
        raise RuntimeError("GPU is lost")

    broken.nvmlDeviceGetMemoryInfo = lost  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    source = vram_source()
    assert isinstance(source, NvmlVram)
    assert await source.read() == Vram()

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = no_driver  # type: ignore[attr-defined]
    assert isinstance(vram_source(), FixedVram)  # no NVML: no figures
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert await vram_source().read() == Vram()


async def test_a_vram_command_prints_the_free_bytes() -> None:
    assert await CommandVram("echo 123", total=456).read() == Vram(123, 456)
    assert await CommandVram("printf '7 9\\n'").read() == Vram(7, 9)
    assert await CommandVram("echo oops; exit 3", total=5).read() == Vram(None, 5)
    assert await CommandVram("sleep 5", timeout_s=0.1).read() == Vram()


def test_byte_counts() -> None:
    assert parse_bytes("25769803776") == 24 * GiB
    assert parse_bytes("24GiB") == parse_bytes("24G") == parse_bytes("24 gib") == 24 * GiB
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("1.5GiB") == 3 * GiB // 2
    with pytest.raises(ValueError):
        parse_bytes("24 parsecs")
