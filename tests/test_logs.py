"""Logs cannot be forged: what a client sends is written to the log escaped.

A refused registration logs the claimant's name and address; an address holding
a newline would otherwise let any client write a line of its choosing into the
daemon's log (a fake ERROR, a fake "approved"), fooling the operator and any
log-based alerting.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import orjson
import pytest

from daemon import logs
from infra import retry
from tests.support import Client, Registryd, connect, eventually, fails

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

FORGED = "2026-01-01 ERROR forged line"


async def _serving(client: Client) -> bool | None:
    try:
        return await client.call("list") is not None or None
    except Exception:
        return None


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_refused_registration_cannot_write_a_line_into_the_log(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_url: str,
    log_format: str,
) -> None:
    env = daemon_env | {
        "REGISTRY_REGISTRATION_TOKEN": "s3cret-configured",
        "REGISTRY_LOG_FORMAT": log_format,
    }
    daemon = await spawn(env=env)
    nc = await connect(nats_url)
    client = Client(nc, env["REGISTRY_SUBJECT_PREFIX"])
    try:
        await eventually(lambda: _serving(client), "the daemon to serve")
        await fails(
            client.call(
                "register",
                name="gpu-1",
                address=f"x\n{FORGED}\r\x1b[31m\u2028",
                token="wrong",
            ),
            401,
        )
    finally:
        await nc.close()
    daemon.send(signal.SIGTERM)
    assert await daemon.exit_code() == 0, daemon.output()
    output = daemon.output()

    # Whatever the format, the forged text never starts a line of its own,
    # and no control character the client sent reaches the log raw.
    lines = output.split("\n")
    assert not [line for line in lines if line.startswith(FORGED)], output
    for raw in ("\r", "\x1b", "\u2028"):
        assert raw not in output, f"{raw!r} written raw:\n{output}"

    if log_format == "text":
        refused = [line for line in lines if "refused register" in line]
        assert len(refused) == 1, output
        assert f"(address x\\n{FORGED}\\r\\x1b[31m\\u2028)" in refused[0]
    else:
        records = [orjson.loads(line) for line in lines if line.strip()]
        refused = [r for r in records if "refused register" in r["message"]]
        assert len(refused) == 1, output
        # JSON carries the exact text, escaped by JSON itself.
        assert f"(address x\n{FORGED}\r\x1b[31m\u2028)" in refused[0]["message"]


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("first\nsecond")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("registryd.test", logging.WARNING, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\t", "\\t"),
        ("\x1b", "\\x1b"),
        ("\x00", "\\x00"),
        ("\x7f", "\\x7f"),
        ("\x85", "\\x85"),
        ("\x9b", "\\x9b"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
        ("\u202e", "\\u202e"),  # right-to-left override: text shown out of order
    ],
)
def test_the_text_formatter_escapes_control_characters(raw: str, escaped: str) -> None:
    formatter = logs.TextFormatter("%(levelname)s %(message)s")
    line = formatter.format(_record("node %s at %r", f"a{raw}b", f"c{raw}d"))
    assert line.startswith("WARNING node a")
    assert f"a{escaped}b" in line
    assert raw not in line


def test_the_text_formatter_keeps_readable_text_and_our_own_tracebacks() -> None:
    formatter = logs.TextFormatter("%(message)s")
    assert formatter.format(_record("gpü-1 at %s: %d ok", "10.0.0.5:50051", 3)) == (
        "gpü-1 at 10.0.0.5:50051: 3 ok"
    )
    # What repr() already escaped (names are logged as %r) is not escaped twice.
    assert formatter.format(_record("node %r", "a\nb\\c")) == "node 'a\\nb\\\\c'"
    # The message stays one line; the traceback is ours and keeps its lines.
    text = formatter.format(_record("failed for %s", "a\nb", exc=True))
    first, *rest = text.split("\n")
    assert first == "failed for a\\nb"
    assert rest[0].startswith("Traceback")
    assert any("ValueError: first" in line for line in rest)


def test_the_json_formatter_stays_one_line_per_record() -> None:
    text = f"x\n{FORGED}\r\x1b\x7f\x85\u2028\u2029"
    line = logs.JsonFormatter().format(_record("refused %s", text, exc=True))
    # orjson escapes C0 controls; DEL, C1 and U+2028/9 it writes raw, and
    # several readers split lines on U+0085, U+2028 and U+2029.
    for raw in ("\n", "\r", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"):
        assert raw not in line
    record = orjson.loads(line)
    assert record["message"] == f"refused {text}"
    assert "ValueError: first" in record["exception"]


def test_a_throttle_says_the_first_at_once_then_once_a_minute_with_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    throttle = retry.Throttle(every=60)
    reported = []
    for step in (0, 1, 2, 30, 61, 62, 200):  # seconds since the first
        clock[0] = 1000.0 + step
        reported.append(throttle.due())
    assert reported == [1, None, None, None, 4, None, 2]
    clock[0] += 1
    assert throttle.due() is None
    assert throttle.held() == 1  # said by a closing line...
    assert throttle.held() == 0  # ...and not again
