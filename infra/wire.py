"""The wire: how requests and replies travel, in one place.

The daemon's edge (daemon/service.py), the operations' paging (the next-page
header), the `registryd` command line, the Python client and the tests all
read and write the same headers and bodies; they take them from here rather
than spelling `"Registry-Next"` or the ADR-32 error headers each on its own.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError

from infra.errors import BadRequest, RegistryError

# ADR-32's error headers: the message, and the contract's code.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
# A list reply with more after it carries the cursor for `after` here.
NEXT_HEADER = "Registry-Next"
# Times as RFC 3339 in UTC with a Z, as the contract writes them.
JSON_OPTIONS = orjson.OPT_UTC_Z


def encode(result: Any) -> bytes:
    return orjson.dumps(result, option=JSON_OPTIONS)


def parse_body(data: bytes) -> dict[str, Any]:
    if not data.strip():
        return {}
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson stops at 64-bit integers; the standard parser reads any size,
        # so a too-large byte count is reported against its field, not as bad JSON.
        try:
            value = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("body must be a JSON object")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def describe_validation(exc: ValidationError) -> str:
    """One sentence naming the first bad field, e.g. "total_vram: must be ≤ …"."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    if err["type"] == "missing":
        return f"missing required field '{where}'"
    message = err["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else "invalid value"
    return f"invalid field '{where}': {message}"


def error_reply(err: RegistryError) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"error": {"code": err.code, "status": err.status, "message": err.message}})
    # Header values cannot carry line breaks.
    description = " ".join(err.message.split())
    return body, {ERROR_HEADER: description, ERROR_CODE_HEADER: str(err.code)}
