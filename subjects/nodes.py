"""Nodes: registration, approval, status changes, heartbeats and look-ups.

Semantics follow LocalAI's NodeRegistry (reference/registry.go). Every status
change goes through the node state machine (subjects/node_status.py), which
also announces it. Where a change removes replica rows (re-registration,
offline, drain, deregistration) the node row is locked by a first statement
and the rows are removed by a second, so the
`prefixcache.invalidate` events name exactly the rows that went: a replica added
concurrently either waits for us or is removed and announced with the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated, Any, Literal, NoReturn

import asyncpg
from pydantic import Field, StringConstraints

from infra.db import Database
from infra.errors import BadRequest, NotFound, Unauthorized, Unavailable
from subjects import node_status
from subjects.base import (
    OK,
    ByteCount,
    Context,
    Group,
    Labels,
    Name,
    NodeId,
    NodeRef,
    OwnNodeRequest,
    Paged,
    Request,
    by_name,
    found,
    page,
    record,
    records,
    wake_scheduling,
)
from subjects.labels import AUTO_LABELS, check_room

log = logging.getLogger("registryd.nodes")

group = Group()

NODE_COLUMNS = """
    n.id, n.name, n.node_type, n.address, n.http_address, n.status,
    n.total_vram, n.available_vram, n.reserved_vram, n.total_ram, n.available_ram,
    n.gpu_vendor, n.max_replicas_per_model, n.max_replicas_per_model_manually_set,
    n.last_heartbeat, n.created_at, n.updated_at"""

# model_count counts loaded replicas; in_flight_count sums loaded and unloading
# ones, as Go's ListWithExtras does.
EXTRAS_COLUMNS = """
    (SELECT count(*) FROM replicas r
      WHERE r.node_id = n.id AND r.state = 'loaded')::int AS model_count,
    (SELECT COALESCE(sum(r.in_flight), 0) FROM replicas r
      WHERE r.node_id = n.id AND r.state IN ('loaded', 'unloading'))::int AS in_flight_count,
    (SELECT COALESCE(jsonb_object_agg(l.key, l.value), '{}') FROM node_labels l
      WHERE l.node_id = n.id) AS labels"""


Address = Annotated[str, StringConstraints(max_length=512)]
NodeType = Literal["backend", "agent"]


# ---------------------------------------------------------------- register


class RegisterRequest(Request):
    name: Name
    address: Address | None = None
    node_type: NodeType | None = None
    http_address: Address | None = None
    token: Annotated[str, StringConstraints(max_length=4096)] | None = None
    total_vram: ByteCount | None = None
    available_vram: ByteCount | None = None
    total_ram: ByteCount | None = None
    available_ram: ByteCount | None = None
    gpu_vendor: Annotated[str, StringConstraints(max_length=32)] | None = None
    max_replicas_per_model: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    labels: Labels | None = None
    # The worker's own secret: the first registration that carries one binds
    # it to the name, and every later one must carry the same (v1.2).
    node_key: Annotated[str, StringConstraints(min_length=16, max_length=256)] | None = None


LOCK_NODE_BY_NAME = """
    SELECT id, status, node_type, address, auth_user_id, api_key_id, node_key_hash
      FROM nodes WHERE name = $1 FOR UPDATE"""

# Fields the worker leaves out keep their stored values on re-registration (as
# Go's Updates(struct) leaves zero fields alone); so does an empty address (Go
# skips the empty string), which would make the node unroutable. A new node
# takes the defaults. A manual max-replicas override survives. The status is
# not written here but by the node state machine (node_status.registered): a
# new node is inserted as `registering`, the column's default.
#
# $14 says the name was free when we looked (LOCK_NODE_BY_NAME found no row).
# If another registration of the name committed since, this statement must
# not update its node as if it were new: it returns no row, and the conflict
# has locked the node's row (as ON CONFLICT DO UPDATE locks every conflicting
# row, updated or not), so the caller looks again and re-registers it.
UPSERT_NODE = f"""
    WITH up AS (
        INSERT INTO nodes AS n (
            name, node_type, address, http_address, token_hash,
            total_vram, available_vram, total_ram, available_ram,
            gpu_vendor, max_replicas_per_model, node_key_hash)
        VALUES (
            $1, COALESCE($2::text, 'backend'), COALESCE($3::text, ''), COALESCE($4::text, ''),
            COALESCE($5::text, ''), COALESCE($6::bigint, 0), COALESCE($7::bigint, 0),
            COALESCE($8::bigint, 0), COALESCE($9::bigint, 0), COALESCE($10::text, ''),
            COALESCE($11::int, 1), COALESCE($15::text, ''))
        ON CONFLICT (name) DO UPDATE SET
            node_type      = COALESCE($2, n.node_type),
            address        = COALESCE(NULLIF($3, ''), n.address),
            http_address   = COALESCE($4, n.http_address),
            token_hash     = COALESCE($5, n.token_hash),
            -- Bound once; only deregistration or node_key_reset unbinds it.
            node_key_hash  = CASE WHEN n.node_key_hash = '' THEN COALESCE($15, '')
                                  ELSE n.node_key_hash END,
            total_vram     = COALESCE($6, n.total_vram),
            available_vram = COALESCE($7, n.available_vram),
            reserved_vram  = CASE WHEN $7::bigint IS NULL THEN n.reserved_vram ELSE 0 END,
            total_ram      = COALESCE($8, n.total_ram),
            available_ram  = COALESCE($9, n.available_ram),
            gpu_vendor     = COALESCE($10, n.gpu_vendor),
            max_replicas_per_model = CASE
                WHEN n.max_replicas_per_model_manually_set THEN n.max_replicas_per_model
                ELSE COALESCE($11, n.max_replicas_per_model) END,
            last_heartbeat = now(),
            updated_at     = now()
        WHERE NOT $14::bool
        RETURNING n.*
    ),
    labelled AS (
        INSERT INTO node_labels (node_id, key, value)
        SELECT up.id, l.key, l.value
          FROM up, LATERAL (
                SELECT * FROM unnest($12::text[], $13::text[]) AS t(key, value)
                UNION ALL
                SELECT 'node.replica-slots', up.max_replicas_per_model::text) AS l
        ON CONFLICT (node_id, key) DO UPDATE SET value = EXCLUDED.value
    ),
    {wake_scheduling()}
    SELECT {NODE_COLUMNS} FROM up AS n"""


def vram_bucket(total_vram: int) -> str:
    """The `gpu.vram` label: coarse buckets so selectors match similar cards."""
    gib = total_vram // 2**30
    for floor, label in ((80, "80GB+"), (48, "48GB"), (24, "24GB"), (16, "16GB"), (8, "8GB")):
        if gib >= floor:
            return label
    return f"{gib}GB"


def auto_labels(req: RegisterRequest) -> dict[str, str]:
    labels = {"node.name": req.name}
    if req.gpu_vendor:
        labels["gpu.vendor"] = req.gpu_vendor
    if req.total_vram:
        labels["gpu.vram"] = vram_bucket(req.total_vram)
    return labels


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_node_key(bound: str, req: RegisterRequest) -> None:
    """A name bound to a key registers only with that key (v1.2): whoever
    else holds the registration token cannot take the node over."""
    if not bound:
        return
    # Digests of the same length: the comparison takes the same time
    # whatever key was sent.
    if req.node_key is None or not hmac.compare_digest(bound, digest(req.node_key)):
        who = f"node {req.name!r}" + (f" (address {req.address})" if req.address else "")
        why = "node key missing" if req.node_key is None else "wrong node key"
        raise Unauthorized(f"node {req.name!r} is bound to another node key", who=who, why=why)


def check_token(expected: str | None, req: RegisterRequest) -> None:
    if expected is None:
        return
    # Compare digests so the comparison takes the same time whatever the length.
    want = hashlib.sha256(expected.encode()).digest()
    got = hashlib.sha256((req.token or "").encode()).digest()
    if req.token is None or not hmac.compare_digest(want, got):
        who = f"node {req.name!r}" + (f" (address {req.address})" if req.address else "")
        why = "registration token missing" if req.token is None else "wrong registration token"
        raise Unauthorized("registration token missing or wrong", who=who, why=why)


@group.op("register", RegisterRequest)
async def register(ctx: Context, req: RegisterRequest) -> Any:
    """Register a worker node, or re-register it after a restart."""
    secret = ctx.settings.registration_token
    check_token(secret.get_secret_value() if secret else None, req)
    max_replicas = None
    if req.max_replicas_per_model is not None:
        max_replicas = max(1, req.max_replicas_per_model)  # 0 means "the default", 1
    token_hash = digest(req.token) if req.token else None
    # Worker labels merge into the node's (admin labels stay); auto labels win.
    labels = {**(req.labels or {}), **auto_labels(req)}
    labels.pop("node.replica-slots", None)  # mirrors the effective cap, set in SQL

    async with ctx.db.transaction() as conn:
        # Twice at most: a registration that lost the race to create the name
        # finds the winner's node locked for it on its second look.
        for _ in range(2):
            prev = await conn.fetchrow(LOCK_NODE_BY_NAME, req.name)
            if prev is not None:
                check_node_key(prev["node_key_hash"], req)
            # Re-registration may leave out what the node already has.
            node_type = req.node_type or (prev["node_type"] if prev else "backend")
            if node_type == "backend" and not (req.address or (prev and prev["address"])):
                raise_missing("address", "a backend node needs the address of its gRPC server")
            if labels.keys() - set(AUTO_LABELS):
                node_id = prev["id"] if prev else None
                await check_room(conn, ctx.settings.max_labels, node_id, labels.keys())
            removed: dict[str, list[str]] = {}
            if prev is not None:
                # The worker restarted: nothing it had loaded is loaded any more.
                removed = await node_status.clear_replicas(conn, [prev["id"]])
            row = await conn.fetchrow(
                UPSERT_NODE,
                req.name,
                req.node_type,
                req.address,
                req.http_address,
                token_hash,
                req.total_vram,
                req.available_vram,
                req.total_ram,
                req.available_ram,
                req.gpu_vendor,
                max_replicas,
                list(labels),
                list(labels.values()),
                prev is None,
                digest(req.node_key) if req.node_key is not None else None,
            )
            if row is not None:
                break
        else:
            # Created and deregistered again between our two looks.
            raise Unavailable(f"node {req.name!r} changed while registering; retry")
        refs = node_status.auth_refs_of(prev) if prev is not None else None
        change = await node_status.registered(
            conn,
            row["id"],
            prev["status"] if prev else None,
            auto_approve=ctx.settings.auto_approve,
            removed=removed.get(row["id"], ()),
        )
    await node_status.announce(ctx.events, ctx.intents, [change])
    node = record(row)
    assert node is not None
    node["status"] = change.status
    if refs:
        # LocalAI revokes the credentials it provisioned before, as Go's
        # Register hands them back (v1.1); no other reply shows them.
        node["auth_refs"] = refs
    return node


def raise_missing(field: str, why: str) -> NoReturn:
    raise BadRequest(f"missing required field '{field}': {why}")


# ---------------------------------------------------------------- approve


APPROVE = node_status.approve_statement(NODE_COLUMNS, wake_scheduling("EXISTS (SELECT 1 FROM up)"))


@group.op("approve", NodeRef)
async def approve(ctx: Context, req: NodeRef) -> Any:
    """Approve a pending node: it becomes healthy and can take work."""
    node, change = await node_status.approve(ctx.db, APPROVE, req.node_id)
    await node_status.announce(ctx.events, ctx.intents, [change])
    return record(node)


# ---------------------------------------------------------------- status changes


async def change_status(ctx: Context, node_id: str, rule: node_status.Rule) -> Any:
    change = await node_status.apply(ctx.db, node_id, rule)
    await node_status.announce(ctx.events, ctx.intents, [change])
    return OK


@group.op("offline", NodeRef)
async def offline(ctx: Context, req: NodeRef) -> Any:
    """Mark a node offline (a graceful worker shutdown); its replicas are cleared."""
    return await change_status(ctx, req.node_id, node_status.OFFLINE)


@group.op("unhealthy", NodeRef)
async def unhealthy(ctx: Context, req: NodeRef) -> Any:
    """Mark a node unhealthy; its replicas stay (the next heartbeat may revive it)."""
    return await change_status(ctx, req.node_id, node_status.UNHEALTHY)


@group.op("healthy", NodeRef)
async def healthy(ctx: Context, req: NodeRef) -> Any:
    """Mark an approved node healthy (one never approved needs approve instead)."""
    return await change_status(ctx, req.node_id, node_status.HEALTHY)


@group.op("drain", NodeRef)
async def drain(ctx: Context, req: NodeRef) -> Any:
    """Drain a node: no new work, and its replicas are cleared."""
    return await change_status(ctx, req.node_id, node_status.DRAIN)


# ---------------------------------------------------------------- deregister


@group.op("deregister", NodeRef)
async def deregister(ctx: Context, req: NodeRef) -> Any:
    """Remove a node with its replicas and labels; the reply names its provisioned credentials."""
    change = await node_status.deregister(ctx.db, req.node_id)
    await node_status.announce(ctx.events, ctx.intents, [change])
    try:
        await ctx.intents.purge_node(req.node_id)
    except Exception as exc:  # delivery drops them anyway when it meets them
        log.warning("could not drop the intents of node %s: %s", req.node_id, exc)
    # LocalAI deletes the user and API key it provisioned for the node (v1.1).
    return {"auth_refs": change.auth_refs} if change.auth_refs else OK


# ---------------------------------------------------------------- node keys


RESET_NODE_KEY = """
    UPDATE nodes SET node_key_hash = '', updated_at = now() WHERE id = $1 RETURNING name"""


@group.op("node_key_reset", NodeRef)
async def node_key_reset(ctx: Context, req: NodeRef) -> Any:
    """Unbind a node's key (admin): its next registration binds a new one."""
    name = await ctx.db.fetchval(RESET_NODE_KEY, req.node_id)
    if name is None:
        raise NotFound(f"node {req.node_id} not found")
    log.info("node key of %s (%s) reset", name, req.node_id)
    return OK


