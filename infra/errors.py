"""The contract's error table, and the one place driver failures become it.

Handlers raise these; the service edge (daemon/service.py) turns any of them into
the ADR-32 headers and the JSON error body. Anything that is not a RegistryError
by the time it reaches the edge goes through `classify`, which knows the few
driver failures that mean something to a client; the rest is a 500.
"""

from __future__ import annotations

import asyncio

import asyncpg
import nats.errors
import nats.js.errors


class RegistryError(Exception):
    """An error of the contract's table: its code, status and message. The
    daemon raises them and maps them to the reply once, at its edge; the
    client (registryd.errors) raises the same classes from an error reply."""

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

    def __init__(self, message: str, *, who: str = "", why: str = "") -> None:
        # `who` and `why` go to the operator's log, never to the caller: who
        # the request claimed to be, and what exactly was wrong.
        super().__init__(message)
        self.who = who
        self.why = why


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


# Constraint names from schema.sql whose violation is the caller's doing.
_NOT_FOUND_CONSTRAINTS = {
    "replicas_node_id_fkey": "node not found",
    "node_labels_node_id_fkey": "node not found",
}
_CONFLICT_CONSTRAINTS = {
    "nodes_name_key": "a node with that name already exists",
}

# SQLSTATE classes that mean "the database is not there right now".
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")


def classify(exc: BaseException) -> RegistryError | None:
    """The contract error for a driver failure, or None for a real internal error."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        message = _NOT_FOUND_CONSTRAINTS.get(exc.constraint_name or "")
        return NotFound(message) if message else None
    if isinstance(exc, asyncpg.UniqueViolationError):
        message = _CONFLICT_CONSTRAINTS.get(exc.constraint_name or "")
        return Conflict(message) if message else None
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state.startswith(_UNAVAILABLE_SQLSTATE_CLASSES):
            return Unavailable("database unavailable, retry later")
        if isinstance(exc, asyncpg.QueryCanceledError):
            return Unavailable("database timed out, retry later")
        return None
    if isinstance(exc, _NATS_DOWN):
        return Unavailable("JetStream unavailable, retry later")
    if isinstance(exc, _OUR_BUGS):
        return None
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, asyncpg.InterfaceError)):
        # Connection refused or reset, pool acquire timed out, connection closed
        # mid-query, pool closing: all mean the database is not reachable now.
        return Unavailable("database unavailable, retry later")
    return None


# JetStream (the intent stream) not answering, or our connection to it gone.
_NATS_DOWN = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)

# Interface errors that come from how we called the driver, not from the network.
_OUR_BUGS = (
    ValueError,  # the driver's "invalid input for query argument" is also a ValueError
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
)
