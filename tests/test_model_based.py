"""Model-based tests: random sequences of operations against a reference model.

A Hypothesis `RuleBasedStateMachine` drives a real daemon (in-process, on an
event loop that runs in a thread of its own, as the daemon's loop runs all the
time in production) over NATS with random sequences of node operations
(register, approve, offline, unhealthy, drain, healthy, deregister,
heartbeats), health-sweep rounds, replica changes, picks with and without
leases and node sets, releases, lease expiry, misdirected requests (a reply
subject that is not an inbox), bursts of registrations of one new name, and
paging while the cluster changes. A small model in plain Python (`Model`)
says what each step must do under contract v1.1 (approval is sticky, and only
`approve` grants it), and after every step the daemon's state, its events and
its placement and routing answers are compared with the model's:

- a node never approved is never healthy, and no placement or routing
  operation offers it;
- findlock picks a least-loaded loaded replica of a healthy node in the set;
- every replica's in-flight count is the model's (never below zero);
- every status change published exactly one node event, with the right
  previous status, and every removed replica its `prefixcache.invalidate`.

Time is made deterministic: the sweep never runs by itself (a check interval
of an hour); a round is `daemon.sweep.sweep_nodes()`, "the node went silent"
is an UPDATE of its last heartbeat an hour back, and "the lease expired" an
UPDATE of its expiry a second back, each followed by the round that notices.

REGISTRY_MODEL_EXAMPLES raises the number of examples (default 40 per daemon
configuration, some 15 s each) for a long run. Hypothesis shrinks a failure to
a short example before it reports it, which can take it five minutes.

The failures Hypothesis found are kept below the machine as plain tests,
written out step by step (`test_regression_…`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from daemon.app import Daemon
from tests.support import CallError, Client, Listener, connect, fails

T = TypeVar("T")

EXAMPLES = int(os.environ.get("REGISTRY_MODEL_EXAMPLES", "40"))
STEPS = 30
STEP_TIMEOUT = 60.0  # seconds one step may take, at most

# The sweep runs only when a rule says so; a node is stale after 30 minutes
# without a heartbeat, and "silent" means an hour without one.
DAEMON = {"check_interval": 3600.0, "stale_after": 1800.0, "drain_interval": 3600.0}

NAMES = ("gpu-a", "gpu-b", "gpu-c")
MODELS = ("m0", "m1")
INDEXES = (0, 1)
LABEL_KEYS = ("zone", "tier")
STATES = ("loaded", "loaded", "loading", "unloading", "idle")
LEASE_S = 600.0  # never runs out by itself within a test
NO_SUCH_NODE = "no-such-node"
INVALIDATE = "prefixcache.invalidate"
STATUS_OPS = {
    "offline": "offline",
    "offline_self": "offline",
    "unhealthy": "unhealthy",
    "drain": "draining",
    "healthy": "healthy",
}

Key = tuple[str, str, int]  # node id, model, replica index


# ---------------------------------------------------------------- the model


@dataclass
class Node:
    id: str
    name: str
    status: str
    approved: bool
    labels: dict[str, str]  # the worker's own (LABEL_KEYS), not the automatic ones
    max_replicas: int
    # The last heartbeat is within stale_after.
    fresh: bool = True
    # It heartbeated since its last change (last_heartbeat > status_since), what
    # the sweep needs to revive an unhealthy or offline node. None: either,
    # after a status operation that left the status as it was (whether that
    # counts as a change is the daemon's to say).
    beat_since_change: bool | None = False
    # The node_key bound to its name (v1.2); None: none bound.
    key: str | None = None
    # An admin set max_replicas: re-registration leaves the cap alone.
    cap_by_admin: bool = False


@dataclass
class Replica:
    state: str
    in_flight: int


@dataclass(frozen=True)
class Event:
    """A node event, as far as the invariants compare it."""

    node_id: str
    name: str
    status: str
    previous: str | None


@dataclass
class Model:
    nodes: dict[str, Node] = field(default_factory=dict)  # by name
    gone: dict[str, str] = field(default_factory=dict)  # name -> id of its deregistered node
    replicas: dict[Key, Replica] = field(default_factory=dict)
    leases: dict[str, Key] = field(default_factory=dict)  # lease id -> its replica
    issued: list[str] = field(default_factory=list)  # every lease id handed out

    def by_id(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes.values() if n.id == node_id), None)

    def id_for(self, name: str) -> str:
        """The id a client would use for `name`: its node's, else the id it had."""
        node = self.nodes.get(name)
        if node is not None:
            return node.id
        return self.gone.get(name, NO_SUCH_NODE)

    def remove_replicas(self, node_id: str) -> list[str]:
        """Drop every replica of a node (and their leases): the models they were of."""
        keys = [k for k in self.replicas if k[0] == node_id]
        for key in keys:
            self.drop_replica(key)
        return sorted({k[1] for k in keys})

    def drop_replica(self, key: Key) -> None:
        del self.replicas[key]
        for lease_id in [i for i, k in self.leases.items() if k == key]:
            del self.leases[lease_id]

    def release(self, lease_id: str) -> None:
        key = self.leases.pop(lease_id)
        replica = self.replicas[key]
        replica.in_flight = max(replica.in_flight - 1, 0)

    def healthy(self, node_ids: list[str] | None = None) -> list[Node]:
        return [
            n
            for n in self.nodes.values()
            if n.status == "healthy" and (not node_ids or n.id in node_ids)
        ]

    def routable(self, model: str, node_ids: list[str] | None) -> list[Key]:
        """The replicas findlock may pick: loaded, on healthy nodes of the set."""
        healthy = {n.id for n in self.healthy(node_ids)}
        return [
            k
            for k, r in self.replicas.items()
            if k[1] == model and r.state == "loaded" and k[0] in healthy
        ]

    def load(self, node_id: str) -> int:
        return sum(r.in_flight for k, r in self.replicas.items() if k[0] == node_id)

    def busy(self, node_id: str) -> bool:
        return any(k[0] == node_id and r.state == "loaded" for k, r in self.replicas.items())

    def slots_taken(self, node_id: str, model: str) -> int:
        return sum(1 for k in self.replicas if k[0] == node_id and k[1] == model)