# ---------------------------------------------------------------- a worker, itself
#
# What a worker does to its own node after registering has a subject of its
# own, ending in the node id, so that a NATS user per worker can be allowed
# exactly its own (registry.offline.<id>, registry.self.<id>,
# registry.heartbeat.<id>) and nothing of another node's.


@group.op("offline_self", OwnNodeRequest, subject="offline", subject_field="subject_node")
async def offline_self(ctx: Context, req: OwnNodeRequest) -> Any:
    """A worker marks its own node offline, on registry.offline.<node_id>."""
    return await change_status(ctx, req.subject_node, node_status.OFFLINE)


# As get, plus the node's replicas by name, in every state: a worker compares
# them with what it serves and records again only those with no row (an
# offline or a drain deleted them), leaving a replica that a scheduler set
# unloading or idle, and its routers' in-flight count, alone. At most the
# first OWN_REPLICAS by model (bytewise, as a client's sort compares) and
# index, so that the reply stays within NATS's payload limit however many a
# node has; node_models pages through them all.
OWN_REPLICAS = 1000
GET_OWN = f"""
    SELECT {NODE_COLUMNS}, {EXTRAS_COLUMNS},
           (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                       'model_name', r.model_name, 'replica_index', r.replica_index,
                       'state', r.state)
                     ORDER BY r.model_name COLLATE "C", r.replica_index), '[]')
              FROM (SELECT model_name, replica_index, state FROM replicas
                     WHERE node_id = n.id
                     ORDER BY model_name COLLATE "C", replica_index
                     LIMIT {OWN_REPLICAS}) AS r) AS replicas
      FROM nodes n WHERE n.id = $1"""


