"""Logical axis names and the one rule table that maps them onto mesh axes.

Every array in dictlearn is annotated with *logical* axes (``batch``, ``d_model``, ``features``,
...). Only this module turns those names into ``PartitionSpec``s, so changing how a model is laid
out on a cluster is a change to a rule table, never to model code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axes.
DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

# Logical axes.
BATCH = "batch"
"""Tokens / examples in a batch; split across data-parallel replicas."""
D_MODEL = "d_model"
"""The language model's residual width (the SAE's input width); never split."""
FEATURES = "features"
"""SAE latents (``d_sae``); split across the model axis so millions of features fit."""
TOPK = "topk"
"""The k selected latents of a token; local to a shard."""
HEADS = "heads"
"""Attention query heads of the language model."""
KV_HEADS = "kv_heads"
"""Attention key/value heads (Gemma 3 270M has one, so it is replicated by default)."""
HEAD_DIM = "head_dim"
FFN = "ffn"
"""The language model's MLP hidden width."""
VOCAB = "vocab"
SEQUENCE = "sequence"

LogicalAxes = Sequence[str | None]
Rules = Mapping[str, str | tuple[str, ...] | None]

DEFAULT_RULES: Rules = {
    BATCH: DATA,
    D_MODEL: None,
    FEATURES: MODEL,
    TOPK: None,
    HEADS: MODEL,
    KV_HEADS: None,
    HEAD_DIM: None,
    FFN: MODEL,
    VOCAB: MODEL,
    SEQUENCE: None,
}
"""Feature-sharded SAE, data-parallel batches, Megatron-style LM (heads and FFN on ``model``)."""


def logical_to_spec(axes: LogicalAxes, rules: Rules | None = None) -> PartitionSpec:
    """Translate logical axis names (``None`` = replicated dimension) into a ``PartitionSpec``."""
    table = DEFAULT_RULES if rules is None else rules
    mesh_axes = []
    for name in axes:
        if name is None:
            mesh_axes.append(None)
            continue
        if name not in table:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; known axes: {sorted(table)}"
            )
        mesh_axes.append(table[name])
    return PartitionSpec(*mesh_axes)


def mesh_axis(logical: str, rules: Rules | None = None) -> str | tuple[str, ...]:
    """The mesh axis (or axes) a logical axis is split over: what a collective in ``shard_map``
    names, e.g. ``psum(partial, mesh_axis(FEATURES))`` finishes a sum over the features.

    Raises:
        KeyError: the axis has no rule, or its rule replicates it (no collective spans it).
    """
    axis = logical_to_spec((logical,), rules)[0]
    if axis is None:
        raise KeyError(f"logical axis {logical!r} is not split over the mesh: nothing to reduce")
    return axis


def named_sharding(mesh: Mesh, axes: LogicalAxes, rules: Rules | None = None) -> NamedSharding:
    """A ``NamedSharding`` on ``mesh`` for an array whose dimensions carry ``axes``."""
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, step counters, configs)."""
    return NamedSharding(mesh, PartitionSpec())


def abstract_array(
    shape: Sequence[int], dtype: jax.typing.DTypeLike, sharding: NamedSharding
) -> jax.ShapeDtypeStruct:
    """A shape/dtype/sharding placeholder: for compiling without data and restoring checkpoints."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
