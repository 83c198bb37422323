"""Exact top-k over a feature axis that is split across devices, without gathering it.

``lax.top_k`` on a feature-sharded ``[batch, n_features]`` array makes XLA all-gather the whole
matrix onto every device (seen in its compiled HLO): fatal at millions of features. Instead, inside ``shard_map``:

1. each shard takes its local top-k (values and local indices),
2. only those ``k`` candidates per token are all-gathered over the ``model`` axis,
3. a top-k over the ``k * n_shards`` candidates picks the global winners,
4. each shard keeps the winners that came from it.

Ties resolve exactly as a dense ``lax.top_k`` does (lowest global index first): candidates are
gathered shard-major and each shard's list is sorted with ties by ascending local index, so the
position order of equal values equals their global-index order.

Step 2 moves ``k * n_shards`` values per token, which grows with the mesh: AuxK's 256 candidates
on 256 shards are 1 GiB per device at 4,096 tokens. Past ``GATHERED_CANDIDATES_MAX`` the merge
(``select_shard_winners``) instead searches for each token's k-th largest candidate value with a
few ``psum``s of per-token counts (``threshold_merge``): nothing it exchanges scales with ``k``.

The local top-k itself (``top_k``) is exact too. On CPU it is a native kernel
(``dictlearn.sae.cpu_kernels``). Elsewhere, for small ``k``, it is ``blockwise_top_k``: XLA's TopK
over a whole ``[batch, n_features]`` row costs about a fifth of the encoder matmul on CPU, and
the bias add in front of it another tenth (it cannot fuse into the TopK call). Block maxima
instead are one vectorised pass that fuses the bias add, and the two remaining top-ks see
``1/BLOCK`` and ``k * BLOCK`` columns.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dictlearn.errors import UserError
from dictlearn.sae import cpu_kernels
from sharding import BATCH, FEATURES, mesh_axis


class Selection(NamedTuple):
    """Slots per token on one shard; those with ``mask == False`` are not this shard's winners."""

    values: jax.Array
    """``[batch, slots]`` selected pre-activations (garbage where masked)."""
    indices: jax.Array
    """``[batch, slots]`` int32 local feature indices (garbage where masked)."""
    mask: jax.Array
    """``[batch, slots]`` bool: the slot is one of this shard's winners."""


BLOCK = 8
"""Columns per block in ``blockwise_top_k``. 8 keeps the block-max pass one fused loop (at 16 XLA stops
fusing the producer into the 16 strided reads and materialises it)."""

MAX_BLOCK_K = 64
"""Largest ``k`` for which ``blockwise_top_k`` goes blockwise on CPU. XLA's TopK slows with ``k`` and the blockwise
path runs two of them: at [4096, 16384] it was ~1.5x faster at k 32, even at 128, slower at 256."""

ACCELERATOR_MAX_BLOCK_K = 1024
"""The same bound on GPU and TPU, where every XLA top-k over a long row is a sort: there the
blockwise path's two short sorts beat one long one at any ``k`` whose blocks fit (``n / block
>= 2 k``). It carries the variable-L0 slot selection (``k`` = ``sparse_l0_bound``, 256) and
AuxK (``k_aux``, 256), which fell back to a full-row sort before: on an H200 that selection took
40 of a JumpReLU step's 51 ms at 65,536 latents and 8,192 tokens (docs/gpu.md)."""


def _flip(bits: jax.Array) -> jax.Array:
    # Negative floats get their magnitude bits flipped; the map is its own inverse.
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 with the order of XLA's TopK comparator (a total order: -0 < +0)."""
    return _flip(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32))


def _from_order_key(key: jax.Array) -> jax.Array:
    """Inverse of ``_order_key``."""
    return jax.lax.bitcast_convert_type(_flip(key), jnp.float32)


