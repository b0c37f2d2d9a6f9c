"""What the admin commands show: tables for people, JSON for programs, and the
service at a glance (`status`, and the same figures for Prometheus).

Everything here reads through the client (registryd.Registry); lists are
walked page by page, so a cluster of any size prints without a 413.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registryd.client import Registry
from registryd.errors import NotFound
from registryd.models import Intent, NodeWithExtras, Replica

GiB = 2**30
STATUSES = ("registering", "pending", "healthy", "unhealthy", "draining", "offline")
SERVICE = "registry"

# ANSI colours (SGR codes) of node statuses and intent states.
GREEN, YELLOW, RED = "32", "33", "31"
STATUS_COLOUR = {
    "healthy": GREEN,
    "pending": YELLOW,
    "registering": YELLOW,
    "draining": YELLOW,
    "unhealthy": RED,
    "offline": RED,
    "queued": YELLOW,
    "dead": RED,
}


def use_colour(stream: IO[str]) -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


# ---------------------------------------------------------------- formatting


def gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f}"


def free_of(available: int, total: int) -> str:
    """Free/total in GiB, or - when the node never said."""
    if not total and not available:
        return "-"
    return f"{gib(available)}/{gib(total)} GiB"


def vram(node: NodeWithExtras) -> str:
    return free_of(node.available_vram, node.total_vram)


def duration(seconds: float) -> str:
    """A duration, shortly: 3s, 2m, 5h, 4d."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def age(since: datetime | None, now: datetime) -> str:
    """How long ago: 3s, 2m, 5h, 4d."""
    return "-" if since is None else duration((now - since).total_seconds())


def until(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    if when <= now:
        return "due"
    return "in " + duration((when - now).total_seconds())


# Labels registration sets itself: shown after the others; node.name repeats NAME.
AUTOMATIC = ("gpu.vendor", "gpu.vram", "node.replica-slots")


def labels_text(labels: dict[str, str]) -> str:
    own = sorted((k, v) for k, v in labels.items() if k not in AUTOMATIC and k != "node.name")
    auto = [(k, labels[k]) for k in AUTOMATIC if k in labels]
    return ",".join(f"{k}={v}" for k, v in own + auto)


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


Cell = str | tuple[str, str]  # text, or (text, ANSI colour code)


@dataclass
class Table:
    """Aligned columns; the last one is cut to fit the width (with …)."""

    titles: Sequence[str]
    right: frozenset[int] = frozenset()  # indexes of right-aligned columns
    rows: list[Sequence[Cell]] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        self.rows.append(cells)

    def render(self, width: int | None, colour: bool) -> Iterator[str]:
        def text(cell: Cell) -> str:
            return cell if isinstance(cell, str) else cell[0]

        rows: list[Sequence[Cell]] = [list(self.titles), *self.rows]
        last = len(self.titles) - 1
        widths = [max(len(text(row[i])) for row in rows) for i in range(last)]
        fixed = sum(widths) + 2 * last
        room = None if width is None else max(width - fixed, len(self.titles[last]))
        for row in rows:
            parts = []
            for i, cell in enumerate(row):
                value = text(cell)
                if i == last:
                    if room is not None and len(value) > room:
                        value = value[: room - 1] + "…"
                    padded = value
                elif i in self.right:
                    padded = value.rjust(widths[i])
                else:
                    padded = value.ljust(widths[i])
                if colour and not isinstance(cell, str):
                    padded = padded.replace(value, f"\x1b[{cell[1]}m{value}\x1b[0m", 1)
                parts.append(padded)
            yield "  ".join(parts).rstrip()


def status_cell(status: str) -> Cell:
    code = STATUS_COLOUR.get(status)
    return (status, code) if code else status


def write_json(out: IO[str], value: Any) -> None:
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z).decode() + "\n")


def dump(model: Any) -> Any:
    return model.model_dump(mode="json", exclude_none=True)


def write_table(out: IO[str], table: Table) -> None:
    colour = use_colour(out)
    out.writelines(line + "\n" for line in table.render(terminal_width(), colour))


# ---------------------------------------------------------------- look-ups


async def resolve(registry: Registry, name_or_id: str) -> NodeWithExtras:
    """A node by name, else by id."""
    try:
        return await registry.get(name=name_or_id)
    except NotFound:
        pass
    try:
        return await registry.get(node_id=name_or_id)
    except NotFound:
        raise NotFound(f"no node named {name_or_id!r} or with that id") from None


