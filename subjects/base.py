"""What every endpoint module shares: request types, the operation table, replies.

An endpoint module declares its operations with `group.op(name, Model)`; the
service edge (daemon/service.py) validates the body into `Model` once and hands
the handler a typed value, then serialises whatever the handler returns.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

import asyncpg
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from daemon.config import Settings
from daemon.db import Database
from daemon.errors import BadRequest, NotFound
from daemon.events import Events
from daemon.heartbeats import Heartbeats
from daemon.intents import IntentStore

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
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL text cannot hold U+0000; say so here, naming the field,
        # rather than failing inside the database.
        if _has_nul(value):
            raise ValueError("must not contain the NUL character")
        return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


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


class Empty(Request):
    pass


class NodeRef(Request):
    node_id: NodeId


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


@dataclass(frozen=True)
class Context:
    """What a handler may touch: settings, the database, the event publisher and
    the intent stream.

    `state` is where an endpoint module keeps what must outlive one request in
    this daemon (findlock's batches), keyed by the module's own name.
    """

    settings: Settings
    db: Database
    events: Events
    intents: IntentStore
    heartbeats: Heartbeats
    state: dict[str, Any] = field(default_factory=dict)
    # The largest reply body NATS carries on the request connection (its
    # server's max_payload): a page of a list is cut to fit it.
    max_reply: int = 1024 * 1024


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
    ) -> Callable[[Handler[M]], Handler[M]]:
        def register(handler: Handler[M]) -> Handler[M]:
            doc = (handler.__doc__ or "").strip().splitlines()
            description = doc[0] if doc else ""
            self.operations.append(
                Operation(name, model, handler, subject_field, reply_field, description, inline)
            )
            return handler

        return register


# ---------------------------------------------------------------- paging

MAX_PAGE = 10_000
NEXT_HEADER = "Registry-Next"


class Paged(Request):
    """`limit` and `after` of the contract's paging addition.

    The cursor is opaque to clients: base64url of the JSON list of the sort
    key values of the last item, so any name (dots, spaces, newlines) is safe in
    a header and an operation can change its sort key without breaking clients
    that only echo it back.
    """

    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] | None = None
    after: Annotated[str, StringConstraints(max_length=4096)] | None = None

    @field_validator("after", mode="after")
    @classmethod
    def _cursor(cls, value: str | None) -> str | None:
        if value is not None:
            decode_cursor(value)
        return value

    def cursor(self, *types: type) -> list[Any]:
        """The sort-key values in `after`, checked against the operation's key
        types; a list of Nones when there is no cursor (the first page)."""
        if self.after is None:
            return [None] * len(types)
        values = decode_cursor(self.after)
        if len(values) != len(types) or not all(
            isinstance(v, t) for v, t in zip(values, types, strict=True)
        ):
            raise BadRequest("invalid field 'after': not a cursor from this operation")
        return values

    def sql_limit(self) -> int | None:
        """Rows to fetch: one more than a page, to learn whether another follows."""
        return None if self.limit is None else self.limit + 1


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise ValueError("not a cursor returned by registryd") from None
    if not isinstance(values, list) or not values:
        raise ValueError("not a cursor returned by registryd")
    return values


def page(
    req: Paged, items: list[dict[str, Any]], key: Callable[[dict[str, Any]], list[Any]]
) -> Any:
    """The items of one page, with the cursor header when more follow."""
    if req.limit is None or len(items) <= req.limit:
        return items
    items = items[: req.limit]
    return Reply(items, {NEXT_HEADER: encode_cursor(key(items[-1]))})