def top_k(x: jax.Array, k: int, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k(x + bias, k)`` for 2-D ``x`` (same values, indices and tie order).

    On CPU this is the native kernel (``dictlearn.sae.cpu_kernels``), which adds the bias as it
    reads ``x``; elsewhere, or without it, ``blockwise_top_k``, where XLA fuses the add.
    """
    if x.dtype != jnp.float32:
        return _xla_top_k(x if bias is None else x + bias, k)
    if bias is None:
        return cpu_kernels.on_cpu(lambda x: cpu_kernels.top_k(x, k), lambda x: _xla_top_k(x, k), x)
    return cpu_kernels.on_cpu(
        lambda x, b: cpu_kernels.top_k(x, k, b), lambda x, b: _xla_top_k(x + b, k), x, bias
    )


def accelerator_block(n: int, k: int) -> int:
    """``blockwise_top_k``'s block width on GPU and TPU: the power of two nearest sqrt(n / k).

    That balances its two top-ks (``n / block`` block maxima, ``k * block`` candidates), which
    on GPU are sorts. On an H100, k 32, 1,024 rows: 64 columns at n = 65,536 (0.42 ms; 8: 1.0,
    XLA's TopK: 5.1) and 128-256 at n = 1,048,576 (2.5-2.7 ms; 8: 11.3, TopK: 72).
    """
    return max(BLOCK, 1 << round(math.log2(math.sqrt(max(n / k, 1.0)))))


def _xla_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``blockwise_top_k`` with the block width and ``k`` bound for the platform it is
    lowered for."""
    wide = accelerator_block(x.shape[-1], k)
    return jax.lax.platform_dependent(
        x,
        cpu=lambda x: blockwise_top_k(x, k),
        default=lambda x: blockwise_top_k(x, k, wide, ACCELERATOR_MAX_BLOCK_K),
    )


def blockwise_top_k(
    x: jax.Array, k: int, block: int = BLOCK, max_k: int = MAX_BLOCK_K
) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k(x, k)`` for 2-D ``x``, in XLA ops, faster than it for small ``k``.

    Split each row into contiguous blocks of ``block`` columns. The k-th largest block maximum
    ``t`` is at most the k-th largest value, so every winner lies in a block whose maximum is at
    least ``t``. Blocks tied at ``t`` but not picked hold no winner either: picked blocks tied at
    ``t`` come first in index order and each holds a ``t``, enough for every slot ``t`` can fill.
    So the winners are the top-k of the ``k`` picked blocks' columns, taken in index order.
    Block maxima use the TopK comparator's total order, so signed zeros and NaNs agree too.
    Above ``max_k``, or where the blocks do not fit, this is ``lax.top_k`` itself.
    """
    rows, n = x.shape
    if n % block or n // block < 2 * k or k > max_k:
        values, indices = jax.lax.top_k(x, k)
        return values, indices  # a tuple, like the other branch (lax.top_k returns a list)
    keys = _order_key(x)
    if block == BLOCK:
        # Strided slices, not a reshape + reduce: XLA:CPU fuses them (and x's producer, e.g. the
        # bias add) into one vectorised pass; a minor-axis reduce of 8 is several times slower.
        block_keys = functools.reduce(jnp.maximum, [keys[:, j::block] for j in range(block)])
    else:
        block_keys = jnp.max(keys.reshape(rows, n // block, block), axis=2)
    _, blocks = jax.lax.top_k(_from_order_key(block_keys), k)
    blocks = jnp.sort(blocks, axis=1)  # candidates in column order: ties keep lax.top_k's order
    cols = (blocks[:, :, None] * block + jnp.arange(block, dtype=blocks.dtype)).reshape(rows, -1)
    candidates = jnp.take_along_axis(x, cols, axis=1, mode="promise_in_bounds")
    values, positions = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(cols, positions, axis=1, mode="promise_in_bounds")


def sharded_top_k(
    local: jax.Array, k: int, axis_name: str = mesh_axis(FEATURES), bias: jax.Array | None = None
) -> Selection:
    """Exact global top-k of a feature-sharded ``[batch, n_local]`` array (call in shard_map).

    With ``bias`` (``[n_local]``), of ``local + bias``, without materialising that sum.
    """
    check_k_fits_shard(k, local.shape[-1])
    local_values, local_indices = top_k(local, k, bias)
    return merge_shard_candidates(local_values, local_indices, axis_name)


def check_k_fits_shard(k: int, n_local: int) -> None:
    """Raise a clear error when one shard holds fewer than ``k`` features."""
    if k > n_local:
        raise UserError(
            f"k={k} exceeds the {n_local} features held by one shard; use a smaller mesh.model "
            f"or more features"
        )


GATHERED_CANDIDATES_MAX = 1024
"""Largest ``candidates per shard x shards`` per token that ``select_shard_winners`` all-gathers.

Above it the merge is a threshold search whose exchange does not grow with the candidates:
AuxK's 256 candidates on a 256-way model axis would otherwise gather 64k values per token
(1 GiB per device at 4,096 tokens). Below it one gather and one top-k are cheaper than the
search's ``32 / RADIX_BITS`` rounds of collectives."""

RADIX_BITS = 4
"""Bits of the threshold decided per round of ``threshold_merge``: 8 rounds of a ``psum`` of
``[batch, 15]`` counts (1 bit: 32 rounds of ``[batch, 1]``; more bits: fewer, larger rounds,
``2**RADIX_BITS - 1`` comparisons per candidate each)."""


def merge_shard_candidates(
    local_values: jax.Array,
    local_indices: jax.Array,
    axis_name: str = mesh_axis(FEATURES),
    k: int | None = None,
) -> Selection:
    """The global top ``k`` among every shard's local top candidates, by one all-gather.

    Args:
        local_values: ``[batch, m]`` this shard's top ``m`` values per token, in ``lax.top_k``
            order (descending, ties by ascending local index).
        local_indices: ``[batch, m]`` their local feature indices.
        axis_name: the mesh axis the features are split over.
        k: winners per token over all shards (default ``m``). Exact as long as no shard holds
            more than ``m`` of them, e.g. ``m = min(k, n_local)``; ``k`` may exceed ``m``.

    Returns:
        ``[batch, k]`` slots in rank order on every shard: slot ``j`` is the ``j``-th winner
        (the dense ``lax.top_k``'s, ties to the lowest global index) and exactly one shard, its
        owner, has it in ``mask``. The ``[batch, m x shards]`` values cross devices; where the
        rank order is not needed, ``select_shard_winners`` scales to large ``m x shards``.
    """
    m = local_values.shape[-1]
    k = _check_winners(m, k, axis_name)
    if jax.lax.axis_size(axis_name) == 1:  # nothing to merge: the local top-k is the global one
        return Selection(
            local_values[:, :k], local_indices[:, :k], jnp.ones((len(local_values), k), bool)
        )
    gathered = jax.lax.all_gather(local_values, axis_name, axis=1, tiled=True)  # [B, m*shards]
    _, positions = jax.lax.top_k(gathered, k)
    owner = positions // m
    slot = positions % m
    mask = owner == jax.lax.axis_index(axis_name)
    values = jnp.take_along_axis(local_values, slot, axis=1)
    indices = jnp.take_along_axis(local_indices, slot, axis=1)
    return Selection(values, indices.astype(jnp.int32), mask)


def select_shard_winners(
    local_values: jax.Array, local_indices: jax.Array, k: int, axis_name: str = mesh_axis(FEATURES)
) -> Selection:
    """The same winners as ``merge_shard_candidates``, with memory that does not grow with shards.

    Small exchanges (``m x shards <= GATHERED_CANDIDATES_MAX``) are ``merge_shard_candidates``;
    larger ones ``threshold_merge``, whose slots are this shard's ``m`` candidates (not in rank
    order) and which moves ``O(batch x shards)`` integers. Either way, summed over shards,
    ``mask`` marks exactly the ``k`` dense winners per token.
    """
    m = local_values.shape[-1]
    k = _check_winners(m, k, axis_name)
    if m * jax.lax.axis_size(axis_name) <= GATHERED_CANDIDATES_MAX:
        return merge_shard_candidates(local_values, local_indices, axis_name, k)
    return threshold_merge(local_values, local_indices, k, axis_name)


def _check_winners(m: int, k: int | None, axis_name: str) -> int:
    k = m if k is None else k
    shards = jax.lax.axis_size(axis_name)
    if not 0 < k <= m * shards:
        raise ValueError(f"cannot select {k} winners from {shards} shards of {m} candidates")
    return k


def threshold_merge(
    local_values: jax.Array, local_indices: jax.Array, k: int, axis_name: str = mesh_axis(FEATURES)
) -> Selection:
    """``select_shard_winners`` by a search for each token's k-th largest value (in shard_map).

    No candidate leaves its shard. Values map to unsigned integers with ``lax.top_k``'s order;
    the k-th largest of them, ``t``, is found ``RADIX_BITS`` bits at a time, high to low: each
    round counts, per token, the candidates at or above ``2**RADIX_BITS - 1`` trial thresholds
    and sums the counts over shards (a ``psum`` of ``[batch, 2**RADIX_BITS - 1]`` int32), then
    keeps the highest trial still reaching ``k``. Every value above ``t`` wins; of the values
    equal to ``t``, the ones with the lowest global indices fill the remaining slots (shards
    in axis order, then the candidates' own order), which needs each shard's tie count: one
    all-gather of ``[shards, batch]`` int32. Slots stay this shard's ``m`` candidates.
    """
    rows = local_values.shape[0]
    keys = _order_key(local_values)
    # Flipping the sign bit maps int32 order onto uint32 order, where bits can be set high to low.
    ukeys = jax.lax.bitcast_convert_type(keys ^ jnp.int32(-(2**31)), jnp.uint32)
    trials = jnp.arange(1, 2**RADIX_BITS, dtype=jnp.uint32)  # digit 0 needs no test
    threshold = jnp.zeros((rows,), jnp.uint32)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        # Invariant: at least k candidates are >= threshold (true for 0, the smallest key).
        tried = threshold[:, None] | (trials << shift)  # [B, digits], increasing
        counts = jnp.sum(ukeys[:, :, None] >= tried[:, None, :], axis=1, dtype=jnp.int32)
        counts = jax.lax.psum(counts, axis_name)
        # Counts fall as the trial rises: the digit is the number of trials still reaching k.
        digit = jnp.sum(counts >= k, axis=1, dtype=jnp.uint32)
        threshold = threshold | (digit << shift)
    above = ukeys > threshold[:, None]
    tied = ukeys == threshold[:, None]
    open_slots = k - jax.lax.psum(jnp.sum(above, axis=1, dtype=jnp.int32), axis_name)
    ties = jax.lax.all_gather(jnp.sum(tied, axis=1, dtype=jnp.int32), axis_name)  # [shards, B]
    me = jax.lax.axis_index(axis_name)
    ties_before = jnp.sum(jnp.where(jnp.arange(ties.shape[0])[:, None] < me, ties, 0), axis=0)
    tie_rank = jnp.cumsum(tied, axis=1, dtype=jnp.int32) - 1
    mask = above | (tied & (tie_rank < (open_slots - ties_before)[:, None]))
    return Selection(local_values, local_indices.astype(jnp.int32), mask)


def dense_top_k(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Single-device reference: values and global indices of the top-k per row."""
    return jax.lax.top_k(pre, k)


def batch_threshold(
    local: jax.Array,
    n_select: int,
    candidates_per_row: int,
    axes: tuple[str, ...] = (mesh_axis(BATCH), mesh_axis(FEATURES)),
) -> jax.Array:
    """The ``n_select``-th largest value of an array split over ``axes`` (BatchTopK's cut-off).

    Fast path: every (token, shard) contributes its local top ``candidates_per_row`` values; the
    cut-off among all candidates is exact unless some token-shard had all its candidates above it
    (then more of its values might be too). That case is detected and falls back to a bisection
    on the float bit pattern over the full array, which is exact but makes 32 passes.

    Returns a replicated scalar.
    """
    m = min(candidates_per_row, local.shape[-1])
    cand, _ = top_k(local, m)  # [B_local, m]
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
    exact = bisect_kth_largest(local, n_select, axes, enabled=saturated)
    return jnp.where(saturated, exact, threshold)


def bisect_kth_largest(
    local: jax.Array, n: int, axes: tuple[str, ...], enabled: jax.Array
) -> jax.Array:
    """Exact n-th largest of a sharded float32 array by bisection on order-preserving ints.

    Does no work (zero loop iterations) when ``enabled`` is false.
    """
    keys = _order_key(local)

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
    return _from_order_key(lo)