@group.op("self", OwnNodeRequest, subject_field="subject_node")
async def own_node(ctx: Context, req: OwnNodeRequest) -> Any:
    """A worker reads its own node with its replicas, on registry.self.<node_id>."""
    return node_or_404(await ctx.db.fetchrow(GET_OWN, req.subject_node), req.subject_node)


# ---------------------------------------------------------------- heartbeat


class HeartbeatRequest(Request):
    node_id: NodeId
    available_vram: ByteCount | None = None
    total_vram: ByteCount | None = None
    available_ram: ByteCount | None = None
    gpu_vendor: Annotated[str, StringConstraints(max_length=32)] | None = None
    # Set by the service edge: whether the worker waits for a reply.
    wants_reply: bool = False


# Pending and offline nodes only get their timestamp: they come back through
# approval or re-registration, not through a heartbeat. A fresh VRAM reading
# replaces the schedulers' soft reservation. Readings for unknown nodes match
# no row and are simply not returned.
WRITE_HEARTBEATS = """
    WITH hb AS (
        SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
                 AS t(id, available_vram, total_vram, available_ram, gpu_vendor)
    )
    UPDATE nodes n SET
        last_heartbeat = now(),
        available_vram = CASE WHEN n.status IN ('pending', 'offline') OR hb.available_vram IS NULL
                              THEN n.available_vram ELSE hb.available_vram END,
        reserved_vram  = CASE WHEN n.status IN ('pending', 'offline') OR hb.available_vram IS NULL
                              THEN n.reserved_vram ELSE 0 END,
        total_vram     = CASE WHEN n.status IN ('pending', 'offline') OR hb.total_vram IS NULL
                              THEN n.total_vram ELSE hb.total_vram END,
        available_ram  = CASE WHEN n.status IN ('pending', 'offline') OR hb.available_ram IS NULL
                              THEN n.available_ram ELSE hb.available_ram END,
        gpu_vendor     = CASE WHEN n.status IN ('pending', 'offline')
                                   OR COALESCE(hb.gpu_vendor, '') = ''
                              THEN n.gpu_vendor ELSE hb.gpu_vendor END
      FROM hb
     WHERE n.id = hb.id
    RETURNING n.id"""

