"""Reply models: what the daemon sends back, as typed objects.

Field names are the contract's (Go's JSON tags). Unknown fields are ignored, so
a newer daemon that adds fields does not break an older client, and fields a
newer contract added default to their zero value when an older daemon leaves
them out.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, field_validator

NodeStatus = Literal["registering", "pending", "healthy", "unhealthy", "draining", "offline"]
NodeType = Literal["backend", "agent"]
ReplicaState = Literal["loading", "loaded", "unloading", "idle"]
IntentOp = Literal["install", "delete", "upgrade"]


class Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AuthRefs(Reply):
    """The user and API key LocalAI provisioned for a node (register and deregister replies)."""

    auth_user_id: str = ""
    api_key_id: str = ""


class Node(Reply):
    id: str
    name: str
    node_type: str = "backend"
    address: str = ""
    http_address: str = ""
    status: str
    total_vram: int = 0
    available_vram: int = 0
    reserved_vram: int = 0
    total_ram: int = 0
    available_ram: int = 0
    gpu_vendor: str = ""
    max_replicas_per_model: int = 1
    max_replicas_per_model_manually_set: bool = False
    last_heartbeat: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Only in the reply to a re-registration of a node that has them (v1.1).
    auth_refs: AuthRefs | None = None


class NodeWithExtras(Node):
    """A node with its loaded replica count, requests in flight and labels."""

    model_count: int = 0
    in_flight_count: int = 0
    labels: dict[str, str] = {}


class ReplicaName(Reply):
    """A replica as its own node's `self` reply names it."""

    model_name: str
    replica_index: int = 0
    state: str


class OwnNode(NodeWithExtras):
    """A worker's own node (`self.<node_id>`) with its replicas in every state;
    None from a daemon older than that field."""

    replicas: tuple[ReplicaName, ...] | None = None


class NodeWithModel(Node):
    """An item of `nodes_with_model`: the in-flight count of its least busy replica."""

    model_in_flight: int = 0


class Replica(Reply):
    id: str
    node_id: str
    model_name: str
    replica_index: int = 0
    address: str = ""
    state: str
    in_flight: int = 0
    last_used: datetime | None = None
    loading_by: str = ""
    backend_type: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Set when findlock took a lease.
    lease_id: str | None = None


class Pick(Reply):
    """findlock's reply: the replica picked (and counted in flight) and its node."""

    node: Node
    replica: Replica

    @property
    def lease_id(self) -> str | None:
        return self.replica.lease_id


class ReplicaStat(Reply):
    node_id: str
    replica_index: int = 0
    in_flight: int = 0


class Scheduling(Reply):
    id: str
    model_name: str
    node_selector: str = ""
    min_replicas: int = 0
    max_replicas: int = 0
    route_policy: str = ""
    balance_abs_threshold: int = 0
    balance_rel_threshold: float = 0.0
    min_prefix_match: float = 0.0
    unsatisfiable_until: datetime | None = None
    unsatisfiable_ticks: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def selector(self) -> dict[str, str]:
        """`node_selector` (JSON text on the wire, as in Go) as an object."""
        if not self.node_selector:
            return {}
        parsed = orjson.loads(self.node_selector)
        return {str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}


class Intent(Reply):
    """A backend intent (Go PendingBackendOp)."""

    id: int
    node_id: str
    backend: str
    op: str
    attempts: int = 0
    last_error: str = ""
    created_at: datetime | None = None
    next_retry_at: datetime | None = None
    dead: bool = False


class LoadInfo(Reply):
    """How a model was loaded; `model_opts` decoded from base64."""

    backend_type: str = ""
    model_opts: bytes | None = None

    @field_validator("model_opts", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        if isinstance(value, str):
            return base64.b64decode(value)
        return value


class Lease(Reply):
    """lease_renew's reply."""

    expires_at: datetime


class ExplainReason(Reply):
    code: str
    message: str = ""


class ExplainNode(Reply):
    node_id: str
    name: str
    status: str
    placeable: bool
    reasons: list[ExplainReason] = []


class Explanation(Reply):
    """explain's reply: why each node can or cannot take a replica of a model."""

    model: str
    placeable: int = 0
    routable: int = 0
    summary: str = ""
    nodes: list[ExplainNode] = []
    unsatisfiable_until: datetime | None = None
    unsatisfiable_ticks: int = 0


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its items, and the cursor of the next page (None: the last)."""

    items: list[T]
    next: str | None = None
