"""What every endpoint module shares: request types, the operation table, replies.

An endpoint module declares its operations with `group.op(name, Model)`; the
service edge (daemon/service.py) validates the body into `Model` once and hands
the handler a typed value, then serialises whatever the handler returns.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Protocol, TypeVar

import asyncpg
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from infra.config import Settings
from infra.db import Database
from infra.errors import BadRequest, NotFound
from infra.events import Events
from infra.heartbeats import Heartbeats
from infra.intent_stream import IntentStore
from infra.wire import JSON_OPTIONS, NEXT_HEADER

# ---------------------------------------------------------------- field types

MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1

ByteCount = Annotated[int, Field(ge=0, le=MAX_INT64)]
Count = Annotated[int, Field(ge=0, le=MAX_INT32)]
NodeId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
# `node_ids` restricts a query to those nodes; absent or empty means all.
NodeIds = Annotated[list[NodeId], Field(max_length=10_000)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=255)]
ReplicaIndex = Annotated[int, Field(ge=0, le=MAX_INT32)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
LabelValue = Annotated[str, StringConstraints(max_length=255)]
Labels = dict[LabelKey, LabelValue]


class Request(BaseModel):
    """Base of every request body: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        # Contract v1.1: JSON null in an optional field means the same as
        # leaving it out, since Go encodes a nil slice or map as null
        # (`"node_ids": null` is "every node"). The field then takes its
        # default: None where None is meaningful, or Go's zero value ([], {},
        # 0, "", false). A required field sent as null stays, to be the 400
        # that names it. Nested requests (findlock's `prefer`) do the same.
        if not isinstance(data, dict) or None not in data.values():
            return data
        optional = _optional_fields(cls)
        return {k: v for k, v in data.items() if v is not None or k not in optional}

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        # PostgreSQL text cannot hold U+0000, and no UTF-8 encoder takes an
        # unpaired surrogate (JSON "\ud800", which the body's fallback parser
        # lets through): say so here, naming the field, rather than failing
        # inside the database or the reply's encoder.
        problem = text_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def text_problem(value: Any) -> str | None:
    """Why `value` (a string, or strings in dicts and lists) cannot be stored as
    text, or None when it can."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain the NUL character"
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                return "must be valid Unicode text (an unpaired surrogate such as \\ud800 is not)"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            problem = text_problem(k) or text_problem(v)
            if problem is not None:
                return problem
    elif isinstance(value, list | tuple):
        for v in value:
            problem = text_problem(v)
            if problem is not None:
                return problem
    return None


@functools.cache
def _optional_fields(model: type[BaseModel]) -> frozenset[str]:
    """The body keys of `model`'s fields that have a default (one entry per
    request class, so the cache is as small as the operation table)."""
    return frozenset(
        key
        for name, info in model.model_fields.items()
        if not info.is_required()
        for key in (name, info.alias)
        if key is not None
    )


class NodeRef(Request):
    node_id: NodeId


class OwnNodeRequest(Request):
    """What a worker sends on a subject ending in its node id
    (registry.offline.<id>, registry.self.<id>, registry.replica_set.<id>)."""

    # From the subject; a node_id in the body may only repeat it.
    subject_node: NodeId
    node_id: NodeId | None = None

    @field_validator("node_id", mode="after")
    @classmethod
    def _same_node(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value != info.data.get("subject_node"):
            raise ValueError("must be the node id the subject names, or absent")
        return value


# A node's name: printable, as it shows in logs and tables.
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")
]


# ---------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """A result with extra NATS headers (the paging cursor, for one)."""

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


OK: dict[str, Any] = {}


def record(row: asyncpg.Record | None) -> dict[str, Any] | None:
    """A row as the wire shows it: bytea as base64, as Go encodes []byte."""
    if row is None:
        return None
    out = dict(row)
    for key, value in out.items():
        if isinstance(value, bytes):
            out[key] = base64.b64encode(value).decode("ascii")
    return out


def found(row: asyncpg.Record | None, missing: str) -> dict[str, Any]:
    """The row as the wire shows it, or a 404 saying what is `missing`."""
    if row is None:
        raise NotFound(missing)
    out = record(row)
    assert out is not None
    return out


def records(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [record(r) for r in rows]  # type: ignore[misc]


# ---------------------------------------------------------------- operations


class Batches(Protocol):
    """The routing operations' batched writes (subjects/routing.py builds
    them): findlock's picks and inflight_dec's releases, one set per daemon."""

    async def pick(
        self, model: str, node_ids: Sequence[str], lease_s: float | None
    ) -> dict[str, Any] | None: ...

    async def release(self, node_id: str, model: str, replica_index: int) -> None: ...

    @property
    def pick_stats(self) -> Any: ...

    @property
    def release_stats(self) -> Any: ...


@dataclass(frozen=True)
class Context:
    """What a handler may touch: settings, the database, the event publisher,
    the intent stream, and what outlives one request in this daemon (the
    heartbeat writer, the routing batches), all built once at start-up."""

    settings: Settings
    db: Database
    events: Events
    intents: IntentStore
    heartbeats: Heartbeats
    batches: Batches
    # The largest reply body NATS carries on the request connection: the
    # max_payload of the server it is on now, which a reconnect to another
    # server of a cluster may change. A page of a list is cut to fit it.
    payload_limit: Callable[[], int] = lambda: 1024 * 1024

    @property
    def max_reply(self) -> int:
        return self.payload_limit()


M = TypeVar("M", bound=Request)
Handler = Callable[[Context, M], Awaitable[Any]]


@dataclass(frozen=True)
class Operation(Generic[M]):
    name: str
    model: type[M]
    handler: Handler[M]
    # Operations whose subject carries an argument (registry.heartbeat.<node_id>)
    # name the request field the last subject token fills.
    subject_field: str | None = None
    # Operations that behave differently when nobody waits for the reply (a
    # published heartbeat) name the request field told whether one is wanted.
    reply_field: str | None = None
    description: str = ""
    # Published requests of this operation are handled in the subscription's
    # own callback: only for handlers that never wait on I/O when unanswered.
    inline: bool = False
    # The subject after the prefix, when it is not the operation's name: two
    # endpoints may share a verb (registry.offline for admins and
    # registry.offline.<node_id> for a worker itself), never a name.
    subject: str | None = None
    # The endpoint's `data` in `$SRV.STATS`: figures of its own, if it keeps any.
    data: Callable[[Context], dict[str, Any]] | None = None

    @property
    def verb(self) -> str:
        return self.subject or self.name


class Group:
    """The operations of one endpoint module, in declaration order."""

    def __init__(self) -> None:
        self.operations: list[Operation[Any]] = []

    def op(
        self,
        name: str,
        model: type[M],
        *,
        subject_field: str | None = None,
        reply_field: str | None = None,
        inline: bool = False,
        subject: str | None = None,
        data: Callable[[Context], dict[str, Any]] | None = None,
    ) -> Callable[[Handler[M]], Handler[M]]:
        def register(handler: Handler[M]) -> Handler[M]:
            doc = (handler.__doc__ or "").strip().splitlines()
            description = doc[0] if doc else ""
            self.operations.append(
                Operation(
                    name,
                    model,
                    handler,
                    subject_field,
                    reply_field,
                    description,
                    inline,
                    subject,
                    data,
                )
            )
            return handler

        return register


# ---------------------------------------------------------------- paging

MAX_PAGE = 10_000
# The longest cursor a client may send back, so the longest one we may issue.
MAX_CURSOR = 4096
# A reply's body is serialised as the edge does it (daemon/service.py).
# NATS's max_payload bounds a message's headers and body together: a page
# leaves room for "NATS/1.0" and the longest Registry-Next header.
HEADER_ROOM = MAX_CURSOR + 256


class Paged(Request):
    """`limit` and `after` of the contract's paging addition.

    The cursor is opaque to clients: base64url of the JSON list of the sort
    key values of the last item, so any name (dots, spaces, newlines) is safe in
    a header and an operation can change its sort key without breaking clients
    that only echo it back. A sort key is always one that does not change while
    an item stays in the list (ids, names, indexes; never a counter such as
    `in_flight`), so paging on while the cluster works never skips an item nor
    lists it twice.
    """

    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] | None = None
    after: Annotated[str, StringConstraints(max_length=MAX_CURSOR)] | None = None

    @field_validator("after", mode="after")
    @classmethod
    def _cursor(cls, value: str | None) -> str | None:
        if value is not None:
            decode_cursor(value)
        return value

    def cursor(self, *types: Any) -> list[Any]:
        """The sort-key values in `after`, checked against the operation's key
        types (NodeId, ModelName, ReplicaIndex, …: their ranges too, so a
        forged cursor never reaches the database as an out-of-range value); a
        list of Nones when there is no cursor (the first page)."""
        if self.after is None:
            return [None] * len(types)
        try:
            return list(_cursor_keys(types).validate_python(tuple(decode_cursor(self.after))))
        except (ValueError, ValidationError):
            raise BadRequest("invalid field 'after': not a cursor from this operation") from None

    def sql_limit(self) -> int | None:
        """Rows to fetch: one more than a page, to learn whether another follows."""
        return None if self.limit is None else self.limit + 1


@functools.lru_cache(maxsize=64)  # keyed by the operations' key types, not by requests
def _cursor_keys(types: tuple[Any, ...]) -> TypeAdapter[tuple[Any, ...]]:
    return TypeAdapter(tuple.__class_getitem__(types), config=ConfigDict(strict=True))


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise ValueError("not a cursor returned by registryd") from None
    # A cursor we issued never holds U+0000: no key column can store it.
    if not isinstance(values, list) or not values or text_problem(values) is not None:
        raise ValueError("not a cursor returned by registryd")
    return values


Item = dict[str, Any]


def page(
    req: Paged,
    items: list[Item],
    key: Callable[[Item], list[Any]],
    *,
    max_reply: int | None = None,
    body: Callable[[list[Item]], Any] | None = None,
) -> Any:
    """The items of one page, with the cursor header when more follow.

    `items` come in the order of `key` (the cursor's sort key), at most one
    more than a page (`sql_limit`). Given `max_reply` (Context.max_reply), a
    page whose reply would not fit in one NATS message is cut to the items
    that do, and the cursor points after the last one kept; at least one is
    kept, so paging always moves on. `body` shapes the kept items into the
    reply (an object for labels_all, another order for nodes_with_model); by
    default the reply is the list itself. Without `limit` nothing is cut: the
    edge answers a reply too large with the 413 that says to page.
    """
    shape = body or (lambda kept: kept)
    if req.limit is None:
        return shape(items)
    kept = items[: req.limit]
    more = len(items) > len(kept)
    if max_reply is not None:
        fit = fitting(kept, shape, max_reply - HEADER_ROOM)
        more = more or fit < len(kept)
        kept = kept[:fit]
    if not more:
        return shape(kept)
    return Reply(shape(kept), {NEXT_HEADER: encode_cursor(key(kept[-1]))})


def fitting(items: list[Item], shape: Callable[[list[Item]], Any], budget: int) -> int:
    """How many of `items`, from the first, fit in `budget` bytes of reply (at
    least one). Each item is measured as an element of a JSON array, which is
    no smaller than its part of any shape a `body` gives the page."""
    if len(orjson.dumps(shape(items), option=JSON_OPTIONS)) <= budget:
        return len(items)
    size = 2  # [ and ]
    for count, item in enumerate(items):
        size += len(orjson.dumps(item, option=JSON_OPTIONS)) + (1 if count else 0)
        if size > budget:
            return max(count, 1)
    return len(items)


def by_name(node: dict[str, Any]) -> list[Any]:
    """The sort key of lists of nodes, and of their cursors."""
    return [node["name"]]


def wake_scheduling(when: str = "true") -> str:
    """A CTE clause for every change that can add capacity (when `when` holds):
    the reconciler's cooldown flags are cleared so it tries again next tick."""
    return f"""
    woken AS (
        UPDATE scheduling_configs
           SET unsatisfiable_until = NULL, unsatisfiable_ticks = 0, updated_at = now()
         WHERE ({when}) AND (unsatisfiable_until IS NOT NULL OR unsatisfiable_ticks > 0)
    )"""
