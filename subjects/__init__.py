"""Every operation of the wire contract, one module per group of endpoints."""

from subjects import labels, nodes, replicas
from subjects.base import Operation

OPERATIONS: list[Operation] = [
    *nodes.group.operations,
    *labels.group.operations,
    *replicas.group.operations,
]
