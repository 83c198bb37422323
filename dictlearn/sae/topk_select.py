"""Exact top-k over a feature axis that is split across devices, without gathering it.

``lax.top_k`` on a feature-sharded ``[batch, n_features]`` array makes XLA all-gather the whole
matrix onto every device (NOTES.md): fatal at millions of features. Instead, inside ``shard_map``:

1. each shard takes its local top-k (values and local indices),
2. only those ``k`` candidates per token are all-gathered over the ``model`` axis,
3. a top-k over the ``k * n_shards`` candidates picks the global winners,
4. each shard keeps the winners that came from it.

Ties resolve exactly as a dense ``lax.top_k`` does (lowest global index first): candidates are
gathered shard-major and each shard's list is sorted with ties by ascending local index, so the
position order of equal values equals their global-index order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sharding import DATA, MODEL


class Selection(NamedTuple):
    """``k`` slots per token on one shard. Slots with ``mask == False`` belong to other shards."""

    values: jax.Array
    """``[batch, k]`` selected pre-activations (garbage where masked)."""
    indices: jax.Array
    """``[batch, k]`` int32 local feature indices (garbage where masked)."""
    mask: jax.Array
    """``[batch, k]`` bool: this shard owns the slot."""


def sharded_top_k(local: jax.Array, k: int, axis_name: str = MODEL) -> Selection:
    """Exact global top-k of a feature-sharded ``[batch, n_local]`` array (call in shard_map)."""
    n_local = local.shape[-1]
    if k > n_local:
        raise ValueError(
            f"k={k} exceeds the {n_local} features held by one shard; use a smaller mesh.model "
            f"or more features"
        )
    local_values, local_indices = jax.lax.top_k(local, k)
    gathered = jax.lax.all_gather(local_values, axis_name, axis=1, tiled=True)  # [B, k*shards]
    _, positions = jax.lax.top_k(gathered, k)
    owner = positions // k
    slot = positions % k
    mask = owner == jax.lax.axis_index(axis_name)
    values = jnp.take_along_axis(local_values, slot, axis=1)
    indices = jnp.take_along_axis(local_indices, slot, axis=1)
    return Selection(values, indices.astype(jnp.int32), mask)


def dense_top_k(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Single-device reference: values and global indices of the top-k per row."""
    return jax.lax.top_k(pre, k)


def batch_threshold(
    local: jax.Array, n_select: int, candidates_per_row: int, axes: tuple[str, ...] = (DATA, MODEL)
) -> jax.Array:
    """The ``n_select``-th largest value of an array split over ``axes`` (BatchTopK's cut-off).

    Fast path: every (token, shard) contributes its local top ``candidates_per_row`` values; the
    cut-off among all candidates is exact unless some token-shard had all its candidates above it
    (then more of its values might be too). That case is detected and falls back to a bisection
    on the float bit pattern over the full array, which is exact but makes 32 passes.

    Returns a replicated scalar.
    """
    m = min(candidates_per_row, local.shape[-1])
    cand, _ = jax.lax.top_k(local, m)  # [B_local, m]
    flat = cand.reshape(-1)
    for axis in axes:
        flat = jax.lax.all_gather(flat, axis, tiled=True)
    if n_select > flat.shape[0]:
        raise ValueError(f"cannot select {n_select} values from {flat.shape[0]} candidates")
    # A sort, not lax.top_k: with k = n_select (batch * k, ~1e5) XLA's TopK is far slower.
    threshold = jnp.sort(flat)[flat.shape[0] - n_select]
    # Every device computed the same value; pmax makes that explicit (replicated) to JAX.
    threshold = jax.lax.pmax(threshold, axes)
    # Exact iff no row-shard's smallest candidate is still >= the threshold.
    # min over the row == its last (smallest) candidate; slicing cand[:, -1] instead makes XLA
    # on CPU rewrite the whole top_k into a full sort of [batch, features] (30x slower).
    saturated = jnp.any(jnp.min(cand, axis=1) >= threshold)
    for axis in axes:
        saturated = jax.lax.psum(saturated.astype(jnp.int32), axis) > 0

    # A while_loop that runs zero times on the fast path: XLA on CPU evaluated both branches
    # of an equivalent lax.cond, paying the 33-pass bisection on every step.
    exact = _bisect_kth_largest(local, n_select, axes, enabled=saturated)
    return jnp.where(saturated, exact, threshold)


def _bisect_kth_largest(
    local: jax.Array, n: int, axes: tuple[str, ...], enabled: jax.Array
) -> jax.Array:
    """Exact n-th largest of a sharded float32 array by bisection on order-preserving ints.

    Does no work (zero loop iterations) when ``enabled`` is false.
    """
    bits = jax.lax.bitcast_convert_type(local.astype(jnp.float32), jnp.int32)
    # Map float order onto signed-int order: negative floats have their magnitude bits flipped.
    keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)

    def count_at_least(t: jax.Array) -> jax.Array:
        c = jnp.sum(keys >= t, dtype=jnp.int32)
        for axis in axes:
            c = jax.lax.psum(c, axis)
        return c

    def body(carry: tuple[jax.Array, jax.Array, jax.Array]):
        lo, hi, i = carry  # invariant: count(>= lo) >= n, count(>= hi) < n
        # Overflow-free floor((lo + hi) / 2) in int32.
        mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1)) >> 1)
        ok = count_at_least(mid) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid), i + 1

    lo = jnp.int32(jnp.iinfo(jnp.int32).min)
    hi = jnp.int32(jnp.iinfo(jnp.int32).max)
    lo, _, _ = jax.lax.while_loop(lambda c: enabled & (c[2] < 33), body, (lo, hi, jnp.int32(0)))
    key = jnp.where(lo < 0, lo ^ jnp.int32(0x7FFFFFFF), lo)
    return jax.lax.bitcast_convert_type(key, jnp.float32)
