"""Mesh construction and the logical-axis → mesh-axis rule table.

The lowest layer of dictlearn: it knows about devices and layouts, nothing about SAEs.
"""

from sharding.axes import (
    BATCH,
    D_MODEL,
    DATA,
    DEFAULT_RULES,
    FEATURES,
    FFN,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    MODEL,
    SEQUENCE,
    TOPK,
    VOCAB,
    abstract_array,
    logical_to_spec,
    mesh_axis,
    named_sharding,
    replicated,
)
from sharding.mesh import MeshConfig, MeshError, device_count, make_mesh, mesh_shape

__all__ = [
    "BATCH",
    "DATA",
    "DEFAULT_RULES",
    "D_MODEL",
    "FEATURES",
    "FFN",
    "HEADS",
    "HEAD_DIM",
    "KV_HEADS",
    "MODEL",
    "SEQUENCE",
    "TOPK",
    "VOCAB",
    "MeshConfig",
    "MeshError",
    "abstract_array",
    "device_count",
    "logical_to_spec",
    "make_mesh",
    "mesh_axis",
    "mesh_shape",
    "named_sharding",
    "replicated",
]