READING = ("available_vram", "total_vram", "available_ram", "gpu_vendor")


async def write_heartbeats(db: Database, readings: dict[str, dict[str, Any]]) -> set[str]:
    """Write a batch of readings (node id → fields, None where a heartbeat left
    one out) in one statement; the node ids that exist.

    The batch commits without waiting for its WAL to reach the disk. At
    10,000 heartbeats a second that wait was most of a batch's time: in a
    soak a batch of 200 readings took 0.15-0.33 s about once a minute, and a
    reading once took 1.04 s to show (the target is 0.5 s); committed this
    way, none took over 0.15 s in 8 minutes (worst lag 0.095 s). A crash of
    PostgreSQL can lose the last ~0.6 s of readings, which each node's next
    heartbeat replaces; no status is written here (the health sweep changes
    it, in a commit that waits as every other write's does).

    The rows are locked in the order of the ids sent, so they go sorted: two
    daemons share a fleet's heartbeats (one queue group), and batches of
    the same nodes in arrival order locked them in opposite orders. Two
    writers of 300 of 1,000 nodes each, shuffled, met 15 deadlocks in 15 s,
    a batch waiting up to 3 s (deadlock_timeout, then its retry); sorted,
    none in 3,037 batches."""
    ids = sorted(readings)
    columns = ([readings[i].get(f) for i in ids] for f in READING)
    return {r[0] for r in await db.fetch_soft(WRITE_HEARTBEATS, ids, *columns)}


