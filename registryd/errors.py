"""One exception class per error code of the contract, as a client sees them:
the daemon's own classes (infra/errors.py), so both sides speak one table.

An error reply carries `Nats-Service-Error-Code` and `Nats-Service-Error`
headers and a JSON body `{"error": {code, status, message}}`; `from_reply`
turns it into the class of its code, carrying the server's message. A request
that nobody answers (no daemon subscribed, or none answering in time) is an
`Unavailable` too, since what a caller does about it is the same: retry later.
"""

from __future__ import annotations

from typing import Any

import orjson

from infra.errors import (
    BadRequest,
    Conflict,
    Internal,
    NotFound,
    RegistryError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from infra.wire import ERROR_CODE_HEADER, ERROR_HEADER

__all__ = [
    "BY_CODE",
    "BadRequest",
    "Conflict",
    "Internal",
    "NoResponders",
    "NotFound",
    "RegistryError",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "from_reply",
]


class NoResponders(Unavailable):
    """No registryd subscribes to the subject (none running, or NATS just restarted)."""


class Timeout(Unavailable):
    """No reply within the client's timeout."""


# A caller's traceback names each class as the caller imports it
# (`registryd.NotFound: 404 not_found: …`), not by the daemon module that
# defines the table (infra.errors), which a client user never imports.
for _cls in (
    RegistryError,
    BadRequest,
    Unauthorized,
    NotFound,
    Conflict,
    TooLarge,
    Internal,
    Unavailable,
    NoResponders,
    Timeout,
):
    _cls.__module__ = "registryd"

BY_CODE: dict[int, type[RegistryError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, NotFound, Conflict, TooLarge, Internal, Unavailable)
}


def from_reply(headers: dict[str, str], data: bytes) -> RegistryError:
    """The exception for an error reply (its headers say it is one)."""
    try:
        code = int(headers[ERROR_CODE_HEADER])
    except (KeyError, ValueError):
        code = 500
    message = headers.get(ERROR_HEADER, "")
    try:
        body: Any = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", message))
    cls = BY_CODE.get(code)
    if cls is None:
        return RegistryError(message, code=code)
    return cls(message)