# ---------------------------------------------------------------- the harness


@dataclass
class Harness:
    """One daemon, a client and what it listens to, on the loop of the test's thread."""

    loop: asyncio.AbstractEventLoop
    daemon: Daemon
    client: Client
    pg: asyncpg.Connection
    events: Subscription  # <prefix>.events.node.>
    invalidations: Subscription  # prefixcache.invalidate
    # Where a misdirected request would have had its reply published.
    spies: list[Subscription]

    @classmethod
    async def start(cls, daemon: Daemon, database_url: str) -> Harness:
        await daemon.start()
        settings = daemon.settings
        nc = await connect(settings.nats_url)
        prefix = settings.subject_prefix
        spied = [
            f"{prefix}.approve",
            f"{prefix}.deregister",
            f"{prefix}.offline",
            f"{prefix}.drain",
            f"$JS.API.STREAM.DELETE.{settings.stream}",
            f"$JS.API.STREAM.PURGE.{settings.stream}",
        ]
        harness = cls(
            loop=asyncio.get_running_loop(),
            daemon=daemon,
            client=Client(nc, prefix),
            pg=await asyncpg.connect(database_url),
            events=await nc.subscribe(f"{prefix}.events.node.>"),
            invalidations=await nc.subscribe(INVALIDATE),
            spies=[await nc.subscribe(subject) for subject in spied],
        )
        await nc.flush()
        return harness

    async def stop(self) -> None:
        await self.client.nc.close()
        await self.pg.close()
        await self.daemon.stop(grace=5)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return in_loop(self.loop, coro)

    @property
    def prefix(self) -> str:
        return self.client.prefix

    async def settle(self) -> None:
        """Everything the daemon published so far has reached our subscriptions."""
        assert self.daemon.nc is not None
        await self.daemon.nc.flush()
        await self.client.nc.flush()

    @staticmethod
    async def take(sub: Subscription) -> list[Msg]:
        out = []
        while sub.pending_msgs:
            out.append(await sub.next_msg(timeout=1))
        return out

    async def reset(self) -> None:
        """A registry as new, for the next example."""
        # Replicas, labels and leases go with their nodes (ON DELETE CASCADE).
        await self.pg.execute("DELETE FROM nodes")
        await self.settle()
        for sub in (self.events, self.invalidations, *self.spies):
            await self.take(sub)

    async def errors(self, op: str) -> int:
        """The endpoint's error count in $SRV.STATS."""
        assert self.daemon.service is not None
        msg = await self.client.nc.request(
            f"$SRV.STATS.registry.{self.daemon.service.id}", b"", timeout=5
        )
        stats = {e["name"]: e for e in orjson.loads(msg.data)["endpoints"]}
        return int(stats[op]["num_errors"])


async def rejected(call: Coroutine[Any, Any, Any], code: int) -> CallError:
    try:
        result = await call
    except CallError as err:
        assert err.code == code, f"wanted {code}, got {err}"
        return err
    raise AssertionError(f"wanted an error {code}, got {result!r}")


def names_of(nodes: list[dict[str, Any]]) -> list[str]:
    return [n["name"] for n in nodes]


# ---------------------------------------------------------------- strategies

names = st.sampled_from(NAMES)
models = st.sampled_from(MODELS)
indexes = st.sampled_from(INDEXES)
labels = st.none() | st.dictionaries(
    st.sampled_from(LABEL_KEYS), st.sampled_from(("a", "b")), max_size=2
)
# None: no `node_ids`; a list (maybe empty, "every node"): those nodes' ids.
node_sets = st.none() | st.lists(names, max_size=3, unique=True)
ATTACKS = (
    "replica_get->approve",
    "replica_get->deregister",
    "replica_get->offline",
    "replica_get->drain",
    "heartbeat->stream.delete",
    "heartbeat->stream.purge",
)
# A worker's own key, another worker's, or none (a LocalAI worker).
KEYS = (None, "k" * 20 + "-worker-a", "k" * 20 + "-worker-b")
# What admins and workers do to a node; "silence" is a worker that stopped
# heartbeating an hour ago.
LIFECYCLE = (
    "register",
    "offline",
    "heartbeat",
    "unhealthy",
    "approve",
    "drain",
    "healthy",
    "silence",
    "offline_self",
    "heartbeat_published",
    "deregister",
)
PLACEMENT = ("find_vram", "find_idle", "find_least_loaded", "free_slots")
PAGING_CHANGES = (
    "register",
    "register_new",
    "deregister",
    "approve",
    "offline",
    "offline_self",
    "unhealthy",
    "drain",
    "healthy",
    "heartbeat",
    "findlock",
)