@group.op(
    "heartbeat", HeartbeatRequest, subject_field="node_id", reply_field="wants_reply", inline=True
)
async def heartbeat(ctx: Context, req: HeartbeatRequest) -> Any:
    """A worker's heartbeat on registry.heartbeat.<node_id>, with its free VRAM."""
    reading = req.model_dump(include=set(READING))
    if not req.wants_reply:
        # Published: queued and written with the next batch (infra/heartbeats.py).
        ctx.heartbeats.submit(req.node_id, reading)
        return OK
    if not await ctx.heartbeats.write(req.node_id, reading, ctx.settings.db_timeout):
        raise NotFound(f"node {req.node_id} not found")
    return OK


# ---------------------------------------------------------------- auth refs


class AuthRefsRequest(Request):
    node_id: NodeId
    auth_user_id: Annotated[str, StringConstraints(max_length=255)] = ""
    api_key_id: Annotated[str, StringConstraints(max_length=255)] = ""


AUTH_REFS = """
    UPDATE nodes SET auth_user_id = $2, api_key_id = $3, updated_at = now()
     WHERE id = $1 RETURNING id"""


@group.op("auth_refs", AuthRefsRequest)
async def auth_refs(ctx: Context, req: AuthRefsRequest) -> Any:
    """Record the user and API key LocalAI provisioned for a node (never returned)."""
    if await ctx.db.fetchval(AUTH_REFS, req.node_id, req.auth_user_id, req.api_key_id) is None:
        raise NotFound(f"node {req.node_id} not found")
    return OK


# ---------------------------------------------------------------- get / list / stale


class GetRequest(Request):
    node_id: NodeId | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None


GET_BY_ID = f"SELECT {NODE_COLUMNS}, {EXTRAS_COLUMNS} FROM nodes n WHERE n.id = $1"
GET_BY_NAME = f"SELECT {NODE_COLUMNS}, {EXTRAS_COLUMNS} FROM nodes n WHERE n.name = $1"


