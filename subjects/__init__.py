"""Every operation of the wire contract, one module per group of endpoints."""

from subjects import (
    cluster_models,
    explain,
    intents,
    labels,
    nodes,
    placement,
    replicas,
    routing,
    scheduling,
)
from subjects.base import Operation

OPERATIONS: list[Operation] = [
    *nodes.group.operations,
    *placement.group.operations,
    *explain.group.operations,
    *routing.group.operations,
    *replicas.group.operations,
    *cluster_models.group.operations,
    *labels.group.operations,
    *scheduling.group.operations,
    *intents.group.operations,
]