# ---------------------------------------------------------------- the machine


class RegistryMachine(RuleBasedStateMachine):
    harness: ClassVar[Harness]
    auto_offline: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.h = type(self).harness
        self.model = Model()
        self.known: set[str] = set()  # every node id of this example
        self.fresh_names = 0
        # What the steps since the last check must have published.
        self.required: list[Event] = []
        self.optional: list[Event] = []
        self.invalidated: list[tuple[str, str, int]] = []
        self.at_stake = 0
        self.in_flight = 0
        self.h.run(self.h.reset())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.h.run(coro)

    async def call(self, op: str, body: dict[str, Any]) -> Any:
        return await self.h.client.call(op, body)

    def node_ids(self, chosen: list[str] | None) -> list[str] | None:
        if chosen is None:
            return None
        return [self.model.id_for(name) for name in chosen]

    def fresh_name(self, stem: str) -> str:
        self.fresh_names += 1
        return f"{stem}-{self.fresh_names}"

    # ------------------------------------------------------------ operations

    async def register(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        max_replicas: int | None = None,
        key: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"name": name, "address": f"{name}.local:50051"}
        if labels is not None:
            body["labels"] = labels
        if max_replicas is not None:
            body["max_replicas_per_model"] = max_replicas
        if key is not None:
            body["node_key"] = key
        node = self.model.nodes.get(name)
        if node is not None and node.key is not None and key != node.key:
            # Whoever registers a keyed name without its key changes nothing:
            # the invariants after this step check that nothing moved.
            await rejected(self.call("register", body), 401)
            return
        reply = await self.call("register", body)
        if node is not None and node.key is None:
            node.key = key  # the first registration that carries a key binds it
        if node is None:
            assert reply["id"] not in self.known, "a new node got an old node's id"
            node = Node(reply["id"], name, "pending", False, dict(labels or {}), max_replicas or 1)
            node.key = key
            self.model.nodes[name] = node
            self.known.add(node.id)
            self.required.append(Event(node.id, name, "pending", None))
        else:
            assert reply["id"] == node.id, "re-registration changed the node's id"
            # The worker restarted: nothing it had loaded is loaded any more.
            for model in self.model.remove_replicas(node.id):
                self.invalidated.append((model, node.id, -1))
            previous = node.status
            node.status = "healthy" if node.approved else "pending"
            node.labels.update(labels or {})
            if not node.cap_by_admin:
                node.max_replicas = max_replicas or node.max_replicas
            node.fresh, node.beat_since_change = True, False
            self.required.append(Event(node.id, name, node.status, previous))
        assert reply["status"] == node.status, (
            f"register {name}: the reply says {reply['status']}, the model {node.status} "
            f"(approved: {node.approved})"
        )

    async def admin_edit(self, kind: str, name: str, cap: int) -> None:
        """An admin's edit of a node that is not a status change: the sweep
        must see none (it once held a node down after node_key_reset)."""
        node = self.model.nodes.get(name)
        body: dict[str, Any] = {"node_id": self.model.id_for(name)}
        if kind == "auth_refs":
            body |= {"auth_user_id": f"user-{name}", "api_key_id": f"key-{name}"}
        elif kind == "max_replicas":
            body["max_replicas_per_model"] = cap
        if node is None:
            await rejected(self.call(kind, body), 404)
            return
        await self.call(kind, body)
        if kind == "node_key_reset":
            node.key = None
        elif kind == "max_replicas":
            node.max_replicas, node.cap_by_admin = cap, True

    async def approve(self, name: str) -> None:
        node = self.model.nodes.get(name)
        body = {"node_id": self.model.id_for(name)}
        if node is None:
            await rejected(self.call("approve", body), 404)
        elif node.status != "pending":
            await rejected(self.call("approve", body), 409)
        else:
            reply = await self.call("approve", body)
            assert reply["status"] == "healthy"
            node.status, node.approved, node.beat_since_change = "healthy", True, False
            self.required.append(Event(node.id, name, "healthy", "pending"))

    async def change_status(self, op: str, name: str) -> None:
        node = self.model.nodes.get(name)
        node_id = self.model.id_for(name)
        # A worker goes offline on its own subject (v1.2), an admin on the shared one.
        subject = f"offline.{node_id}" if op == "offline_self" else op
        body = {} if op == "offline_self" else {"node_id": node_id}
        if node is None:
            await rejected(self.call(subject, body), 404)
            return
        if op == "healthy" and not node.approved:
            await rejected(self.call(subject, body), 409)
            return
        assert await self.call(subject, body) == {}
        target = STATUS_OPS[op]
        if target in ("offline", "draining"):
            for model in self.model.remove_replicas(node.id):
                self.invalidated.append((model, node.id, -1))
        if node.status != target:
            self.required.append(Event(node.id, name, target, node.status))
            node.status, node.beat_since_change = target, False
        elif node.beat_since_change:
            node.beat_since_change = None

    async def deregister(self, name: str) -> None:
        node = self.model.nodes.get(name)
        body = {"node_id": self.model.id_for(name)}
        if node is None:
            await rejected(self.call("deregister", body), 404)
            return
        reply = await self.call("deregister", body)
        assert isinstance(reply, dict)
        for model in self.model.remove_replicas(node.id):
            self.invalidated.append((model, node.id, -1))
        self.required.append(Event(node.id, name, "deregistered", node.status))
        del self.model.nodes[name]
        self.model.gone[name] = node.id

    async def heartbeat(self, name: str, published: bool = False) -> None:
        """A heartbeat, asking for a reply or published as workers do."""
        node = self.model.nodes.get(name)
        subject = f"heartbeat.{self.model.id_for(name)}"
        if published:
            await self.h.client.nc.publish(f"{self.h.prefix}.{subject}", b'{"available_ram": 1}')
            # Heartbeats are written in arrival order, batched: once one sent
            # after it is answered, the published one is written too.
            await rejected(self.call(f"heartbeat.{NO_SUCH_NODE}", {}), 404)
        elif node is None:
            await rejected(self.call(subject, {}), 404)
        else:
            assert await self.call(subject, {"available_ram": 1}) == {}
        if node is not None:
            node.fresh, node.beat_since_change = True, True

    async def findlock(self, model: str, lease: bool, chosen: list[str] | None) -> None:
        node_ids = self.node_ids(chosen)
        body: dict[str, Any] = {"model": model}
        if node_ids is not None:
            body["node_ids"] = node_ids
        if lease:
            body["lease_s"] = LEASE_S
        candidates = self.model.routable(model, node_ids)
        if not candidates:
            await rejected(self.call("findlock", body), 404)
            return
        reply = await self.call("findlock", body)
        picked = reply["replica"]
        key = (picked["node_id"], picked["model_name"], picked["replica_index"])
        assert key in candidates, f"findlock picked {key}, not one of {candidates}"
        least = min(self.model.replicas[k].in_flight for k in candidates)
        replica = self.model.replicas[key]
        assert replica.in_flight == least, (
            f"findlock picked {key} with {replica.in_flight} in flight; the least is {least}"
        )
        replica.in_flight += 1
        assert picked["in_flight"] == replica.in_flight
        assert reply["node"]["id"] == key[0] and reply["node"]["status"] == "healthy"
        node = self.model.by_id(key[0])
        assert node is not None and node.approved, "findlock offered a never-approved node"
        if lease:
            lease_id = picked["lease_id"]
            assert lease_id not in self.model.issued
            self.model.leases[lease_id] = key
            self.model.issued.append(lease_id)
        else:
            assert "lease_id" not in picked

    async def sweep(self) -> None:
        """One round of the health sweep (and of lease expiry), and what it changed."""
        stale_status = "offline" if self.auto_offline else "unhealthy"
        due: dict[str, str] = {}  # node id -> the status the round must give it
        may: dict[str, str] = {}  # ... may give it
        for node in self.model.nodes.values():
            if node.status == "healthy" and not node.fresh:
                due[node.id] = stale_status
            elif node.status in ("unhealthy", "offline") and node.fresh and node.approved:
                if node.beat_since_change:
                    due[node.id] = "healthy"
                elif node.beat_since_change is None:
                    may[node.id] = "healthy"
        await self.check_events()  # what came before the round
        assert self.h.daemon.sweep is not None
        await self.h.daemon.sweep.sweep_nodes()
        await self.h.daemon.sweep.expire_leases()
        await self.h.settle()
        changed: dict[str, Event] = {}
        for msg in await self.h.take(self.h.events):
            event = parse_event(msg, self.h.prefix)
            node = self.model.by_id(event.node_id)
            assert node is not None, f"the sweep changed a node it does not have: {event}"
            wanted = due.get(node.id) or may.get(node.id)
            assert event == Event(node.id, node.name, str(wanted), node.status), (
                f"the sweep published {event}; the model says {node.name} "
                f"(status {node.status}, approved {node.approved}, fresh {node.fresh}, "
                f"heartbeat since its last change {node.beat_since_change}) "
                + (f"becomes {wanted}" if wanted else "stays")
            )
            assert event.node_id not in changed, f"two events for one change: {event}"
            changed[event.node_id] = event
        missing = due.keys() - changed.keys()
        assert not missing, "the sweep left alone " + ", ".join(
            f"{self.model.by_id(i)} (due to become {due[i]})" for i in missing
        )
        for node_id, event in changed.items():
            node = self.model.by_id(node_id)
            assert node is not None
            node.status, node.beat_since_change = event.status, False
            if event.status == "offline":
                for model in self.model.remove_replicas(node_id):
                    self.invalidated.append((model, node_id, -1))

    async def replica_set(
        self, name: str, model: str, index: int, state: str, in_flight: int
    ) -> None:
        node = self.model.nodes.get(name)
        body = {
            "node_id": self.model.id_for(name),
            "model": model,
            "replica_index": index,
            "state": state,
            "in_flight": in_flight,
        }
        if node is None:
            await rejected(self.call("replica_set", body), 404)
            return
        reply = await self.call("replica_set", body)
        assert (reply["state"], reply["in_flight"]) == (state, in_flight)
        # An existing row is updated in place: its leases stay.
        self.model.replicas[(node.id, model, index)] = Replica(state, in_flight)

    async def replica_remove(self, name: str, model: str, index: int) -> None:
        node_id = self.model.id_for(name)
        body = {"node_id": node_id, "model": model, "replica_index": index}
        assert await self.call("replica_remove", body) == {}
        key = (node_id, model, index)
        if key in self.model.replicas:
            self.model.drop_replica(key)
            self.invalidated.append((model, node_id, index))

    async def inflight_dec(self, name: str, model: str, index: int) -> None:
        node_id = self.model.id_for(name)
        body = {"node_id": node_id, "model": model, "replica_index": index}
        assert await self.call("inflight_dec", body) == {}
        replica = self.model.replicas.get((node_id, model, index))
        if replica is not None:
            replica.in_flight = max(replica.in_flight - 1, 0)

    async def release(self, lease_id: str) -> None:
        assert await self.call("inflight_dec", {"lease_id": lease_id}) == {}
        if lease_id in self.model.leases:
            self.model.release(lease_id)

    async def expire(self, lease_ids: list[str]) -> None:
        await self.h.pg.execute(
            "UPDATE leases SET expires_at = now() - interval '1 second' WHERE id = ANY($1)",
            lease_ids,
        )
        assert self.h.daemon.sweep is not None
        await self.h.daemon.sweep.expire_leases()
        for lease_id in lease_ids:
            if lease_id in self.model.leases:
                self.model.release(lease_id)

    async def silence(self, name: str) -> None:
        node = self.model.nodes.get(name)
        if node is None:
            return
        await self.h.pg.execute(
            "UPDATE nodes SET last_heartbeat = now() - interval '1 hour' WHERE id = $1", node.id
        )
        node.fresh, node.beat_since_change = False, False

    async def placement(self, op: str, model: str, chosen: list[str] | None) -> None:
        """A placement answer agrees with the model: only healthy (so approved)
        backend nodes of the set, and the right ones."""
        node_ids = self.node_ids(chosen)
        body: dict[str, Any] = {}
        if node_ids is not None:
            body["node_ids"] = node_ids
        healthy = self.model.healthy(node_ids)
        if op == "free_slots":
            body["model"] = model
            free = [n for n in healthy if self.model.slots_taken(n.id, model) < n.max_replicas]
            got = await self.call(op, body)
            assert names_of(got) == sorted(n.name for n in free), f"{op} {body}"
            return
        if op == "find_idle":
            candidates = [n for n in healthy if not self.model.busy(n.id)]
        else:
            candidates = healthy
        if not candidates:
            await rejected(self.call(op, body), 404)
            return
        got = await self.call(op, body)
        node = self.model.nodes.get(got["name"])
        assert node in candidates, f"{op} {body} gave {got['name']} ({got['status']})"
        assert node is not None and node.approved
        if op == "find_least_loaded":
            assert self.model.load(node.id) == min(self.model.load(n.id) for n in candidates)
        if op == "find_vram" and any(not self.model.busy(n.id) for n in candidates):
            assert not self.model.busy(node.id), "find_vram passed over an idle node"

    async def attack(self, kind: str, name: str) -> None:
        """A request whose reply subject is not an inbox: no reply, no change."""
        h = self.h
        node_id = self.model.id_for(name)
        source, target = kind.split("->")
        if source == "replica_get":
            mine = [k for k in self.model.replicas if k[0] == node_id]
            key = mine[0] if mine else (node_id, MODELS[0], 0)
            subject = f"{h.prefix}.replica_get"
            body = orjson.dumps({"node_id": key[0], "model": key[1], "replica_index": key[2]})
            reply_to = f"{h.prefix}.{target}"
        else:
            subject = f"{h.prefix}.heartbeat.{node_id}"
            body = b'{"available_vram": 1}'
            verb = target.removeprefix("stream.").upper()
            reply_to = f"$JS.API.STREAM.{verb}.{h.daemon.settings.stream}"
        before = await h.errors(source)
        beats = await h.pg.fetch("SELECT id, last_heartbeat FROM nodes ORDER BY id")
        for _ in range(2):
            await h.client.nc.publish(subject, body, reply=reply_to)
        # Requests on one subscription are dispatched in order: once this one
        # is answered, the two before it have been turned away.
        if source == "replica_get":
            try:
                await h.client.call("replica_get", orjson.loads(body))
                failed = 0
            except CallError:
                failed = 1
        else:
            await rejected(h.client.call("heartbeat.no-such-node", {}), 404)
            failed = 1
        assert await h.errors(source) == before + 2 + failed, "a misdirected request was served"
        after = await h.pg.fetch("SELECT id, last_heartbeat FROM nodes ORDER BY id")
        assert after == beats, "a misdirected heartbeat was written"
        await h.client.nc.jetstream().stream_info(h.daemon.settings.stream)

    async def register_burst(self, count: int) -> None:
        """Concurrent registrations of one new name: one node, one new-node event."""
        name = self.fresh_name("burst")
        body = {"name": name, "address": f"{name}.local:50051"}
        replies = await asyncio.gather(*(self.call("register", body) for _ in range(count)))
        ids = {r["id"] for r in replies}
        assert len(ids) == 1, f"{count} registrations of {name} made nodes {ids}"
        assert {r["status"] for r in replies} == {"pending"}
        node = Node(ids.pop(), name, "pending", False, {}, 1)
        self.model.nodes[name] = node
        self.known.add(node.id)
        self.required.append(Event(node.id, name, "pending", None))
        # The others re-registered it (an event each, or none: the status stayed).
        self.optional.extend([Event(node.id, name, "pending", "pending")] * (count - 1))

    async def walk(self, changes: list[tuple[str, str]]) -> None:
        """`list` a page of one at a time, changing the cluster between pages: a
        node present throughout is never skipped, none comes twice."""
        present = {n.id for n in self.model.nodes.values()}
        seen: list[dict[str, Any]] = []
        after: str | None = None
        pending = list(changes)
        while True:
            body: dict[str, Any] = {"limit": 1}
            if after is not None:
                body["after"] = after
            items, headers = await self.h.client.call_with_headers("list", **body)
            assert len(items) <= 1
            seen.extend(items)
            after = headers.get("Registry-Next")
            if after is None:
                break
            assert len(seen) < 100, "paging does not end"
            if pending:
                await self.apply(*pending.pop(0))
        listed = names_of(seen)
        assert listed == sorted(set(listed)), f"pages out of order or repeated: {listed}"
        throughout = present & {n.id for n in self.model.nodes.values()}
        skipped = throughout - {n["id"] for n in seen}
        assert not skipped, f"paging skipped {skipped}, present throughout; listed {listed}"

    async def apply(self, op: str, name: str = "") -> None:
        """A step of LIFECYCLE or PAGING_CHANGES, or a sweep."""
        if op == "sweep":
            await self.sweep()
        elif op == "register":
            await self.register(name)
        elif op == "register_new":
            await self.register(self.fresh_name("page"))
        elif op in STATUS_OPS:
            await self.change_status(op, name)
        elif op == "findlock":
            await self.findlock(MODELS[0], True, None)
        elif op == "heartbeat_published":
            await self.heartbeat(name, published=True)
        else:
            await {
                "approve": self.approve,
                "deregister": self.deregister,
                "heartbeat": self.heartbeat,
                "silence": self.silence,
            }[op](name)

    # ------------------------------------------------------------ checks

    async def check_events(self) -> None:
        h = self.h
        await h.settle()
        actual = [parse_event(msg, h.prefix) for msg in await h.take(h.events)]
        left = Counter(actual)
        for event in self.required:
            assert left[event] > 0, f"missing {event}; published {actual}"
            left[event] -= 1
        for event in self.optional:
            if left[event] > 0:
                left[event] -= 1
        extra = list(left.elements())
        assert not extra, f"unexpected {extra}; expected {self.required} (published {actual})"
        gone = []
        for msg in await h.take(h.invalidations):
            body = orjson.loads(msg.data)
            if body["node_id"] in self.known:
                gone.append((body["model"], body["node_id"], body["replica"]))
        assert Counter(gone) == Counter(self.invalidated), (
            f"prefixcache.invalidate: got {sorted(gone)}, wanted {sorted(self.invalidated)}"
        )
        for spy in h.spies:
            for msg in await h.take(spy):
                assert msg.reply, f"something published a reply on {msg.subject}: {msg.data!r}"
        self.required, self.optional, self.invalidated = [], [], []

    async def check_state(self) -> None:
        pg, model = self.h.pg, self.model
        rows = await pg.fetch("SELECT id, name, status FROM nodes")
        status = {r["id"]: r["status"] for r in rows}
        for node in model.nodes.values():
            if not node.approved:
                assert status.get(node.id) != "healthy", (
                    f"{node.name} was never approved, and it is healthy"
                )
        assert {r["name"]: (r["id"], r["status"]) for r in rows} == {
            n.name: (n.id, n.status) for n in model.nodes.values()
        }
        rows = await pg.fetch(
            "SELECT node_id, model_name, replica_index, state, in_flight FROM replicas"
        )
        assert all(r["in_flight"] >= 0 for r in rows), "in flight below zero"
        assert {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows} == {
            k: (r.state, r.in_flight) for k, r in model.replicas.items()
        }
        rows = await pg.fetch("SELECT id, node_id, model_name, replica_index FROM leases")
        assert {r[0]: (r[1], r[2], r[3]) for r in rows} == model.leases
        rows = await pg.fetch(
            "SELECT node_id, key, value FROM node_labels WHERE key = ANY($1)", list(LABEL_KEYS)
        )
        assert {(r[0], r[1], r[2]) for r in rows} == {
            (n.id, k, v) for n in model.nodes.values() for k, v in n.labels.items()
        }

    async def check_placement(self) -> None:
        """Every placement answer, asked at once (they only read)."""
        await asyncio.gather(
            self.selector({}),
            self.selector({"zone": "a"}),
            *(self.placement(op, MODELS[0], None) for op in PLACEMENT[:3]),
            *(self.placement("free_slots", model, None) for model in MODELS),
        )

    async def selector(self, selector: dict[str, str]) -> None:
        got = await self.call("find_selector", {"selector": selector})
        matching = [
            n
            for n in self.model.healthy()
            if all(n.labels.get(k) == v for k, v in selector.items())
        ]
        assert names_of(got) == sorted(n.name for n in matching), f"find_selector {selector}"

    @invariant()
    def agrees_with_the_model(self) -> None:
        self.run(self.check_events())
        self.run(self.check_state())
        self.run(self.check_placement())
        # How hard this example has pressed where bugs were found, for
        # Hypothesis's targeted search (teardown reports the highest).
        self.at_stake = max(
            self.at_stake,
            sum(
                1 + bool(n.beat_since_change)
                for n in self.model.nodes.values()
                if not n.approved and n.status != "pending"
            ),
        )
        self.in_flight = max(self.in_flight, sum(r.in_flight for r in self.model.replicas.values()))

    def teardown(self) -> None:
        target(float(self.at_stake), label="never-approved nodes out of pending")
        target(float(self.in_flight), label="units in flight")

    # ------------------------------------------------------------ rules

    @initialize(count=st.integers(0, len(NAMES)), approved=st.sets(names))
    def some_nodes(self, count: int, approved: set[str]) -> None:
        for name in NAMES[:count]:
            self.run(self.register(name))
            if name in approved:
                self.run(self.approve(name))

    @rule(
        name=names,
        labels=labels,
        max_replicas=st.none() | st.integers(1, 2),
        key=st.sampled_from(KEYS),
    )
    def register_node(
        self,
        name: str,
        labels: dict[str, str] | None,
        max_replicas: int | None,
        key: str | None,
    ) -> None:
        self.run(self.register(name, labels, max_replicas, key))

    @rule(
        kind=st.sampled_from(["node_key_reset", "auth_refs", "max_replicas"]),
        name=names,
        cap=st.integers(1, 2),
    )
    def edit_node(self, kind: str, name: str, cap: int) -> None:
        self.run(self.admin_edit(kind, name, cap))

    # A node's life, one rule for all of it rather than one per operation:
    # Hypothesis turns a random subset of the rules off in each example
    # (swarm testing), and the sequences that matter most (register, take it
    # offline, heartbeat, sweep, register again) must not need four rules on.
    @rule(step=st.tuples(st.sampled_from(LIFECYCLE), names) | st.just(("sweep",)))
    def lifecycle(self, step: tuple[str, ...]) -> None:
        self.run(self.apply(*step))

    @rule()
    def health_sweep(self) -> None:
        self.run(self.sweep())

    @rule(
        name=names,
        model=models,
        index=indexes,
        state=st.sampled_from(STATES),
        in_flight=st.integers(0, 2),
    )
    def set_replica(self, name: str, model: str, index: int, state: str, in_flight: int) -> None:
        self.run(self.replica_set(name, model, index, state, in_flight))

    @rule(name=names, model=models, index=indexes)
    def remove_replica(self, name: str, model: str, index: int) -> None:
        self.run(self.replica_remove(name, model, index))

    @rule(model=models, lease=st.booleans(), chosen=node_sets)
    def find_and_lock(self, model: str, lease: bool, chosen: list[str] | None) -> None:
        self.run(self.findlock(model, lease, chosen))

    @rule(name=names, model=models, index=indexes)
    def done_with_replica(self, name: str, model: str, index: int) -> None:
        self.run(self.inflight_dec(name, model, index))

    @rule(expires=st.booleans(), data=st.data())
    def lease_ends(self, expires: bool, data: st.DataObject) -> None:
        """A lease is released by its router (maybe twice), or runs out."""
        if not expires:
            issued = self.model.issued or ["no-such-lease"]
            self.run(self.release(data.draw(st.sampled_from(issued), label="lease_id")))
            return
        live = [i for i in self.model.issued if i in self.model.leases]  # in a stable order
        chosen = data.draw(st.lists(st.sampled_from(live), unique=True) if live else st.just([]))
        self.run(self.expire(chosen))

    @rule(
        op=st.sampled_from(PLACEMENT),
        model=models,
        chosen=node_sets,
    )
    def place(self, op: str, model: str, chosen: list[str] | None) -> None:
        self.run(self.placement(op, model, chosen))

    @rule(kind=st.sampled_from(ATTACKS), name=names)
    def misdirected_request(self, kind: str, name: str) -> None:
        self.run(self.attack(kind, name))

    @rule(count=st.integers(2, 10))
    def registrations_at_once(self, count: int) -> None:
        self.run(self.register_burst(count))

    @rule(changes=st.lists(st.tuples(st.sampled_from(PAGING_CHANGES), names), max_size=5))
    def page_through_a_changing_cluster(self, changes: list[tuple[str, str]]) -> None:
        self.run(self.walk(changes))


