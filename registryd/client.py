"""`Registry`: a typed async client of the registryd wire contract.

One method per operation, named as the operation (`registry.get` is
`Registry.get`), with typed arguments and pydantic reply models. Every list
operation has two forms: `<op>_page(limit=…, after=…)` returns one `Page`, and
`<op>(…)` is an async iterator that follows `Registry-Next` to the end
(`registry.list` is `list_page` and `nodes`). Error replies raise the
exception class of their code (registryd.errors).

    registry = await Registry.connect()            # REGISTRY_* settings, as the daemon
    async with registry.routed("qwen3-8b", lease_s=30) as pick:
        ...                                         # send the request to pick.replica.address
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import nats
import nats.errors
import orjson
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from infra.wire import NEXT_HEADER
from registryd.errors import (
    ERROR_CODE_HEADER,
    NoResponders,
    NotFound,
    RegistryError,
    Timeout,
    Unavailable,
    from_reply,
)
from registryd.models import (
    AuthRefs,
    Explanation,
    Intent,
    Lease,
    LoadInfo,
    Node,
    NodeWithExtras,
    NodeWithModel,
    OwnNode,
    Page,
    Pick,
    Replica,
    ReplicaStat,
    Scheduling,
)

if TYPE_CHECKING:
    from infra.config import Settings

log = logging.getLogger("registryd.client")

# Items per page when an iterator walks a list (the contract allows 1-10000).
PAGE_SIZE = 1000
# A routed block's release, tried over about 7 s of outage before the lease
# is left to expire.
RELEASE_TRIES = 8

T = TypeVar("T")
Labels = Mapping[str, str]
STATUS_HEADER = Header.STATUS.value  # where nats-server says no one serves a subject


class _Replies:
    """This client's replies, on one wildcard inbox subscription: a request
    publishes with `<inbox>.<n>` as its reply subject and waits for its future.

    nats-py's `request` does the same, at a higher price per request: random
    bytes from the kernel and a new NUID for each token, and `wait_for`'s timer
    and waiter around the future. With 64 routers in one process that was a
    fifth of the client's CPU (py-spy); without it the bench's client spent
    68-83 us of CPU on a findlock and inflight_dec pair instead of 86-103."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self.inbox = nc.new_inbox()
        self._count = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._sub: Subscription | None = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(f"{self.inbox}.*", cb=self._reply)

    async def close(self) -> None:
        if self._sub is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _reply(self, msg: Msg) -> None:
        waiter = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def request(self, subject: str, payload: bytes, wait_s: float) -> Msg:
        token = str(next(self._count))
        waiter: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiter
        try:
            await self._nc.publish(subject, payload, reply=f"{self.inbox}.{token}")
            async with asyncio.timeout(wait_s):
                msg = await waiter
        except TimeoutError:
            raise nats.errors.TimeoutError from None
        finally:
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS_STATUS:
            raise nats.errors.NoRespondersError
        return msg


def _fields(**fields: Any) -> dict[str, Any]:
    """A request body without the arguments left out (None): absent, not null."""
    return {k: v for k, v in fields.items() if v is not None}