async def node_names(registry: Registry) -> dict[str, str]:
    return {node.id: node.name async for node in registry.nodes()}


# ---------------------------------------------------------------- commands


async def nodes(
    registry: Registry,
    out: IO[str],
    *,
    statuses: Sequence[str] = (),
    labels: Sequence[tuple[str, str]] = (),
    as_json: bool = False,
) -> int:
    """One row per node: name, status, VRAM, replicas, in flight, heartbeat, labels."""
    wanted = dict(labels)
    found = [
        node
        async for node in registry.nodes(extras=True)
        if (not statuses or node.status in statuses)
        and all(node.labels.get(k) == v for k, v in wanted.items())
    ]
    if as_json:
        write_json(out, [dump(node) for node in found])
        return 0
    now = datetime.now(UTC)
    table = Table(
        ("NAME", "STATUS", "VRAM FREE/TOTAL", "REPLICAS", "IN-FLIGHT", "HEARTBEAT", "LABELS"),
        right=frozenset({2, 3, 4, 5}),
    )
    for node in found:
        table.add(
            node.name,
            status_cell(node.status),
            vram(node),
            str(node.model_count),
            str(node.in_flight_count),
            age(node.last_heartbeat, now),
            labels_text(node.labels),
        )
    write_table(out, table)
    return 0


async def node(registry: Registry, out: IO[str], name_or_id: str, *, as_json: bool) -> int:
    """Everything about one node: its fields, labels, replicas and intents."""
    found = await resolve(registry, name_or_id)
    replicas = [r async for r in registry.node_models(found.id)]
    intents = [i async for i in registry.backend_ops(dead=True) if i.node_id == found.id]
    if as_json:
        write_json(
            out,
            {
                "node": dump(found),
                "replicas": [dump(r) for r in replicas],
                "intents": [dump(i) for i in intents],
            },
        )
        return 0
    colour = use_colour(out)
    now = datetime.now(UTC)
    cap = str(found.max_replicas_per_model)
    if found.max_replicas_per_model_manually_set:
        cap += " (set by an admin)"
    fields = Table(("", ""))
    for title, value in (
        ("id", found.id),
        ("status", status_cell(found.status)),
        ("type", found.node_type),
        ("address", found.address or "-"),
        ("http address", found.http_address or "-"),
        ("VRAM free/total", f"{vram(found)}, {gib(found.reserved_vram)} GiB reserved"),
        ("RAM free/total", free_of(found.available_ram, found.total_ram)),
        ("GPU vendor", found.gpu_vendor or "-"),
        ("replicas per model", cap),
        ("loaded replicas", str(found.model_count)),
        ("in flight", str(found.in_flight_count)),
        ("last heartbeat", f"{age(found.last_heartbeat, now)} ago"),
        ("registered", _when(found.created_at)),
        ("updated", _when(found.updated_at)),
    ):
        fields.add(title, value)
    lines = [found.name, *("  " + line for line in list(fields.render(None, colour))[1:])]
    lines.append("labels")
    lines += [f"  {k}={v}" for k, v in sorted(found.labels.items())] or ["  (none)"]
    lines.append("replicas")
    lines += _indented(replica_table(replicas, now), colour) if replicas else ["  (none)"]
    lines.append("intents")
    lines += _indented(intent_table(intents, None, now), colour) if intents else ["  (none)"]
    out.writelines(line + "\n" for line in lines)
    return 0


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _indented(table: Table, colour: bool) -> list[str]:
    width = terminal_width() - 2
    return ["  " + line for line in table.render(width, colour)]


def replica_table(replicas: Iterable[Replica], now: datetime) -> Table:
    table = Table(
        ("MODEL", "INDEX", "STATE", "IN-FLIGHT", "LAST USED", "ADDRESS"),
        right=frozenset({1, 3, 4}),
    )
    for r in replicas:
        state = (r.state, GREEN) if r.state == "loaded" else r.state
        table.add(
            r.model_name,
            str(r.replica_index),
            state,
            str(r.in_flight),
            age(r.last_used, now),
            r.address or "-",
        )
    return table


