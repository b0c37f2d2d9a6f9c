"""One exception class per error code of the contract, as a client sees them.

An error reply carries `Nats-Service-Error-Code` and `Nats-Service-Error`
headers and a JSON body `{"error": {code, status, message}}`; `from_reply`
turns it into the class of its code, carrying the server's message. A request
that nobody answers (no daemon subscribed, or none answering in time) is an
`Unavailable` too, since what a caller does about it is the same: retry later.
"""

from __future__ import annotations

from typing import Any

import orjson

from infra.wire import ERROR_CODE_HEADER, ERROR_HEADER


class RegistryError(Exception):
    """An error reply of the registry (or its absence, for Unavailable)."""

    code: int = 500
    status: str = "internal"

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code} {self.status}: {self.message}"


class BadRequest(RegistryError):
    """400: the body is not a JSON object, or a field is invalid or missing."""

    code, status = 400, "bad_request"


class Unauthorized(RegistryError):
    """401: the registration token (or the node key) is missing or wrong."""

    code, status = 401, "unauthorized"


class NotFound(RegistryError):
    """404: the node, replica, config, lease or intent does not exist."""

    code, status = 404, "not_found"


class Conflict(RegistryError):
    """409: not enough free VRAM, no free slot, or the node's status forbids it."""

    code, status = 409, "conflict"


class TooLarge(RegistryError):
    """413: the request body, or an unpaged reply, is too large."""

    code, status = 413, "too_large"


class Internal(RegistryError):
    """500: anything else; the message carries a request id the daemon logged."""

    code, status = 500, "internal"


class Unavailable(RegistryError):
    """503: PostgreSQL or JetStream unreachable, or the daemon overloaded: retry later."""

    code, status = 503, "unavailable"


class NoResponders(Unavailable):
    """No registryd subscribes to the subject (none running, or NATS just restarted)."""


class Timeout(Unavailable):
    """No reply within the client's timeout."""


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