def parse_event(msg: Msg, prefix: str) -> Event:
    body = orjson.loads(msg.data)
    assert msg.subject == f"{prefix}.events.node.{body['node_id']}", msg.subject
    return Event(body["node_id"], body["name"], body["status"], body["previous_status"])


@pytest.mark.slow
@pytest.mark.timeout(120 + EXAMPLES * 30)
@pytest.mark.parametrize("auto_offline", [False, True], ids=["stale-unhealthy", "stale-offline"])
def test_the_registry_follows_its_model(
    auto_offline: bool, settings_for: Any, database_url: str
) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="registryd-loop", daemon=True)
    thread.start()
    try:
        daemon = Daemon(settings_for(**DAEMON, auto_offline=auto_offline), env={})
        harness = in_loop(loop, Harness.start(daemon, database_url))
        machine = type(
            "RegistryMachine",
            (RegistryMachine,),
            {"harness": harness, "auto_offline": auto_offline},
        )
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=EXAMPLES,
                    stateful_step_count=STEPS,
                    deadline=None,
                    database=None,
                    print_blob=True,
                    report_multiple_bugs=False,
                    suppress_health_check=list(HealthCheck),
                ),
            )
        finally:
            in_loop(loop, harness.stop())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def in_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the loop of the daemon's thread and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=STEP_TIMEOUT)