def intent_table(intents: Iterable[Intent], names: dict[str, str] | None, now: datetime) -> Table:
    titles = ["ID", "BACKEND", "OP", "ATTEMPTS", "STATE", "NEXT TRY", "LAST ERROR"]
    if names is not None:
        titles.insert(1, "NODE")
    table = Table(titles, right=frozenset({0, 4} if names is not None else {0, 3}))
    for i in intents:
        state = "dead" if i.dead else "queued"
        cells: list[Cell] = [
            str(i.id),
            i.backend,
            i.op,
            str(i.attempts),
            status_cell(state),
            "-" if i.dead else until(i.next_retry_at, now),
            i.last_error.replace("\n", " ") or "-",
        ]
        if names is not None:
            cells.insert(1, names.get(i.node_id, i.node_id))
        table.add(*cells)
    return table


async def models(registry: Registry, out: IO[str], *, as_json: bool) -> int:
    """Each model loaded on a healthy node: replicas, nodes, requests in flight."""
    by_model: dict[str, list[Replica]] = {}
    async for replica in registry.loaded_models():
        by_model.setdefault(replica.model_name, []).append(replica)
    names = await node_names(registry) if by_model else {}
    summary: list[dict[str, Any]] = [
        {
            "model": model,
            "replicas": len(replicas),
            "nodes": sorted({names.get(r.node_id, r.node_id) for r in replicas}),
            "in_flight": sum(r.in_flight for r in replicas),
        }
        for model, replicas in by_model.items()
    ]
    if as_json:
        write_json(out, summary)
        return 0
    table = Table(("MODEL", "REPLICAS", "NODES", "IN-FLIGHT", "ON"), right=frozenset({1, 2, 3}))
    for item in summary:
        table.add(
            item["model"],
            str(item["replicas"]),
            str(len(item["nodes"])),
            str(item["in_flight"]),
            ",".join(item["nodes"]),
        )
    write_table(out, table)
    return 0


async def intents(registry: Registry, out: IO[str], *, dead: bool, as_json: bool) -> int:
    """Queued backend intents (with --dead, abandoned ones too)."""
    found = [i async for i in registry.backend_ops(dead=dead)]
    if as_json:
        write_json(out, [dump(i) for i in found])
        return 0
    names = await node_names(registry) if found else {}
    write_table(out, intent_table(found, names, datetime.now(UTC)))
    return 0


async def change(
    registry: Registry, out: IO[str], action: str, name_or_id: str, *, as_json: bool
) -> int:
    """approve, drain or deregister one node, by name or id."""
    found = await resolve(registry, name_or_id)
    reply: Any
    if action == "approve":
        approved = await registry.approve(found.id)
        reply, said = dump(approved), f"approved: {approved.status}"
    elif action == "drain":
        await registry.drain(found.id)
        reply, said = {}, "draining: no new work, its replicas cleared"
    elif action == "deregister":
        refs = await registry.deregister(found.id)
        reply = {"auth_refs": dump(refs)} if refs else {}
        said = "deregistered"
        if refs:
            said += f" (revoke its user {refs.auth_user_id!r}, API key {refs.api_key_id!r})"
    else:
        raise ValueError(action)
    if as_json:
        write_json(out, reply)
    else:
        out.write(f"{found.name} ({found.id}) {said}\n")
    return 0


# ---------------------------------------------------------------- status


@dataclass
class Endpoint:
    name: str
    requests: int
    errors: int
    average_s: float
    processing_s: float
    # findlock's and inflight_dec's coalesced writes (their `data` in STATS).
    writes: int = 0
    batched: int = 0
    write_s: float = 0.0


@dataclass
class Instance:
    id: str
    version: str
    started: datetime | None
    endpoints: list[Endpoint]

    @property
    def requests(self) -> int:
        return sum(e.requests for e in self.endpoints)

    @property
    def errors(self) -> int:
        return sum(e.errors for e in self.endpoints)

    def uptime_s(self, now: datetime) -> float | None:
        return None if self.started is None else max(0.0, (now - self.started).total_seconds())


@dataclass
class Snapshot:
    """The service at a glance, as `status` prints it and `metrics` exports it."""

    taken: datetime
    prefix: str
    instances: list[Instance]
    nodes: dict[str, int]  # by status
    replicas_loaded: int
    in_flight: int
    intents_pending: int
    intents_dead: int
    oldest_heartbeat_s: float | None  # among healthy nodes

    def as_json(self) -> dict[str, Any]:
        return {
            "taken": self.taken,
            "subject_prefix": self.prefix,
            "instances": [
                {
                    "id": i.id,
                    "version": i.version,
                    "started": i.started,
                    "uptime_s": i.uptime_s(self.taken),
                    "requests": i.requests,
                    "errors": i.errors,
                    "endpoints": [e.__dict__ for e in i.endpoints],
                }
                for i in self.instances
            ],
            "nodes": self.nodes,
            "replicas_loaded": self.replicas_loaded,
            "in_flight": self.in_flight,
            "intents": {"pending": self.intents_pending, "dead": self.intents_dead},
            "oldest_healthy_heartbeat_s": self.oldest_heartbeat_s,
        }


