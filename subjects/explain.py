"""Explained placement: why a model can or cannot take a new replica on each node.

One statement judges every node by each rule of placement on its own, with the
very fragments the placement operations are built from (subjects/placement.py),
so an explanation cannot drift from what `free_slots`, `find_selector` and
`find_vram` answer; and it counts the replicas `findlock` can reach with
findlock's own candidate clause (subjects/routing.py). Each node is listed
with the rules it fails, in the contract's order of reason codes, and the
summary counts the nodes per first reason, as Kubernetes' "0/12 nodes are
available: …" does.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from pydantic import Field

from infra.db import Database
from subjects import node_status
from subjects.base import (
    JSON_OPTIONS,
    ByteCount,
    Context,
    Group,
    Labels,
    ModelName,
    Name,
    NodeIds,
    Paged,
    by_name,
    page,
)
from subjects.placement import (
    BACKEND,
    HEALTHY,
    MATCHED_AS,
    SLOT_FREE,
    TAKEN,
    TAKEN_AS,
    every_node,
    has_labels,
    in_node_set,
    model_replicas,
    selector_labels,
    vram_fits,
)
from subjects.routing import CANDIDATES as ROUTABLE

group = Group()

# The reason codes, in the contract's order: a node's reasons are listed, and
# the summary's counts are given, in this order. Each is a column `fails_<code>`
# of the statement below, true when that rule keeps the node out.
CODES = ("not_approved", "status", "node_type", "node_set", "selector", "vram", "slots")

# The selector used, once worked out (the `sel` of the statement below).
KEYS = "(SELECT sel.keys FROM sel)"
VALUES = "(SELECT sel.vals FROM sel)"

# The scheduling config of the model, if any: its selector (the default of
# `selector`) and the reconciler's cooldown. $1 the model.
CONFIG = """
    SELECT s.node_selector, s.unsatisfiable_until, s.unsatisfiable_ticks
      FROM scheduling_configs s WHERE s.model_name = $1"""


@functools.cache  # one entry per config clause: CONFIG and unsatisfiable_mark's
def statement(config: str, *, configured_only: bool = False) -> str:
    """The explanation, with the model's config row from `config` (a query of
    node_selector, unsatisfiable_until, unsatisfiable_ticks).

    $1 model, $2 node_ids, $3 min_bytes, $4/$5 the selector's keys and values,
    $6 whether the request gave a selector (else the config's is used), $7/$8
    the page of nodes (after, limit). One row: the cooldown, the replicas
    findlock can reach, the count of nodes per first reason (and per status,
    for `status`), and the page's nodes with what their messages need. With
    `configured_only`, no row when `config` has none.
    """
    first = " ".join(f"WHEN j.fails_{code} THEN '{code}'" for code in CODES)
    return f"""
    WITH cfg AS ({config}),
    sel AS (
        SELECT COALESCE(array_agg(p.key ORDER BY p.key), ARRAY[]::text[]) AS keys,
               COALESCE(array_agg(p.value ORDER BY p.key), ARRAY[]::text[]) AS vals
          FROM (SELECT s.key, s.value FROM unnest($4::text[], $5::text[]) AS s(key, value)
                 WHERE $6::boolean
                UNION ALL
                SELECT c.key, c.value
                  FROM cfg, jsonb_each_text(NULLIF(cfg.node_selector, '')::jsonb) AS c
                 WHERE NOT $6::boolean) AS p
    ),
    judged AS MATERIALIZED (
        SELECT n.id, n.name, n.status, n.available_vram, n.reserved_vram,
               n.max_replicas_per_model, {TAKEN} AS replicas,
               NOT n.approved AS fails_not_approved,
               ({HEALTHY}) IS NOT TRUE AS fails_status,
               ({BACKEND}) IS NOT TRUE AS fails_node_type,
               ({in_node_set("$2::text[]")}) IS NOT TRUE AS fails_node_set,
               ({has_labels(KEYS)}) IS NOT TRUE AS fails_selector,
               ({vram_fits("$3::bigint")}) IS NOT TRUE AS fails_vram,
               ({SLOT_FREE}) IS NOT TRUE AS fails_slots
          FROM nodes n {every_node(model_replicas("$1::text"), TAKEN_AS)}
          {every_node(selector_labels(KEYS, VALUES), MATCHED_AS)}
    ),
    firsts AS (
        SELECT code, CASE WHEN code = 'status' THEN status END AS status, count(*) AS nodes
          FROM (SELECT CASE {first} END AS code, j.status FROM judged j) AS f
         GROUP BY 1, 2
    ),
    page AS (
        SELECT j.*,
               -- The selector's pairs this node lacks: [key, wanted, its value or null].
               CASE WHEN j.fails_selector THEN (
                   SELECT jsonb_agg(jsonb_build_array(s.key, s.value, l.value) ORDER BY s.key)
                     FROM unnest(sel.keys, sel.vals) AS s(key, value)
                     LEFT JOIN node_labels l ON l.node_id = j.id AND l.key = s.key
                    WHERE l.value IS DISTINCT FROM s.value) END AS mismatched
          FROM judged j CROSS JOIN sel
         WHERE $7::text IS NULL OR j.name > $7::text
         ORDER BY j.name LIMIT $8::int
    )
    SELECT cfg.unsatisfiable_until, COALESCE(cfg.unsatisfiable_ticks, 0) AS unsatisfiable_ticks,
           (SELECT count(*) FROM {ROUTABLE}) AS routable,
           (SELECT COALESCE(jsonb_agg(jsonb_build_array(f.code, f.status, f.nodes)), '[]')
              FROM firsts f) AS firsts,
           (SELECT COALESCE(jsonb_agg(to_jsonb(p) ORDER BY p.name), '[]') FROM page p) AS nodes
      FROM sel {"JOIN" if configured_only else "LEFT JOIN"} cfg ON true"""


EXPLAIN = statement(CONFIG)


class ExplainRequest(Paged):
    model: ModelName
    min_bytes: ByteCount = 0
    node_ids: NodeIds = Field(default_factory=list)
    # Absent (or null): the model's scheduling config's selector, if any.
    # Given, even {}, it replaces that one.
    selector: Labels | None = None


@group.op("explain", ExplainRequest)
async def explain(ctx: Context, req: ExplainRequest) -> Any:
    """Why a model can or cannot take a new replica on each node, with a summary."""
    selector = req.selector or {}
    row = await ctx.db.fetchrow(
        EXPLAIN,
        req.model,
        req.node_ids,
        req.min_bytes,
        list(selector),
        list(selector.values()),
        req.selector is not None,
        *req.cursor(Name),
        req.sql_limit(),
    )
    assert row is not None  # one row whatever the cluster
    reply = explanation(req.model, req.min_bytes, row)
    # A page is cut to fit with what the reply holds besides its nodes
    # counted, however long the model's name and the summary are.
    envelope = len(orjson.dumps({**reply, "nodes": []}, option=JSON_OPTIONS))
    return page(
        req,
        reply["nodes"],
        by_name,
        max_reply=ctx.max_reply - envelope,
        body=lambda kept: {**reply, "nodes": kept},
    )


async def after_mark(db: Database, config: str, model: str, *args: Any) -> dict[str, Any] | None:
    """Run `config` (an UPDATE of the model's scheduling config, RETURNING
    what CONFIG selects, its own parameters from $9 on) and explain the model
    in the same statement, as placement would see it with the config's
    selector and no VRAM floor; the explanation without nodes, or None when
    the model has no config."""
    row = await db.fetchrow(
        statement(config, configured_only=True), model, [], 0, [], [], False, None, 0, *args
    )
    if row is None:
        return None
    out = explanation(model, 0, row)
    del out["nodes"]
    return out


# ---------------------------------------------------------------- wording


def explanation(model: str, min_bytes: int, row: Any) -> dict[str, Any]:
    """The reply, from the statement's row: the page's nodes with their reasons,
    and the summary of every node."""
    counts: dict[tuple[str | None, str | None], int] = {
        (code, status): count for code, status, count in row["firsts"]
    }
    placeable = counts.get((None, None), 0)
    total = sum(counts.values())
    parts = [
        phrase(code, status, count, min_bytes)
        for (code, status), count in sorted(
            ((key, count) for key, count in counts.items() if key[0] is not None),
            key=lambda item: (CODES.index(item[0][0] or ""), status_rank(item[0][1])),
        )
    ]
    summary = f"{placeable}/{total} nodes can take a replica of {model}"
    if parts:
        summary += ": " + ", ".join(parts)
    return {
        "model": model,
        "placeable": placeable,
        "routable": row["routable"],
        "summary": summary,
        "nodes": [node_reasons(model, min_bytes, node) for node in row["nodes"]],
        "unsatisfiable_until": row["unsatisfiable_until"],
        "unsatisfiable_ticks": row["unsatisfiable_ticks"],
    }


def status_rank(status: str | None) -> int:
    return node_status.ANY.index(status) if status in node_status.ANY else -1


def phrase(code: str, status: str | None, count: int, min_bytes: int) -> str:
    """One part of the summary: `count` nodes whose first reason is `code`."""
    if code == "not_approved":
        return f"{count} not approved"
    if code == "status":
        return f"{count} {status}"
    if code == "node_type":
        return f"{count} agent node{'' if count == 1 else 's'}"
    if code == "node_set":
        return f"{count} outside node_ids"
    if code == "selector":
        return f"{count} not matching the selector"
    if code == "vram":
        return f"{count} below {gib(min_bytes)} effectively free"
    return f"{count} at {'its' if count == 1 else 'their'} replica cap"


def node_reasons(model: str, min_bytes: int, node: dict[str, Any]) -> dict[str, Any]:
    reasons = [
        {"code": code, "message": message(code, model, min_bytes, node)}
        for code in CODES
        if node[f"fails_{code}"]
    ]
    return {
        "node_id": node["id"],
        "name": node["name"],
        "status": node["status"],
        "placeable": not reasons,
        "reasons": reasons,
    }


def message(code: str, model: str, min_bytes: int, node: dict[str, Any]) -> str:
    if code == "not_approved":
        return "never approved (registry.approve)"
    if code == "status":
        return f"{node['status']}, not healthy"
    if code == "node_type":
        return "an agent node: only backend nodes take replicas"
    if code == "node_set":
        return "not in node_ids"
    if code == "selector":
        return "; ".join(
            f"no label {key}, wants {key}={want}"
            if have is None
            else f"label {key}={have}, wants {key}={want}"
            for key, want, have in node["mismatched"] or ()
        )
    if code == "vram":
        available, reserved = node["available_vram"], node["reserved_vram"]
        free = available - reserved
        text = (
            f"{gib(free)} effectively free ({gib(available)} free, {gib(reserved)} reserved)"
            f" < {gib(min_bytes)}"
        )
        if gib(free) == gib(min_bytes):  # rounded alike: say by how much
            text += f" ({free} < {min_bytes} bytes)"
        return text
    return (
        f"{node['replicas']} of {node['max_replicas_per_model']} replica slots for {model} in use"
    )


def gib(count: int) -> str:
    """Bytes as GiB with one decimal, as the contract's messages show them."""
    return f"{count / 2**30:.1f} GiB"