# ---------------------------------------------------------------- regressions
#
# Each was the shrunk failing example of the machine above on the daemon as
# it was before approval became a stored, sticky fact (CONTRACT v1.1), written
# out step by step.


async def listen_for_node_events(client: Client) -> Listener:
    return await client.listen(f"{client.prefix}.events.node.>")


async def changes(listener: Listener, client: Client, daemon: Daemon) -> list[tuple[Any, Any]]:
    """(status, previous_status) of the node events published so far."""
    assert daemon.nc is not None
    await daemon.nc.flush()  # events the daemon published outside a request, too
    return [(e["status"], e["previous_status"]) for e in await listener.drained(client.nc)]


async def not_placeable(client: Client) -> None:
    """No placement or routing operation offers any node."""
    assert await client.call("find_selector") == []
    assert await client.call("free_slots", model="m0") == []
    for op in ("find_vram", "find_idle", "find_least_loaded"):
        await fails(client.call(op), 404)
    await fails(client.call("findlock", model="m0"), 404)


@pytest.mark.parametrize("op", ["offline", "unhealthy", "drain"])
async def test_regression_registering_again_does_not_approve_a_node(
    op: str, start_daemon: Any, clients: Any
) -> None:
    """register gpu-a → drain → register gpu-a answered `healthy` (and
    offline or unhealthy in place of drain the same): a worker could approve
    itself by going offline and registering again."""
    daemon = await start_daemon(**DAEMON)
    client = await clients(daemon)
    events = await listen_for_node_events(client)
    node = await client.register("gpu-a")
    assert node["status"] == "pending"
    assert await client.call(op, node_id=node["id"]) == {}
    again = await client.register("gpu-a")
    assert (again["id"], again["status"]) == (node["id"], "pending")
    target = STATUS_OPS[op]
    assert await changes(events, client, daemon) == [
        ("pending", None),
        (target, "pending"),
        ("pending", target),
    ]
    await client.replica(node, "m0")
    await not_placeable(client)
    # Approval still works, and only it.
    assert (await client.call("approve", node_id=node["id"]))["status"] == "healthy"