async def instances(registry: Registry, window_s: float) -> list[Instance]:
    """Every running instance of the service under this subject prefix: the
    `$SRV.STATS` replies gathered within `window_s` (each instance answers)."""
    nc = registry.nc
    inbox = nc.new_inbox()
    replies: list[bytes] = []

    async def collect(msg: Any) -> None:
        replies.append(msg.data)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(f"$SRV.STATS.{SERVICE}", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(window_s)  # ADR-32 discovery: answers come within a window
    finally:
        await sub.unsubscribe()
    found = []
    for data in replies:
        try:
            stats = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        metadata = stats.get("metadata") or {}
        # Daemons of other prefixes (tenants, tests) share the service name.
        if metadata.get("subject_prefix", registry.prefix) != registry.prefix:
            continue
        found.append(_instance(stats))
    return sorted(found, key=lambda i: i.id)


def _instance(stats: dict[str, Any]) -> Instance:
    started = None
    if stats.get("started"):
        try:
            started = datetime.fromisoformat(str(stats["started"]).replace("Z", "+00:00"))
        except ValueError:
            started = None
    endpoints = []
    for e in stats.get("endpoints") or []:
        data = e.get("data") if isinstance(e.get("data"), dict) else {}
        endpoints.append(
            Endpoint(
                name=str(e.get("name", "")),
                requests=int(e.get("num_requests", 0)),
                errors=int(e.get("num_errors", 0)),
                average_s=int(e.get("average_processing_time", 0)) / 1e9,
                processing_s=int(e.get("processing_time", 0)) / 1e9,
                writes=int(data.get("writes", 0)),
                batched=int(data.get("batched_requests", 0)),
                write_s=int(data.get("write_time", 0)) / 1e9,
            )
        )
    return Instance(str(stats.get("id", "?")), str(stats.get("version", "?")), started, endpoints)


async def snapshot(registry: Registry, window_s: float = 0.5) -> Snapshot:
    gathering = asyncio.create_task(instances(registry, window_s))
    by_status = dict.fromkeys(STATUSES, 0)
    loaded = in_flight = 0
    oldest: float | None = None
    now = datetime.now(UTC)
    try:
        async for n in registry.nodes(extras=True):
            by_status[n.status] = by_status.get(n.status, 0) + 1
            loaded += n.model_count
            in_flight += n.in_flight_count
            if n.status == "healthy" and n.last_heartbeat is not None:
                silent = max(0.0, (now - n.last_heartbeat).total_seconds())
                oldest = silent if oldest is None else max(oldest, silent)
        pending = sum((await registry.backend_ops_count()).values())
        dead = len([i async for i in registry.backend_ops(dead=True) if i.dead])
    finally:
        found = await gathering
    return Snapshot(
        now, registry.prefix, found, by_status, loaded, in_flight, pending, dead, oldest
    )


def status_text(snap: Snapshot, colour: bool, top: int = 3) -> Iterator[str]:
    yield f"{plural(len(snap.instances), 'instance')} of {SERVICE} (subject prefix {snap.prefix})"
    for inst in snap.instances:
        up = snap.taken if inst.started is None else inst.started
        yield (
            f"  {inst.id}  v{inst.version}  up {age(up, snap.taken)}  "
            f"{plural(inst.requests, 'request')}  {plural(inst.errors, 'error')}"
        )
        busiest = sorted(inst.endpoints, key=lambda e: -e.requests)[:top]
        table = Table(("", "", "", ""), right=frozenset({1}))
        for e in busiest:
            if e.requests:
                batches = ""
                if e.writes:
                    batches = (
                        f"{e.batched / e.writes:.1f} a statement, "
                        f"avg {e.write_s / e.writes * 1000:.2f} ms each"
                    )
                table.add(e.name, f"{e.requests:,}", f"avg {e.average_s * 1000:.2f} ms", batches)
        yield from ("      " + line for line in list(table.render(None, colour))[1:])
    total = sum(snap.nodes.values())
    parts = []
    for status in STATUSES:
        count = snap.nodes.get(status, 0)
        if count:
            text = f"{count:,} {status}"
            code = STATUS_COLOUR[status]
            parts.append(f"\x1b[{code}m{text}\x1b[0m" if colour else text)
    yield f"nodes     {total:,}" + (": " + ", ".join(parts) if parts else "")
    yield (
        f"replicas  {snap.replicas_loaded:,} loaded, {plural(snap.in_flight, 'request')} in flight"
    )
    yield f"intents   {snap.intents_pending:,} pending, {snap.intents_dead:,} dead"
    if snap.oldest_heartbeat_s is None:
        yield "heartbeat no healthy node"
    else:
        yield f"heartbeat oldest among healthy nodes {duration(snap.oldest_heartbeat_s)} ago"


async def status(registry: Registry, out: IO[str], *, window_s: float, as_json: bool) -> int:
    snap = await snapshot(registry, window_s)
    if as_json:
        write_json(out, snap.as_json())
    else:
        out.writelines(line + "\n" for line in status_text(snap, use_colour(out)))
    return 0


# ---------------------------------------------------------------- Prometheus


class SnapshotCollector(Collector):
    """A snapshot as Prometheus metrics (for node_exporter's textfile collector)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterable[Metric]:
        snap = self.snap
        yield GaugeMetricFamily(
            "registryd_instances", "Running registryd instances that answered", len(snap.instances)
        )
        info = GaugeMetricFamily(
            "registryd_instance_info", "A registryd instance", labels=["instance", "version"]
        )
        uptime = GaugeMetricFamily(
            "registryd_instance_uptime_seconds", "Since the instance started", labels=["instance"]
        )

        def per_endpoint(name: str, documentation: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, documentation, labels=["instance", "endpoint"])

        requests = per_endpoint("registryd_requests", "Requests by endpoint")
        errors = per_endpoint("registryd_request_errors", "Error replies by endpoint")
        busy = per_endpoint(
            "registryd_request_processing_seconds", "Time spent handling requests, by endpoint"
        )
        writes = per_endpoint(
            "registryd_batch_writes",
            "Statements that carried several requests together (findlock, inflight_dec)",
        )
        batched = per_endpoint("registryd_batched_requests", "Requests those statements carried")
        write_time = per_endpoint(
            "registryd_batch_write_seconds", "Time those statements took, commit included"
        )
        for inst in snap.instances:
            info.add_metric([inst.id, inst.version], 1)
            seconds = inst.uptime_s(snap.taken)
            if seconds is not None:
                uptime.add_metric([inst.id], seconds)
            for e in inst.endpoints:
                requests.add_metric([inst.id, e.name], e.requests)
                errors.add_metric([inst.id, e.name], e.errors)
                busy.add_metric([inst.id, e.name], e.processing_s)
                if e.writes:
                    writes.add_metric([inst.id, e.name], e.writes)
                    batched.add_metric([inst.id, e.name], e.batched)
                    write_time.add_metric([inst.id, e.name], e.write_s)
        yield from (info, uptime, requests, errors, busy, writes, batched, write_time)
        nodes = GaugeMetricFamily("registryd_nodes", "Nodes by status", labels=["status"])
        for status_, count in snap.nodes.items():
            nodes.add_metric([status_], count)
        yield nodes
        yield GaugeMetricFamily(
            "registryd_replicas_loaded", "Loaded replicas", snap.replicas_loaded
        )
        yield GaugeMetricFamily(
            "registryd_replica_requests_in_flight", "Requests in flight on replicas", snap.in_flight
        )
        queued = GaugeMetricFamily("registryd_intents", "Backend intents", labels=["state"])
        queued.add_metric(["pending"], snap.intents_pending)
        queued.add_metric(["dead"], snap.intents_dead)
        yield queued
        if snap.oldest_heartbeat_s is not None:
            yield GaugeMetricFamily(
                "registryd_oldest_healthy_heartbeat_seconds",
                "Age of the oldest heartbeat among healthy nodes",
                snap.oldest_heartbeat_s,
            )


def exposition(snap: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap))
    return registry


async def metrics(registry: Registry, out: IO[str], *, window_s: float, output: str | None) -> int:
    snap = await snapshot(registry, window_s)
    collected = exposition(snap)
    if output is not None:
        from prometheus_client import write_to_textfile

        write_to_textfile(output, collected)  # atomically: a temporary file, renamed
    else:
        out.write(generate_latest(collected).decode())
    return 0
