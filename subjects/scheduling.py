"""Scheduling: per-model placement and autoscaling configs, and their cooldowns.

A config is keyed by model name. The reconciler (in LocalAI) bumps a config's
`unsatisfiable_ticks` while the cluster has no room for the model, then marks it
unsatisfiable until some time; any change that can add capacity (registration,
approval, label changes, replica caps) clears those flags again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    Field,
    StringConstraints,
    field_validator,
)

from infra.errors import NotFound
from subjects import explain
from subjects.base import (
    MAX_INT32,
    OK,
    Context,
    Group,
    ModelName,
    Paged,
    Request,
    found,
    page,
    record,
    records,
    text_problem,
)

group = Group()

COLUMNS = """
    s.id, s.model_name, s.node_selector, s.min_replicas, s.max_replicas, s.route_policy,
    s.balance_abs_threshold, s.balance_rel_threshold, s.min_prefix_match,
    s.unsatisfiable_until, s.unsatisfiable_ticks, s.created_at, s.updated_at"""


Replicas = Annotated[int, Field(ge=0, le=MAX_INT32)]
Fraction = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def _selector_text(value: Any) -> str:
    """`node_selector` as stored and returned: JSON text of a string→string object."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ValueError("must be a JSON object of label pairs") from None
    else:
        parsed = value
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
    ):
        raise ValueError("must be an object of string label values")
    # Checked here, before it is encoded as JSON text (which an unpaired
    # surrogate would fail), not only by Request's check of the result.
    problem = text_problem(parsed)
    if problem is not None:
        raise ValueError(problem)
    if not parsed:
        return ""
    return value if isinstance(value, str) else orjson.dumps(parsed).decode()


class SchedulingSetRequest(Request):
    model_name: ModelName
    node_selector: Annotated[str, BeforeValidator(_selector_text)] = ""
    min_replicas: Replicas = 0
    max_replicas: Replicas = 0
    route_policy: Annotated[str, StringConstraints(max_length=32)] = ""
    balance_abs_threshold: Replicas = 0
    balance_rel_threshold: Fraction = 0.0
    min_prefix_match: Fraction = 0.0

    @field_validator("max_replicas")
    @classmethod
    def _bounds(cls, value: int, info: Any) -> int:
        low = info.data.get("min_replicas", 0)
        if value and low > value:
            raise ValueError(f"must be at least min_replicas ({low}), or 0 for no limit")
        return value


# Upsert by model: a second set replaces every field (as Go's SetModelScheduling
# does) but leaves the reconciler's cooldown state alone.
SCHEDULING_SET = f"""
    INSERT INTO scheduling_configs AS s (
        model_name, node_selector, min_replicas, max_replicas, route_policy,
        balance_abs_threshold, balance_rel_threshold, min_prefix_match)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (model_name) DO UPDATE SET
        node_selector = EXCLUDED.node_selector,
        min_replicas = EXCLUDED.min_replicas,
        max_replicas = EXCLUDED.max_replicas,
        route_policy = EXCLUDED.route_policy,
        balance_abs_threshold = EXCLUDED.balance_abs_threshold,
        balance_rel_threshold = EXCLUDED.balance_rel_threshold,
        min_prefix_match = EXCLUDED.min_prefix_match,
        updated_at = now()
    RETURNING {COLUMNS}"""


@group.op("scheduling_set", SchedulingSetRequest)
async def scheduling_set(ctx: Context, req: SchedulingSetRequest) -> Any:
    """Create or replace the scheduling config of a model."""
    row = await ctx.db.fetchrow(
        SCHEDULING_SET,
        req.model_name,
        req.node_selector,
        req.min_replicas,
        req.max_replicas,
        req.route_policy,
        req.balance_abs_threshold,
        req.balance_rel_threshold,
        req.min_prefix_match,
    )
    return record(row)


class ModelRef(Request):
    model: ModelName


SCHEDULING_GET = f"SELECT {COLUMNS} FROM scheduling_configs s WHERE s.model_name = $1"


@group.op("scheduling_get", ModelRef)
async def scheduling_get(ctx: Context, req: ModelRef) -> Any:
    """The scheduling config of a model."""
    row = await ctx.db.fetchrow(SCHEDULING_GET, req.model)
    return found(row, f"no scheduling config for model {req.model!r}")


class SchedulingListRequest(Paged):
    autoscaling: bool = False


