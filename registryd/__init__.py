"""registryd's Python client: `Registry`, its reply models and errors, and the
worker `Agent`.

    from registryd import Registry

    registry = await Registry.connect()          # the daemon's REGISTRY_* settings
    async for node in registry.nodes(extras=True):
        print(node.name, node.status, node.labels)
"""

from registryd.agent import Agent
from registryd.client import Registry
from registryd.errors import (
    BadRequest,
    Conflict,
    Internal,
    NoResponders,
    NotFound,
    RegistryError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from registryd.models import (
    AuthRefs,
    ExplainNode,
    ExplainReason,
    Explanation,
    Intent,
    LoadInfo,
    Node,
    NodeWithExtras,
    NodeWithModel,
    OwnNode,
    Page,
    Pick,
    Replica,
    ReplicaName,
    ReplicaStat,
    Scheduling,
)

__all__ = [
    "Agent",
    "AuthRefs",
    "BadRequest",
    "Conflict",
    "ExplainNode",
    "ExplainReason",
    "Explanation",
    "Intent",
    "Internal",
    "LoadInfo",
    "NoResponders",
    "Node",
    "NodeWithExtras",
    "NodeWithModel",
    "NotFound",
    "OwnNode",
    "Page",
    "Pick",
    "Registry",
    "RegistryError",
    "Replica",
    "ReplicaName",
    "ReplicaStat",
    "Scheduling",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]
