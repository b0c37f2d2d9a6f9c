"""Hundreds of random bodies at every endpoint: never a 500, never a crash.

The bodies are random but seeded (the seed is printed on failure), and biased
towards what breaks services: the operation's own field names with values of
the wrong type, huge and negative numbers, NUL characters, long and non-ASCII
strings, deep nesting and bytes that are not UTF-8.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any

import asyncpg
import orjson
import pytest

from subjects import OPERATIONS
from tests.support import CallError, Client

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

BODIES_PER_ENDPOINT = int(os.environ.get("REGISTRY_FUZZ_BODIES", "200"))
SEED = int(os.environ.get("REGISTRY_FUZZ_SEED", random.randrange(2**32)))

STRINGS = [
    "",
    " ",
    "a",
    "gpu-1",
    "x" * 300,
    "x" * 5000,
    "\x00",
    "a\x00b",
    "ü漢字🙂",
    "\u202e",
    "*",
    ">",
    "a.b.c",
    "null",
    "0",
    "-1",
    "' OR 1=1 --",
    "$1",
    "\\",
    '"',
    "\n\t",
    "healthy",
    "loaded",
]
INTEGERS = [0, 1, -1, 2, 7, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 + 1]
NUMBERS = [*INTEGERS, 10**30, 0.5, -0.0, 1e300]
TIMES = [
    "2026-11-27T09:00:00Z",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59+14:00",
    "2026-13-40T99:00:00Z",
    "2026-11-27",
    "yesterday",
]


def value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind in (2, 3):
        return rng.choice(NUMBERS)
    if kind in (4, 5):
        return rng.choice(STRINGS)
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(STRINGS): value(rng, depth + 1) for _ in range(rng.randrange(4))}


def plausible(rng: random.Random, annotation: Any, words: list[str]) -> Any:
    """A value of the JSON type the field wants, from the edges of its range."""
    text = repr(annotation)
    if "Preference" in text:
        return {"node_id": rng.choice(words), "replica_index": rng.choice(INTEGERS)}
    if "bool" in text:
        return rng.choice([True, False])
    if "list" in text:
        return [rng.choice(words) for _ in range(rng.randrange(4))]
    if "dict" in text:
        return {rng.choice(words): rng.choice(words) for _ in range(rng.randrange(4))}
    if "datetime" in text:
        return rng.choice(TIMES)
    if "int" in text or "float" in text:
        return rng.choice(INTEGERS)
    return rng.choice(words)


def body(rng: random.Random, model: type[Any], words: list[str]) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([b"", b"{", b"\xff\xfe\xfd", b"[" * 3000, b"nul", b"NaN", b"{}" * 3])
    if roll < 0.15:
        return json.dumps(value(rng)).encode()
    fields = model.model_fields
    chosen = rng.sample(list(fields), k=rng.randrange(len(fields) + 1)) if fields else []
    obj = {
        name: plausible(rng, fields[name].annotation, words) if rng.random() < 0.7 else value(rng)
        for name in chosen
    }
    if rng.random() < 0.2:
        obj[rng.choice(STRINGS)] = value(rng)
    return json.dumps(obj).encode()


async def test_random_bodies_never_get_a_500(client: Client, pg: asyncpg.Connection) -> None:
    # The target's id and model are among the words the bodies are made of, so
    # many requests reach real rows; the anchor's id is not, so it must survive.
    anchor = await client.healthy_node("fuzz-anchor", labels={"zone": "a"})
    await client.call("replica_set", node_id=anchor["id"], model="anchor-model", state="loaded")
    target = await client.healthy_node("fuzz-target", available_vram=2**40)
    await client.call("replica_set", node_id=target["id"], model="m", state="loaded")
    await client.call("scheduling_set", model_name="m", min_replicas=1)
    words = [*STRINGS, target["id"], "m", "fuzz-target"]
    before = await pg.fetch("SELECT * FROM nodes WHERE id = $1", anchor["id"])

    rng = random.Random(SEED)
    codes: dict[int, int] = {}
    sem = asyncio.Semaphore(32)

    async def send(op_name: str, data: bytes) -> None:
        async with sem:
            try:
                await client.call(op_name, data)
                codes[200] = codes.get(200, 0) + 1
            except CallError as err:
                assert err.code != 500, f"seed {SEED}: {op_name} {data[:200]!r} -> {err.message}"
                assert err.body["error"]["code"] == err.code
                codes[err.code] = codes.get(err.code, 0) + 1

    work = []
    for op in OPERATIONS:
        for _ in range(BODIES_PER_ENDPOINT):
            name = op.verb
            if op.subject_field:
                name = f"{op.verb}.{rng.choice(['x', target['id'], 'ü', '-1'])}"
            work.append(send(name, body(rng, op.model, words)))
    await asyncio.gather(*work)

    assert codes.get(400, 0) > len(work) // 4, codes  # most bodies are wrong...
    assert codes.get(200, 0) > 0, codes  # ...and some are right
    # The daemon still serves, and what it held before is untouched.
    assert await pg.fetch("SELECT * FROM nodes WHERE id = $1", anchor["id"]) == before
    got = await client.call("get", node_id=anchor["id"])
    assert got["labels"]["zone"] == "a" and got["model_count"] == 1
    assert await client.call("node_models", node_id=anchor["id"])
    assert orjson.dumps(await client.call("list"))