# Autoscaling is on when either replica bound is set.
SCHEDULING_LIST = f"""
    SELECT {COLUMNS} FROM scheduling_configs s
     WHERE (NOT $1 OR s.min_replicas > 0 OR s.max_replicas > 0)
       AND ($2::text IS NULL OR s.model_name > $2)
     ORDER BY s.model_name LIMIT $3"""


@group.op("scheduling_list", SchedulingListRequest)
async def scheduling_list(ctx: Context, req: SchedulingListRequest) -> Any:
    """Every scheduling config by model; with `autoscaling`, only those that scale."""
    rows = await ctx.db.fetch(
        SCHEDULING_LIST, req.autoscaling, *req.cursor(ModelName), req.sql_limit()
    )
    return page(req, records(rows), lambda c: [c["model_name"]], max_reply=ctx.max_reply)


SCHEDULING_DELETE = "DELETE FROM scheduling_configs WHERE model_name = $1"


@group.op("scheduling_delete", ModelRef)
async def scheduling_delete(ctx: Context, req: ModelRef) -> Any:
    """Delete a model's scheduling config (deleting an absent one is not an error)."""
    await ctx.db.execute(SCHEDULING_DELETE, req.model)
    return OK


UNSATISFIABLE_BUMP = """
    UPDATE scheduling_configs SET unsatisfiable_ticks = unsatisfiable_ticks + 1,
                                  updated_at = now()
     WHERE model_name = $1
    RETURNING unsatisfiable_ticks"""


@group.op("unsatisfiable_bump", ModelRef)
async def unsatisfiable_bump(ctx: Context, req: ModelRef) -> Any:
    """Count one more reconciler tick without room for the model."""
    ticks = await ctx.db.fetchval(UNSATISFIABLE_BUMP, req.model)
    if ticks is None:
        raise NotFound(f"no scheduling config for model {req.model!r}")
    return {"ticks": ticks}


def _text_time(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 time string, e.g. 2026-11-27T09:00:00Z")
    return value


def _in_utc_range(value: datetime) -> datetime:
    # Stored and returned in UTC: "9999-12-31T23:59:59-14:00" parses, but is
    # past the last time Python (hence the driver) can write in UTC.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside 0001-01-01T00:00:00Z … 9999-12-31T23:59:59Z") from None


class MarkRequest(ModelRef):
    until: Annotated[
        AwareDatetime,
        Field(strict=False),
        BeforeValidator(_text_time),
        AfterValidator(_in_utc_range),
    ]


# The config as explain reads it (subjects/explain.py CONFIG), for the
# explanation the model event carries: it is worked out in the same statement
# as the mark, so it sees the cluster the reconciler gave up on, and nothing
# can fail between the mark and its event. $1 the model, $9 until (explain
# takes $2…$8).
UNSATISFIABLE_MARK = """
    UPDATE scheduling_configs SET unsatisfiable_until = $9, updated_at = now()
     WHERE model_name = $1
    RETURNING node_selector, unsatisfiable_until, unsatisfiable_ticks"""


@group.op("unsatisfiable_mark", MarkRequest)
async def unsatisfiable_mark(ctx: Context, req: MarkRequest) -> Any:
    """Skip scale-ups of the model until `until` (or until capacity changes)."""

    why = await explain.after_mark(ctx.db, UNSATISFIABLE_MARK, req.model, req.until)
    if why is None:
        raise NotFound(f"no scheduling config for model {req.model!r}")
    await ctx.events.model(
        req.model,
        until=why["unsatisfiable_until"],
        ticks=why["unsatisfiable_ticks"],
        summary=why["summary"],
        placeable=why["placeable"],
        routable=why["routable"],
    )
    return OK


class ClearRequest(Request):
    model: ModelName | None = None


UNSATISFIABLE_CLEAR = """
    UPDATE scheduling_configs SET unsatisfiable_until = NULL, unsatisfiable_ticks = 0,
                                  updated_at = now()
     WHERE ($1::text IS NULL OR model_name = $1)
       AND (unsatisfiable_until IS NOT NULL OR unsatisfiable_ticks > 0)"""


@group.op("unsatisfiable_clear", ClearRequest)
async def unsatisfiable_clear(ctx: Context, req: ClearRequest) -> Any:
    """Clear the cooldown of one model, or of every model when none is given."""
    await ctx.db.execute(UNSATISFIABLE_CLEAR, req.model)
    return OK
