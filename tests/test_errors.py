"""The contract's error table, as a client sees it on the wire."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from daemon.app import Daemon
from infra import wire
from tests.conftest import through
from tests.support import CallError, Client, Proxy, connect

ERROR_HEADERS = ("Nats-Service-Error", "Nats-Service-Error-Code")


async def error_of(client: Client, op: str, data: bytes) -> CallError:
    with pytest.raises(CallError) as caught:
        await client.call(op, data)
    return caught.value


def assert_error_shape(err: CallError, code: int, status: str) -> None:
    assert err.code == code
    assert set(ERROR_HEADERS) <= set(err.headers)
    assert err.body == {"error": {"code": code, "status": status, "message": err.message}}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_400(
    client: Client, data: bytes, needle: str
) -> None:
    err = await error_of(client, "register", data)
    assert_error_shape(err, 400, "bad_request")
    assert needle in err.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "a:1"}, "name"),
        ({"name": "n", "address": "a:1", "total_vram": -1}, "total_vram"),
        ({"name": "n", "address": "a:1", "total_vram": 2**63}, "total_vram"),
        ({"name": "n", "address": "a:1", "available_ram": 2**64 + 5}, "available_ram"),
        ({"name": "n", "address": "a:1", "total_vram": "1024"}, "total_vram"),
        ({"name": "n", "address": "a:1", "total_vram": 1.5}, "total_vram"),
        ({"name": "n", "address": "a:1", "total_vram": True}, "total_vram"),
        ({"name": "n", "address": "a:1", "node_type": "gpu"}, "node_type"),
        ({"name": "x" * 256, "address": "a:1"}, "name"),
        ({"name": "n", "address": "a" * 513}, "address"),
        ({"name": "n\x00", "address": "a:1"}, "name"),
        ({"name": "n", "address": "a:1", "labels": {"k": 5}}, "labels.k"),
        ({"name": "n", "address": "a:1", "labels": ["k"]}, "labels"),
        ({"name": "n"}, "address"),
    ],
)
async def test_a_bad_field_is_400_naming_it(
    client: Client, body: dict[str, Any], field: str
) -> None:
    err = await error_of(client, "register", json.dumps(body).encode())
    assert_error_shape(err, 400, "bad_request")
    assert f"'{field}'" in err.message


async def test_the_largest_byte_count_is_accepted(client: Client) -> None:
    node = await client.register("big", total_vram=2**63 - 1, available_vram=2**63 - 1)
    assert node["total_vram"] == 2**63 - 1


async def test_unknown_fields_are_ignored(client: Client) -> None:
    node = await client.register("gpu-1", future_field={"x": 1}, another=[1, 2])
    assert node["name"] == "gpu-1"
    assert "future_field" not in node


async def test_an_empty_body_means_an_empty_object(client: Client) -> None:
    assert await client.call("list", b"") == []
    err = await error_of(client, "approve", b"")
    assert_error_shape(err, 400, "bad_request")
    assert "'node_id'" in err.message


async def test_not_found_and_conflict_have_the_contract_shape(client: Client) -> None:
    err = await error_of(client, "approve", orjson.dumps({"node_id": "nope"}))
    assert_error_shape(err, 404, "not_found")
    node = await client.healthy_node("gpu-1")
    err = await error_of(client, "approve", orjson.dumps({"node_id": node["id"]}))
    assert_error_shape(err, 409, "conflict")
    assert "healthy" in err.message


async def test_a_wrong_registration_token_is_401(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> None:
    daemon = await start_daemon(registration_token="s3cret")
    nc = await connect(nats_url)
    try:
        client = Client(nc, daemon.settings.subject_prefix)
        for token in (None, "wrong", ""):
            body = {"name": "gpu-1", "address": "a:1"} | (
                {"token": token} if token is not None else {}
            )
            err = await error_of(client, "register", orjson.dumps(body))
            assert_error_shape(err, 401, "unauthorized")
            assert "s3cret" not in err.message
    finally:
        await nc.close()


async def test_a_body_over_the_limit_is_413_and_the_daemon_goes_on(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str
) -> None:
    daemon = await start_daemon(max_payload=1024)
    nc = await connect(nats_url)
    try:
        client = Client(nc, daemon.settings.subject_prefix)
        body = orjson.dumps({"name": "gpu-1", "address": "a:1", "pad": "x" * 2000})
        err = await error_of(client, "register", body)
        assert_error_shape(err, 413, "too_large")
        assert "1024" in err.message
        assert await client.call("list") == []
    finally:
        await nc.close()


async def test_an_unexpected_failure_is_500_with_a_request_id_and_no_internals(
    client: Client, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    node = await client.register("gpu-1")
    # Something the daemon cannot expect: its table vanished under it.
    await pg.execute("ALTER TABLE node_labels RENAME TO node_labels_gone")
    with caplog.at_level(logging.ERROR, logger="registryd.service"):
        err = await error_of(client, "labels_get", orjson.dumps({"node_id": node["id"]}))
    assert_error_shape(err, 500, "internal")
    match = re.search(r"request id ([0-9a-f]+)", err.message)
    assert match, err.message
    assert "node_labels" not in err.message and "relation" not in err.message
    assert any(match.group(1) in r.getMessage() for r in caplog.records)
    await pg.execute("ALTER TABLE node_labels_gone RENAME TO node_labels")
    # The daemon kept serving, and the data are intact.
    assert await client.call("labels_get", node_id=node["id"]) == {
        "node.name": "gpu-1",
        "node.replica-slots": "1",
    }


async def test_a_failure_before_the_handler_is_a_500_too(
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug anywhere on a request's way, not only in its handler, must still
    # answer (500 with a request id) and leave the daemon serving.
    def broken(_: bytes) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(wire, "parse_body", broken)
    with caplog.at_level(logging.ERROR, logger="registryd.service"):
        err = await error_of(client, "list", b"{}")
    monkeypatch.undo()
    assert err.code == 500 and "a bug" not in err.message
    match = re.search(r"request id ([0-9a-f]+)", err.message)
    assert match, err.message
    assert any(match.group(1) in r.getMessage() for r in caplog.records)
    assert await client.call("list") == []


async def test_an_unreachable_database_is_503_and_service_resumes_by_itself(
    start_daemon: Callable[..., Awaitable[Daemon]],
    database_url: str,
    nats_url: str,
    proxy: Proxy,
) -> None:
    daemon = await start_daemon(database_url=through(database_url, proxy.port), db_timeout=2.0)
    nc = await connect(nats_url)
    client = Client(nc, daemon.settings.subject_prefix, timeout=15)
    try:
        node = await client.register("gpu-1")
        proxy.cut()
        for op, body in (
            ("get", {"node_id": node["id"]}),
            ("register", {"name": "b", "address": "a:1"}),
        ):
            started = time.monotonic()
            err = await error_of(client, op, orjson.dumps(body))
            assert time.monotonic() - started < 10
            assert_error_shape(err, 503, "unavailable")
            assert "retry" in err.message
        proxy.restore()
        deadline = time.monotonic() + 15
        while True:
            try:
                got = await client.call("get", node_id=node["id"])
                break
            except CallError as exc:
                assert exc.code == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.2)
        assert got["name"] == "gpu-1"
    finally:
        await nc.close()


def cursor(*values: Any) -> str:
    """A forged `after`, built as registryd builds its own."""
    return base64.urlsafe_b64encode(orjson.dumps(list(values))).decode().rstrip("=")


def body(**fields: Any) -> bytes:
    # json, not orjson: only it writes an unpaired surrogate, as "\ud800".
    return json.dumps(fields).encode()


NODE = "NODE"  # stands for the id of the test's node in a body
MAX_INT32 = 2**31 - 1

# What a hostile or broken client can send that once reached the database or
# the reply encoder unchecked: each must be refused with the code shown (409
# where the contract says so), naming the field, and the daemon must go on.
HOSTILE: list[tuple[str, bytes, int, str]] = [
    # Cursors holding integers beyond the key's column type (int4, or beyond int8).
    ("nodes_with_model", body(model="m", limit=1, after=cursor(2**31, "x")), 400, "'after'"),
    ("nodes_with_model", body(model="m", limit=1, after=cursor(2**63, "x")), 400, "'after'"),
    ("node_models", body(node_id=NODE, limit=1, after=cursor("m", 2**31)), 400, "'after'"),
    ("node_models", body(node_id=NODE, limit=1, after=cursor("m", 2**64 - 1)), 400, "'after'"),
    ("replica_stats", body(model="m", limit=1, after=cursor("n", 2**31)), 400, "'after'"),
    ("replica_stats", body(model="m", limit=1, after=cursor("n", 2**63)), 400, "'after'"),
    ("loaded_models", body(limit=1, after=cursor("m", "n", 2**31)), 400, "'after'"),
    ("loaded_models", body(limit=1, after=cursor("m", "n", 2**64 - 1)), 400, "'after'"),
    # Cursors holding U+0000, which no text column can.
    ("list", body(limit=1, after=cursor("a\x00")), 400, "'after'"),
    ("scheduling_list", body(limit=1, after=cursor("m\x00")), 400, "'after'"),
    ("nodes_with_model", body(model="m", limit=1, after=cursor("\x00")), 400, "'after'"),
    # Times that are valid RFC 3339 but fall outside what the database's clock
    # type (and Python's) holds once moved to UTC.
    ("unsatisfiable_mark", body(model="m", until="9999-12-31T23:59:59-14:00"), 400, "'until'"),
    ("unsatisfiable_mark", body(model="m", until="0001-01-01T00:00:00+14:00"), 400, "'until'"),
    # The replica index at the integer limit: a full node, not an overflow.
    ("replica_next_index", body(node_id=NODE, model="m", max_slots=1), 409, "slot"),
    # Unpaired surrogates, in keys and values and every other text field.
    ("scheduling_set", body(model_name="x", node_selector={"\ud800": "v"}), 400, "'node_selector'"),
    ("scheduling_set", body(model_name="x", node_selector={"k": "\udfff"}), 400, "'node_selector'"),
    (
        "scheduling_set",
        body(model_name="x", node_selector='{"k": "\ud800"}'),
        400,
        "'node_selector'",
    ),
    ("find_selector", body(selector={"\ud800": "v"}), 400, "'selector"),
    ("find_selector", body(selector={"k": "\ud800"}), 400, "'selector"),
    ("labels_set", body(node_id=NODE, labels={"\ud800": "v"}), 400, "'labels"),
    ("label_set", body(node_id=NODE, key="k", value="\ud800"), 400, "'value'"),
    ("register", body(name="\ud800", address="a:1"), 400, "'name'"),
    ("register", body(name="n", address="\ud800"), 400, "'address'"),
    ("register", body(name="n", address="a:1", labels={"k": "\ud800"}), 400, "'labels"),
    ("get", body(name="gpu\ud800"), 400, "'name'"),
    ("findlock", body(model="m\ud800"), 400, "'model'"),
    ("scheduling_get", body(model="\udc00"), 400, "'model'"),
]


@pytest.mark.parametrize(
    ("op", "data", "code", "field"),
    HOSTILE,
    ids=[f"{op}-{i}" for i, (op, *_) in enumerate(HOSTILE)],
)
async def test_hostile_input_is_a_client_error_never_a_500(
    client: Client, op: str, data: bytes, code: int, field: str
) -> None:
    node = await client.healthy_node("gpu-1", max_replicas_per_model=2)
    await client.replica(node, "m", 0)
    await client.replica(node, "m", MAX_INT32)
    await client.call("scheduling_set", model_name="m")
    data = data.replace(NODE.encode(), node["id"].encode())
    err = await error_of(client, op, data)
    assert_error_shape(err, code, {400: "bad_request", 409: "conflict"}[code])
    assert field in err.message
    # The daemon is unharmed.
    assert (await client.call("get", node_id=node["id"]))["name"] == "gpu-1"