@pytest.mark.parametrize("op", ["offline", "unhealthy", "drain"])
async def test_regression_healthy_is_refused_for_a_node_never_approved(
    op: str, start_daemon: Any, clients: Any
) -> None:
    """register gpu-a → drain → healthy made gpu-a healthy (409 only while
    it was still pending); offline and unhealthy the same."""
    daemon = await start_daemon(**DAEMON)
    client = await clients(daemon)
    events = await listen_for_node_events(client)
    node = await client.register("gpu-a")
    assert await client.call(op, node_id=node["id"]) == {}
    await fails(client.call("healthy", node_id=node["id"]), 409)
    target = STATUS_OPS[op]
    assert (await client.call("get", node_id=node["id"]))["status"] == target
    assert await changes(events, client, daemon) == [("pending", None), (target, "pending")]
    await client.replica(node, "m0")
    await not_placeable(client)


@pytest.mark.parametrize("op", ["offline", "unhealthy"])
async def test_regression_the_sweep_does_not_revive_a_node_never_approved(
    op: str, start_daemon: Any, clients: Any
) -> None:
    """register gpu-a → offline → heartbeat → sweep made gpu-a healthy
    ("heartbeat resumed"); unhealthy the same. An approved node beside it, in
    the same steps, is revived: the round did run."""
    daemon = await start_daemon(**DAEMON)
    client = await clients(daemon)
    events = await listen_for_node_events(client)
    never = await client.register("gpu-a")
    approved = await client.healthy_node("gpu-b")
    for node in (never, approved):
        assert await client.call(op, node_id=node["id"]) == {}
    for node in (never, approved):
        assert await client.call(f"heartbeat.{node['id']}", available_ram=1) == {}
    await changes(events, client, daemon)
    assert daemon.sweep is not None
    await daemon.sweep.sweep_nodes()
    assert await changes(events, client, daemon) == [("healthy", STATUS_OPS[op])]
    assert (await client.call("get", node_id=never["id"]))["status"] == STATUS_OPS[op]
    assert (await client.call("get", node_id=approved["id"]))["status"] == "healthy"
    assert names_of(await client.call("find_selector")) == ["gpu-b"]
