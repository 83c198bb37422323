"""Mesh-axis types inside ``shard_map``: which axes a value varies over, and casting to more.

Inside ``shard_map`` JAX types every value as replicated ("invariant") or per-device
("varying") over each mesh axis. Custom VJP rules and FFI calls have to state those types
themselves: a custom VJP's cotangents must carry their primals' types, and an FFI call's results
carry none at all.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax


def varying_axes(*arrays: jax.Array) -> frozenset[str]:
    """The mesh axes any of ``arrays`` varies over (empty outside ``shard_map``)."""
    return frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def vary_over(x: jax.Array, axes: Iterable[str]) -> jax.Array:
    """Mark ``x`` as per-device ("varying") over ``axes`` inside shard_map, where it is not yet.

    Custom VJP rules must return cotangents with the mesh-axis types of their primals, and a
    cotangent cast this way is summed by JAX over the axes its primal was replicated on.
    """
    have = varying_axes(x)
    missing = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x
