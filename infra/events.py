"""Events the daemon publishes, always after the database commit they describe."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

import orjson
from nats.aio.client import Client as NATS

from infra.intent_stream import encode_backend

log = logging.getLogger("registryd.events")

PREFIX_CACHE_INVALIDATE = "prefixcache.invalidate"
ALL_REPLICAS = -1


class Events:
    def __init__(self, nc: NATS, subject_prefix: str) -> None:
        self._nc = nc
        self._node_prefix = f"{subject_prefix}.events.node."
        self._model_prefix = f"{subject_prefix}.events.model."

    async def node(
        self,
        node_id: str,
        name: str,
        status: str,
        previous_status: str | None,
        reason: str,
        *,
        auth_refs: dict[str, str] | None = None,
    ) -> None:
        """A registration, a status change, or a deregistration of one node.

        A deregistration carries the ids of the credentials LocalAI provisioned
        for the node (`auth_refs`), so that whoever listens can revoke them."""
        log.info(
            "node %s (%s): %s -> %s (%s)",
            name,
            node_id,
            previous_status or "new",
            status,
            reason,
            extra={
                "node_id": node_id,
                "node": name,
                "status": status,
                "previous_status": previous_status,
                "reason": reason,
            },
        )
        event: dict[str, object] = {
            "node_id": node_id,
            "name": name,
            "status": status,
            "previous_status": previous_status,
            "reason": reason,
        }
        if auth_refs is not None:
            event["auth_refs"] = auth_refs
        await self._publish(self._node_prefix + node_id, event)

    async def model(
        self,
        model: str,
        *,
        until: datetime | None,
        ticks: int,
        summary: str,
        placeable: int,
        routable: int,
    ) -> None:
        """A model put in cooldown (unsatisfiable until `until`), with why.

        The subject's last token is the model name in unpadded base64url, as
        the intent stream encodes a backend name: any name (dots, spaces,
        `*`, `>`) is one token, and no two names share one."""
        log.info(
            "model %s unsatisfiable until %s after %d ticks: %s",
            model,
            until,
            ticks,
            summary,
            extra={"model": model, "ticks": ticks},
        )
        await self._publish(
            self._model_prefix + model_token(model),
            {
                "model": model,
                "until": until,
                "ticks": ticks,
                "summary": summary,
                "placeable": placeable,
                "routable": routable,
            },
        )

    async def replicas_removed(
        self, node_id: str, models: Iterable[str], replica: int = ALL_REPLICAS
    ) -> None:
        """Tell prefix-cache indexes to forget replicas that no longer exist."""
        for model in models:
            await self._publish(
                PREFIX_CACHE_INVALIDATE,
                {"model": model, "node_id": node_id, "replica": replica},
            )

    async def _publish(self, subject: str, payload: dict[str, object]) -> None:
        # The change is committed; an event lost to a closed connection must not
        # turn the caller's success into an error. nats-py buffers while reconnecting.
        try:
            await self._nc.publish(subject, orjson.dumps(payload, option=orjson.OPT_UTC_Z))
        except Exception:
            log.warning("could not publish event on %s", subject, exc_info=True)


def model_token(model: str) -> str:
    """The subject token of a model's events."""
    return encode_backend(model)