@group.op("get", GetRequest)
async def get(ctx: Context, req: GetRequest) -> Any:
    """One node with its model count, in-flight count and labels, by id or name."""
    if req.node_id is not None:
        row = await ctx.db.fetchrow(GET_BY_ID, req.node_id)
        what = req.node_id
    elif req.name is not None:
        row = await ctx.db.fetchrow(GET_BY_NAME, req.name)
        what = f"named {req.name!r}"
    else:
        raise_missing("node_id", "give 'node_id' or 'name'")
    if row is None:
        raise NotFound(f"node {what} not found")
    return record(row)


class ListRequest(Paged):
    extras: bool = False


LIST = f"""
    SELECT {NODE_COLUMNS} FROM nodes n
     WHERE $1::text IS NULL OR n.name > $1
     ORDER BY n.name LIMIT $2"""
LIST_WITH_EXTRAS = f"""
    SELECT {NODE_COLUMNS}, {EXTRAS_COLUMNS} FROM nodes n
     WHERE $1::text IS NULL OR n.name > $1
     ORDER BY n.name LIMIT $2"""


@group.op("list", ListRequest)
async def list_nodes(ctx: Context, req: ListRequest) -> Any:
    """Every node, by name; with `extras`, also model count, in-flight count, labels."""
    rows = await ctx.db.fetch(
        LIST_WITH_EXTRAS if req.extras else LIST, *req.cursor(Name), req.sql_limit()
    )
    return page(req, records(rows), by_name, max_reply=ctx.max_reply)


class StaleRequest(Paged):
    threshold_s: Annotated[float, Field(ge=0, le=10 * 365 * 86400, allow_inf_nan=False)]


# Unhealthy, offline and pending nodes are not expected to heartbeat.
STALE = f"""
    SELECT {NODE_COLUMNS} FROM nodes n
     WHERE n.last_heartbeat < now() - make_interval(secs => $1)
       AND n.status NOT IN ('unhealthy', 'offline', 'pending')
       AND ($2::text IS NULL OR n.name > $2)
     ORDER BY n.name LIMIT $3"""


@group.op("stale", StaleRequest)
async def stale(ctx: Context, req: StaleRequest) -> Any:
    """Active nodes whose last heartbeat is older than `threshold_s` seconds."""
    rows = await ctx.db.fetch(STALE, req.threshold_s, *req.cursor(Name), req.sql_limit())
    return page(req, records(rows), by_name, max_reply=ctx.max_reply)


# ---------------------------------------------------------------- max replicas


class MaxReplicasRequest(Request):
    node_id: NodeId
    max_replicas_per_model: Annotated[int, Field(ge=1, le=1_000_000)]


SET_MAX_REPLICAS = f"""
    WITH n AS (
        UPDATE nodes SET max_replicas_per_model = $2,
                         max_replicas_per_model_manually_set = true,
                         updated_at = now()
         WHERE id = $1
        RETURNING *
    ),
    slots AS (
        INSERT INTO node_labels (node_id, key, value)
        SELECT id, 'node.replica-slots', $2::text FROM n
        ON CONFLICT (node_id, key) DO UPDATE SET value = EXCLUDED.value
    ),
    {wake_scheduling("EXISTS (SELECT 1 FROM n)")}
    SELECT {NODE_COLUMNS} FROM n"""

RESET_MAX_REPLICAS = f"""
    UPDATE nodes n SET max_replicas_per_model_manually_set = false, updated_at = now()
     WHERE id = $1
    RETURNING {NODE_COLUMNS}"""


@group.op("max_replicas", MaxReplicasRequest)
async def max_replicas(ctx: Context, req: MaxReplicasRequest) -> Any:
    """Set a node's per-model replica cap as an admin override that survives restarts."""
    row = await ctx.db.fetchrow(SET_MAX_REPLICAS, req.node_id, req.max_replicas_per_model)
    return node_or_404(row, req.node_id)


@group.op("max_replicas_reset", NodeRef)
async def max_replicas_reset(ctx: Context, req: NodeRef) -> Any:
    """Hand the replica cap back to the worker: its next registration sets it."""
    return node_or_404(await ctx.db.fetchrow(RESET_MAX_REPLICAS, req.node_id), req.node_id)


def node_or_404(row: asyncpg.Record | None, node_id: str) -> dict[str, Any]:
    return found(row, f"node {node_id} not found")