class Registry:
    """A registryd client on a nats-py connection.

    `Registry(nc, prefix="registry")` uses a connection the caller owns;
    `await Registry.connect()` opens one with the daemon's own REGISTRY_*
    settings and closes it on `close()` (or at the end of `async with`).
    """

    def __init__(self, nc: NATS, prefix: str = "registry", *, timeout: float = 10.0) -> None:
        self.nc = nc
        self.prefix = prefix
        self.timeout = timeout
        self._owns_connection = False
        # Lease releases that outlive a cancelled `routed` block.
        self._releases: set[asyncio.Task[None]] = set()
        self._replies: asyncio.Task[_Replies] | None = None  # opened by the first request

    @classmethod
    async def connect(
        cls,
        settings: Settings | None = None,
        *,
        request_timeout: float = 10.0,
        name: str = "registryd client",
        **options: Any,
    ) -> Registry:
        """Connect with the daemon's settings (from the environment when not
        given): the same NATS servers, credentials, TLS and subject prefix,
        and, like the registryd commands, a daemon started with --embedded
        from this directory when REGISTRY_NATS_URL is not set. The connection
        reconnects for ever; `options` override any of nats.connect's
        arguments."""
        from daemon.embedded import found
        from infra import config
        from infra.config import nats_options

        if settings is None:
            settings = found(config.load())  # the REGISTRY_* environment
        opts: dict[str, Any] = nats_options(settings) | {
            "name": name,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
        }
        opts.update(options)
        registry = cls(await nats.connect(**opts), settings.subject_prefix, timeout=request_timeout)
        registry._owns_connection = True
        return registry

    async def close(self) -> None:
        """Wait for lease releases still running; close the connection if ours."""
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        if self._replies is not None and self._replies.done() and not self._replies.exception():
            await self._replies.result().close()
        self._replies = None
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ transport

    async def request(
        self, op: str, body: Mapping[str, Any] | None = None, *, wait_s: float | None = None
    ) -> tuple[Any, dict[str, str]]:
        """Send one request to `<prefix>.<op>`: the parsed reply and its headers.

        An error reply raises its RegistryError subclass; no daemon subscribed
        raises NoResponders, no reply in time Timeout (both Unavailable)."""
        subject = f"{self.prefix}.{op}"
        wait = self.timeout if wait_s is None else wait_s
        try:
            replies = await self._open_replies()
            msg = await replies.request(subject, orjson.dumps(body or {}), wait)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"no registryd serves {subject}") from None
        except nats.errors.TimeoutError:
            raise Timeout(f"no reply on {subject} within {wait:g}s") from None
        except (nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError):
            raise Unavailable(f"NATS is reconnecting; {subject} not sent") from None
        headers = dict(msg.headers or {})
        if ERROR_CODE_HEADER in headers:
            raise from_reply(headers, msg.data)
        return (orjson.loads(msg.data) if msg.data else {}), headers

    async def _open_replies(self) -> _Replies:
        if self._replies is None or (self._replies.done() and self._replies.exception()):

            async def open_() -> _Replies:
                replies = _Replies(self.nc)
                await replies.open()
                return replies

            self._replies = asyncio.ensure_future(open_())  # concurrent first requests share it
        return await asyncio.shield(self._replies)

    async def call(self, op: str, body: Mapping[str, Any] | None = None) -> Any:
        """The parsed reply of one request (see `request`)."""
        reply, _ = await self.request(op, body)
        return reply

    async def _page(
        self, op: str, body: Mapping[str, Any], limit: int | None, after: str | None
    ) -> tuple[Any, str | None]:
        reply, headers = await self.request(op, {**body, **_fields(limit=limit, after=after)})
        return reply, headers.get(NEXT_HEADER)

    async def _list_page(
        self,
        op: str,
        body: Mapping[str, Any],
        parse: Callable[[Any], T],
        limit: int | None,
        after: str | None,
    ) -> Page[T]:
        items, cursor = await self._page(op, body, limit, after)
        return Page([parse(item) for item in items], cursor)

    async def _each(
        self, op: str, body: Mapping[str, Any], parse: Callable[[Any], T], page_size: int
    ) -> AsyncIterator[T]:
        after: str | None = None
        while True:
            page = await self._list_page(op, body, parse, page_size, after)
            for item in page.items:
                yield item
            if page.next is None:
                return
            after = page.next

    # ------------------------------------------------------------ nodes

    async def register(
        self,
        name: str,
        *,
        address: str | None = None,
        node_type: Literal["backend", "agent"] | None = None,
        http_address: str | None = None,
        token: str | None = None,
        total_vram: int | None = None,
        available_vram: int | None = None,
        total_ram: int | None = None,
        available_ram: int | None = None,
        gpu_vendor: str | None = None,
        max_replicas_per_model: int | None = None,
        labels: Labels | None = None,
        node_key: str | None = None,
    ) -> Node:
        """Register a worker node, or re-register it (fields left out keep their values)."""
        body = _fields(
            name=name,
            address=address,
            node_type=node_type,
            http_address=http_address,
            token=token,
            total_vram=total_vram,
            available_vram=available_vram,
            total_ram=total_ram,
            available_ram=available_ram,
            gpu_vendor=gpu_vendor,
            max_replicas_per_model=max_replicas_per_model,
            labels=dict(labels) if labels is not None else None,
            node_key=node_key,
        )
        return Node.model_validate(await self.call("register", body))

    async def approve(self, node_id: str) -> Node:
        return Node.model_validate(await self.call("approve", {"node_id": node_id}))

    async def deregister(self, node_id: str) -> AuthRefs | None:
        """Remove a node; the credentials LocalAI provisioned for it, if any."""
        reply = await self.call("deregister", {"node_id": node_id})
        refs = reply.get("auth_refs")
        return AuthRefs.model_validate(refs) if refs else None

    async def offline(self, node_id: str) -> None:
        await self.call("offline", {"node_id": node_id})

    async def unhealthy(self, node_id: str) -> None:
        await self.call("unhealthy", {"node_id": node_id})

    async def healthy(self, node_id: str) -> None:
        await self.call("healthy", {"node_id": node_id})

    async def drain(self, node_id: str) -> None:
        await self.call("drain", {"node_id": node_id})

    async def heartbeat(
        self,
        node_id: str,
        *,
        available_vram: int | None = None,
        total_vram: int | None = None,
        available_ram: int | None = None,
        gpu_vendor: str | None = None,
        wait: bool = False,
    ) -> None:
        """A heartbeat on `<prefix>.heartbeat.<node_id>`: published, or with
        `wait` sent as a request, answered once written (NotFound for a node
        the registry does not know)."""
        body = _fields(
            available_vram=available_vram,
            total_vram=total_vram,
            available_ram=available_ram,
            gpu_vendor=gpu_vendor,
        )
        if wait:
            await self.call(f"heartbeat.{node_id}", body)
            return
        try:
            await self.nc.publish(f"{self.prefix}.heartbeat.{node_id}", orjson.dumps(body))
        except (nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError):
            raise Unavailable("NATS is reconnecting; heartbeat not sent") from None

    async def auth_refs(self, node_id: str, auth_user_id: str = "", api_key_id: str = "") -> None:
        body = {"node_id": node_id, "auth_user_id": auth_user_id, "api_key_id": api_key_id}
        await self.call("auth_refs", body)

    async def get(self, node_id: str | None = None, *, name: str | None = None) -> NodeWithExtras:
        """One node with its extras, by id or by name."""
        body = _fields(node_id=node_id, name=name)
        return NodeWithExtras.model_validate(await self.call("get", body))

    @overload
    async def list_page(
        self, *, extras: Literal[False] = False, limit: int | None = ..., after: str | None = ...
    ) -> Page[Node]: ...
    @overload
    async def list_page(
        self, *, extras: Literal[True], limit: int | None = ..., after: str | None = ...
    ) -> Page[NodeWithExtras]: ...
    async def list_page(
        self, *, extras: bool = False, limit: int | None = None, after: str | None = None
    ) -> Page[Node] | Page[NodeWithExtras]:
        """One page of `list` (every node by name; without `limit`, all at once)."""
        model = NodeWithExtras if extras else Node
        return await self._list_page("list", {"extras": extras}, model.model_validate, limit, after)

    @overload
    def nodes(
        self, *, extras: Literal[False] = False, page_size: int = ...
    ) -> AsyncIterator[Node]: ...
    @overload
    def nodes(
        self, *, extras: Literal[True], page_size: int = ...
    ) -> AsyncIterator[NodeWithExtras]: ...
    def nodes(
        self, *, extras: bool = False, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[Node] | AsyncIterator[NodeWithExtras]:
        """Every node, by name, page after page (`list`)."""
        model = NodeWithExtras if extras else Node
        return self._each("list", {"extras": extras}, model.model_validate, page_size)

    async def stale_page(
        self, threshold_s: float, *, limit: int | None = None, after: str | None = None
    ) -> Page[Node]:
        body = {"threshold_s": threshold_s}
        return await self._list_page("stale", body, Node.model_validate, limit, after)

    def stale(self, threshold_s: float, *, page_size: int = PAGE_SIZE) -> AsyncIterator[Node]:
        """Active nodes whose last heartbeat is older than `threshold_s` seconds."""
        body = {"threshold_s": threshold_s}
        return self._each("stale", body, Node.model_validate, page_size)

    async def max_replicas(self, node_id: str, max_replicas_per_model: int) -> Node:
        body = {"node_id": node_id, "max_replicas_per_model": max_replicas_per_model}
        return Node.model_validate(await self.call("max_replicas", body))

    async def max_replicas_reset(self, node_id: str) -> Node:
        return Node.model_validate(await self.call("max_replicas_reset", {"node_id": node_id}))

    async def node_key_reset(self, node_id: str) -> None:
        """Unbind a node's key (admin); its next registration binds a new one."""
        await self.call("node_key_reset", {"node_id": node_id})

    async def offline_self(self, node_id: str) -> None:
        """A worker marks its own node offline, on `<prefix>.offline.<node_id>`."""
        await self.call(f"offline.{node_id}", {"node_id": node_id})

    async def own_node(self, node_id: str) -> OwnNode:
        """A worker reads its own node and its replicas, on `<prefix>.self.<node_id>`."""
        return OwnNode.model_validate(await self.call(f"self.{node_id}", {}))

    async def replica_set_self(
        self,
        node_id: str,
        model: str,
        replica_index: int = 0,
        *,
        state: Literal["loading", "loaded", "unloading", "idle"],
        address: str = "",
    ) -> Replica:
        """A worker records a replica on its own node, on
        `<prefix>.replica_set.<node_id>`; the requests in flight on a replica
        already recorded stay as they are."""
        body = {"model": model, "replica_index": replica_index, "state": state, "address": address}
        return Replica.model_validate(await self.call(f"replica_set.{node_id}", body))

    # ------------------------------------------------------------ placement

    async def find_vram(self, min_bytes: int = 0, *, node_ids: list[str] | None = None) -> Node:
        body = _fields(min_bytes=min_bytes, node_ids=node_ids)
        return Node.model_validate(await self.call("find_vram", body))

    async def find_idle(self, *, node_ids: list[str] | None = None) -> Node:
        return Node.model_validate(await self.call("find_idle", _fields(node_ids=node_ids)))

    async def find_least_loaded(self, *, node_ids: list[str] | None = None) -> Node:
        body = _fields(node_ids=node_ids)
        return Node.model_validate(await self.call("find_least_loaded", body))

    async def find_selector_page(
        self, selector: Labels, *, limit: int | None = None, after: str | None = None
    ) -> Page[Node]:
        body = {"selector": dict(selector)}
        return await self._list_page("find_selector", body, Node.model_validate, limit, after)

    def find_selector(self, selector: Labels, *, page_size: int = PAGE_SIZE) -> AsyncIterator[Node]:
        """Healthy backend nodes carrying every label of `selector`."""
        body = {"selector": dict(selector)}
        return self._each("find_selector", body, Node.model_validate, page_size)

    async def free_slots_page(
        self,
        model: str,
        *,
        node_ids: list[str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[Node]:
        body = _fields(model=model, node_ids=node_ids)
        return await self._list_page("free_slots", body, Node.model_validate, limit, after)

    def free_slots(
        self, model: str, *, node_ids: list[str] | None = None, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[Node]:
        """Healthy backend nodes that can host one more replica of `model`."""
        body = _fields(model=model, node_ids=node_ids)
        return self._each("free_slots", body, Node.model_validate, page_size)

    async def capacity(self, model: str, *, node_ids: list[str] | None = None) -> int:
        reply = await self.call("capacity", _fields(model=model, node_ids=node_ids))
        return int(reply["capacity"])

    async def reserve_vram(self, node_id: str, nbytes: int) -> None:
        """Reserve VRAM for a load about to start (Conflict when it does not fit)."""
        await self.call("reserve_vram", {"node_id": node_id, "bytes": nbytes})

    async def release_vram(self, node_id: str, nbytes: int) -> None:
        await self.call("release_vram", {"node_id": node_id, "bytes": nbytes})

    async def explain_page(
        self,
        model: str,
        *,
        min_bytes: int | None = None,
        node_ids: list[str] | None = None,
        selector: Labels | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> tuple[Explanation, str | None]:
        """One page of `explain`: the explanation with a page of its nodes, and
        the cursor of the next page (None: the last)."""
        body = _fields(
            model=model,
            min_bytes=min_bytes,
            node_ids=node_ids,
            selector=dict(selector) if selector is not None else None,
        )
        reply, cursor = await self._page("explain", body, limit, after)
        return Explanation.model_validate(reply), cursor

    async def explain(
        self,
        model: str,
        *,
        min_bytes: int | None = None,
        node_ids: list[str] | None = None,
        selector: Labels | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Explanation:
        """Why each node can, or cannot, take a replica of `model`: the summary
        and every node, page after page."""
        kwargs: dict[str, Any] = {
            "min_bytes": min_bytes,
            "node_ids": node_ids,
            "selector": selector,
        }
        first, cursor = await self.explain_page(model, **kwargs, limit=page_size)
        nodes = list(first.nodes)
        while cursor is not None:
            more, cursor = await self.explain_page(model, **kwargs, limit=page_size, after=cursor)
            nodes.extend(more.nodes)
        return first.model_copy(update={"nodes": nodes})

    # ------------------------------------------------------------ routing

    async def findlock(
        self,
        model: str,
        *,
        node_ids: list[str] | None = None,
        prefer: tuple[str, int] | None = None,
        lease_s: float | None = None,
    ) -> Pick:
        """Pick the best loaded replica of `model` and count a request in flight
        on it (NotFound when there is none); with `lease_s`, under a lease."""
        body = _fields(model=model, node_ids=node_ids, lease_s=lease_s)
        if prefer is not None:
            body["prefer"] = {"node_id": prefer[0], "replica_index": prefer[1]}
        return Pick.model_validate(await self.call("findlock", body))

    @contextlib.asynccontextmanager
    async def routed(
        self,
        model: str,
        lease_s: float = 30.0,
        *,
        node_ids: list[str] | None = None,
        prefer: tuple[str, int] | None = None,
        renew_every: float | None = None,
    ) -> AsyncIterator[Pick]:
        """A router's request, as a block: pick a replica under a lease, keep
        the lease renewed while the block runs (every `renew_every` seconds, a
        third of `lease_s` by default), and give the unit back when it ends, by
        return, exception or cancellation, trying again through a short outage.
        If this process dies instead, the lease expires and the daemon gives
        the unit back itself."""
        pick = await self.findlock(model, node_ids=node_ids, prefer=prefer, lease_s=lease_s)
        lease_id = pick.lease_id
        assert lease_id is not None, "findlock with lease_s returns a lease id"
        renewer = asyncio.create_task(
            self._keep_lease(lease_id, lease_s, renew_every or lease_s / 3),
            name=f"registryd lease {lease_id}",
        )
        try:
            yield pick
        finally:
            renewer.cancel()
            await asyncio.wait([renewer])  # its own end, never its CancelledError
            # The release must happen even if the caller is cancelled again
            # while it runs: it is a task of its own, which the shield lets
            # finish; close() waits for any still running.
            release = asyncio.create_task(self._release(lease_id), name=f"release {lease_id}")
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
            await asyncio.shield(release)

    async def _keep_lease(self, lease_id: str, lease_s: float, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.lease_renew(lease_id, lease_s)
            except NotFound:
                log.warning("lease %s expired before it could be renewed", lease_id)
                return
            except Unavailable as exc:
                log.warning("could not renew lease %s (%s); trying again", lease_id, exc.message)

    async def _release(self, lease_id: str) -> None:
        # Through a short outage (the database failing over, a daemon
        # restarting) it is tried again: a unit left to expire makes its
        # replica look busier than it is for the rest of the lease.
        wait = 0.1
        for _ in range(RELEASE_TRIES - 1):
            try:
                await self.inflight_dec(lease_id=lease_id)
                return
            except Unavailable:
                await asyncio.sleep(wait)
                wait = min(2 * wait, 2.0)
            except RegistryError as exc:
                log.warning("could not release lease %s (%s)", lease_id, exc)
                return
        try:
            await self.inflight_dec(lease_id=lease_id)
        except RegistryError as exc:
            # Not lost: the daemon releases the lease when it expires.
            log.warning("could not release lease %s (%s); it will expire", lease_id, exc)

    async def inflight_inc(self, node_id: str, model: str, replica_index: int = 0) -> None:
        body = {"node_id": node_id, "model": model, "replica_index": replica_index}
        await self.call("inflight_inc", body)

    async def inflight_dec(
        self,
        node_id: str | None = None,
        model: str | None = None,
        replica_index: int = 0,
        *,
        lease_id: str | None = None,
    ) -> None:
        """A request on a replica ended: by replica, or by the lease findlock gave."""
        if lease_id is not None:
            body: dict[str, Any] = {"lease_id": lease_id}
        else:
            body = _fields(node_id=node_id, model=model, replica_index=replica_index)
        await self.call("inflight_dec", body)

    async def lease_renew(self, lease_id: str, lease_s: float) -> datetime:
        """Extend a lease to `lease_s` seconds from now: its new end."""
        reply = await self.call("lease_renew", {"lease_id": lease_id, "lease_s": lease_s})
        return Lease.model_validate(reply).expires_at

    # ------------------------------------------------------------ replicas

    async def replica_set(
        self,
        node_id: str,
        model: str,
        replica_index: int = 0,
        *,
        state: Literal["loading", "loaded", "unloading", "idle"],
        address: str = "",
        in_flight: int = 0,
    ) -> Replica:
        body = {
            "node_id": node_id,
            "model": model,
            "replica_index": replica_index,
            "state": state,
            "address": address,
            "in_flight": in_flight,
        }
        return Replica.model_validate(await self.call("replica_set", body))

    async def replica_get(self, node_id: str, model: str, replica_index: int = 0) -> Replica:
        body = {"node_id": node_id, "model": model, "replica_index": replica_index}
        return Replica.model_validate(await self.call("replica_get", body))

    async def replica_remove(self, node_id: str, model: str, replica_index: int = 0) -> None:
        body = {"node_id": node_id, "model": model, "replica_index": replica_index}
        await self.call("replica_remove", body)

    async def replica_remove_all(self, node_id: str, model: str) -> None:
        await self.call("replica_remove_all", {"node_id": node_id, "model": model})

    async def replica_touch(self, node_id: str, model: str, replica_index: int = 0) -> None:
        body = {"node_id": node_id, "model": model, "replica_index": replica_index}
        await self.call("replica_touch", body)

    async def replica_load_info(
        self,
        node_id: str,
        model: str,
        replica_index: int = 0,
        *,
        backend_type: str = "",
        model_opts: bytes | None = None,
    ) -> None:
        body = _fields(
            node_id=node_id,
            model=model,
            replica_index=replica_index,
            backend_type=backend_type,
            model_opts=_b64(model_opts),
        )
        await self.call("replica_load_info", body)

    async def replica_count(self, node_id: str, model: str) -> int:
        reply = await self.call("replica_count", {"node_id": node_id, "model": model})
        return int(reply["count"])

    async def replica_next_index(self, node_id: str, model: str, max_slots: int) -> int:
        """The lowest free replica index below `max_slots` (Conflict when full)."""
        body = {"node_id": node_id, "model": model, "max_slots": max_slots}
        return int((await self.call("replica_next_index", body))["replica_index"])

    async def replica_stats_page(
        self,
        model: str,
        *,
        node_ids: list[str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Page[ReplicaStat]:
        body = _fields(model=model, node_ids=node_ids)
        return await self._list_page(
            "replica_stats", body, ReplicaStat.model_validate, limit, after
        )

    def replica_stats(
        self, model: str, *, node_ids: list[str] | None = None, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[ReplicaStat]:
        """In-flight counts of the loaded replicas of `model` on healthy nodes."""
        body = _fields(model=model, node_ids=node_ids)
        return self._each("replica_stats", body, ReplicaStat.model_validate, page_size)

    async def node_models_page(
        self, node_id: str, *, limit: int | None = None, after: str | None = None
    ) -> Page[Replica]:
        body = {"node_id": node_id}
        return await self._list_page("node_models", body, Replica.model_validate, limit, after)

    def node_models(self, node_id: str, *, page_size: int = PAGE_SIZE) -> AsyncIterator[Replica]:
        """Every replica row on a node, by model and replica index."""
        return self._each("node_models", {"node_id": node_id}, Replica.model_validate, page_size)

    async def loaded_models_page(
        self, *, limit: int | None = None, after: str | None = None
    ) -> Page[Replica]:
        return await self._list_page("loaded_models", {}, Replica.model_validate, limit, after)

    def loaded_models(self, *, page_size: int = PAGE_SIZE) -> AsyncIterator[Replica]:
        """Every loaded replica on a healthy node, by model."""
        return self._each("loaded_models", {}, Replica.model_validate, page_size)

    async def nodes_with_model_page(
        self, model: str, *, limit: int | None = None, after: str | None = None
    ) -> Page[NodeWithModel]:
        body = {"model": model}
        return await self._list_page(
            "nodes_with_model", body, NodeWithModel.model_validate, limit, after
        )

    def nodes_with_model(
        self, model: str, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[NodeWithModel]:
        """Healthy nodes with `model` loaded (each page least in flight first)."""
        body = {"model": model}
        return self._each("nodes_with_model", body, NodeWithModel.model_validate, page_size)

    async def lru(self, node_id: str) -> Replica:
        return Replica.model_validate(await self.call("lru", {"node_id": node_id}))

    async def lru_global(self) -> Replica:
        return Replica.model_validate(await self.call("lru_global", {}))

    async def loaded_count(self, model: str) -> int:
        return int((await self.call("loaded_count", {"model": model}))["count"])

    async def load_info_set(
        self, model: str, *, backend_type: str = "", model_opts: bytes | None = None
    ) -> None:
        body = _fields(model=model, backend_type=backend_type, model_opts=_b64(model_opts))
        await self.call("load_info_set", body)

    async def load_info_get(self, model: str) -> LoadInfo:
        return LoadInfo.model_validate(await self.call("load_info_get", {"model": model}))

    # ------------------------------------------------------------ labels

    async def label_set(self, node_id: str, key: str, value: str) -> None:
        await self.call("label_set", {"node_id": node_id, "key": key, "value": value})

    async def labels_set(self, node_id: str, labels: Labels) -> None:
        """Replace all of a node's labels."""
        await self.call("labels_set", {"node_id": node_id, "labels": dict(labels)})

    async def label_remove(self, node_id: str, key: str) -> None:
        await self.call("label_remove", {"node_id": node_id, "key": key})

    async def labels_get(self, node_id: str) -> dict[str, str]:
        return dict(await self.call("labels_get", {"node_id": node_id}))

    async def labels_all_page(
        self, *, limit: int | None = None, after: str | None = None
    ) -> Page[tuple[str, dict[str, str]]]:
        """One page of `labels_all`: (node id, labels) pairs, by node id."""
        reply, cursor = await self._page("labels_all", {}, limit, after)
        return Page([(node_id, dict(labels)) for node_id, labels in reply.items()], cursor)

    async def labels_all(
        self, *, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """Every labelled node's (id, labels), page after page."""
        after: str | None = None
        while True:
            page = await self.labels_all_page(limit=page_size, after=after)
            for item in page.items:
                yield item
            if page.next is None:
                return
            after = page.next

    # ------------------------------------------------------------ scheduling

    async def scheduling_set(
        self,
        model_name: str,
        *,
        node_selector: Labels | str | None = None,
        min_replicas: int = 0,
        max_replicas: int = 0,
        route_policy: str = "",
        balance_abs_threshold: int = 0,
        balance_rel_threshold: float = 0.0,
        min_prefix_match: float = 0.0,
    ) -> Scheduling:
        """Create or replace the scheduling config of a model."""
        selector = dict(node_selector) if isinstance(node_selector, Mapping) else node_selector
        body = _fields(
            model_name=model_name,
            node_selector=selector,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            route_policy=route_policy,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
            min_prefix_match=min_prefix_match,
        )
        return Scheduling.model_validate(await self.call("scheduling_set", body))

    async def scheduling_get(self, model: str) -> Scheduling:
        return Scheduling.model_validate(await self.call("scheduling_get", {"model": model}))

    async def scheduling_list_page(
        self, *, autoscaling: bool = False, limit: int | None = None, after: str | None = None
    ) -> Page[Scheduling]:
        body = {"autoscaling": autoscaling}
        return await self._list_page(
            "scheduling_list", body, Scheduling.model_validate, limit, after
        )

    def scheduling_list(
        self, *, autoscaling: bool = False, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[Scheduling]:
        """Every scheduling config by model (with `autoscaling`, those that scale)."""
        body = {"autoscaling": autoscaling}
        return self._each("scheduling_list", body, Scheduling.model_validate, page_size)

    async def scheduling_delete(self, model: str) -> None:
        await self.call("scheduling_delete", {"model": model})

    async def unsatisfiable_bump(self, model: str) -> int:
        """Count one more tick without room for `model`: the new count."""
        return int((await self.call("unsatisfiable_bump", {"model": model}))["ticks"])

    async def unsatisfiable_mark(self, model: str, until: datetime) -> None:
        """Mark `model` unsatisfiable until a time (timezone-aware)."""
        if until.tzinfo is None:
            raise ValueError("until must be timezone-aware")
        await self.call("unsatisfiable_mark", {"model": model, "until": until.isoformat()})

    async def unsatisfiable_clear(self, model: str | None = None) -> None:
        """Clear the cooldown of `model`, or of every model."""
        await self.call("unsatisfiable_clear", _fields(model=model))

    # ------------------------------------------------------------ backend intents

    async def backend_op(
        self,
        node_id: str,
        backend: str,
        op: Literal["install", "delete", "upgrade"],
        *,
        galleries: str = "",
    ) -> Intent:
        """Queue a backend install, upgrade or delete for a node (or refresh it)."""
        body = {"node_id": node_id, "backend": backend, "op": op, "galleries": galleries}
        return Intent.model_validate(await self.call("backend_op", body))

    async def backend_ops_page(
        self, *, dead: bool = False, limit: int | None = None, after: str | None = None
    ) -> Page[Intent]:
        body = {"dead": dead}
        return await self._list_page("backend_ops", body, Intent.model_validate, limit, after)

    def backend_ops(
        self, *, dead: bool = False, page_size: int = PAGE_SIZE
    ) -> AsyncIterator[Intent]:
        """Queued intents by backend, then age; with `dead`, abandoned ones too."""
        return self._each("backend_ops", {"dead": dead}, Intent.model_validate, page_size)

    async def backend_ops_count(self) -> dict[str, int]:
        """Queued intents per backend."""
        return {k: int(v) for k, v in (await self.call("backend_ops_count", {})).items()}

    async def backend_op_cancel(self, intent_id: int) -> None:
        await self.call("backend_op_cancel", {"id": intent_id})


def _b64(blob: bytes | None) -> str | None:
    return None if blob is None else base64.b64encode(blob).decode("ascii")
