"""Sparse encoder gradients and sparse decoding for TopK SAEs.

A TopK SAE uses only ``k`` of ``n_features`` latents per token, so apart from the encoder's
forward matmul (needed to find them) nothing should cost ``O(batch * n_features * d_model)``.
``topk_values_and_decode`` is one custom-VJP function for everything after the top-k:

* forward: ``values = relu(pre_selected)`` on the slots this shard owns, and the partial
  reconstruction ``x_hat = sum_j values[b, j] * W_dec[idx[b, j]]``, as ``k`` fused
  gather-multiply-adds (``gather_sum``: no ``[batch, k, d_model]`` buffer, ~10x faster on CPU
  than a gather followed by a batched dot);
* backward: the gradients of ``W_dec``, ``W_enc``, ``b_enc`` and ``b_dec`` from the
  ``batch * k`` (token, latent) pairs alone, never through a dense ``[batch, n_features]``
  cotangent or a second matmul.

The backward pass first sorts the active pairs by latent (one int32 sort of packed
``latent * batch + token`` keys, ~5 ms for 131k pairs on CPU), then walks them in cache-sized
chunks, and per chunk gathers the chunk's token rows, computes the value gradients
``g[b] . W_dec[f]`` and scatter-adds all three weight gradients. In latent order the weight
rows are read and written nearly sequentially instead of at random, which on CPU makes the
walk ~1.6x faster than the unsorted one, sort included. Inactive pairs (slots another shard
owns, or a value cut to 0 by the ReLU) have no gradient: they sort last and the walk stops
before them, so on a feature-sharded mesh each shard touches only its own pairs.

That walk (``walk_pairs_by_latent``) is what GPUs and TPUs run, in a few large chunks
(``ACCELERATOR_SORTED_CHUNK_ELEMENTS``) rather than cache-sized ones. On CPU the same sums run as a
native kernel, ``cpu_kernels.sparse_backward``, which accumulates each latent's gradient rows in
cache and writes them once instead of materialising every update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.sae import cpu_kernels
from dictlearn.sae.base import Params, as_varying
from dictlearn.sae.topk_select import Selection
from sharding.varying import vary_over, varying_axes

SORTED_CHUNK_ELEMENTS = 1 << 20
"""Largest ``[chunk, d_model]`` block of gathered rows in the backward walk, in elements.

Per chunk the walk builds a few such blocks (token rows, decoder rows, updates); at 4 MiB of
float32 each they stay in cache between being built and being scattered."""

GATHER_GROUP = 32
"""Rows summed per fused gather loop; larger ``k`` (AuxK) sums groups, bounding fusion size."""

_INT32_MAX = int(np.iinfo(np.int32).max)


def gather_sum(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
    """``[batch, d]``: ``sum_j weights[b, j] * table[indices[b, j]]``, no [b, k, d] buffer."""
    k = indices.shape[1]
    total = None
    for start in range(0, k, GATHER_GROUP):
        group = None
        for j in range(start, min(start + GATHER_GROUP, k)):
            # "clip" is XLA's native gather (indices are in range); "fill" would add a select.
            term = weights[:, j, None] * jnp.take(table, indices[:, j], axis=0, mode="clip")
            group = term if group is None else group + term
        total = group if total is None else total + group
    return total


ACCELERATOR_SORTED_CHUNK_ELEMENTS = 1 << 26
"""``SORTED_CHUNK_ELEMENTS`` when lowering for GPU or TPU, where there is no cache to fit and each
chunk is one step of a while loop (on GPU a host round trip per step). 256 MiB blocks: at
d_model 640 the 131,072 pairs of a 4,096-token batch with k 32 take 2 steps instead of 128."""


def sorted_chunk(n_pairs: int, d_model: int, chunk_elements: int | None = None) -> int:
    """Pairs per chunk of the backward walk: the largest divisor of ``n_pairs`` that fits.

    ``chunk_elements`` bounds one ``[chunk, d_model]`` block (default ``SORTED_CHUNK_ELEMENTS``).
    """
    if chunk_elements is None:
        chunk_elements = SORTED_CHUNK_ELEMENTS
    limit = max(1, chunk_elements // d_model)
    if n_pairs <= limit:
        return n_pairs
    return max(c for c in range(1, limit + 1) if n_pairs % c == 0)


class PairsByLatent(NamedTuple):
    """The ``batch * k`` (token, slot) pairs of one shard, active ones sorted by latent."""

    latents: jax.Array
    """``[n]`` int32 latent of each pair in sorted order; ``n_features`` for inactive pairs."""
    tokens: jax.Array
    """``[n]`` int32 token (row of the batch) of each pair, in range even when inactive."""
    to_sorted: Callable[[jax.Array], jax.Array]
    """Permutes a per-slot ``[batch, k]`` array into the ``[n]`` sorted pair order."""
    n_active: jax.Array
    """Number of active pairs (they come first)."""


def pairs_by_latent(indices: jax.Array, active: jax.Array, n_features: int) -> PairsByLatent:
    """Sort the active (token, slot) pairs by latent, ties by token; inactive pairs last."""
    batch, k = indices.shape
    n = batch * k
    n_active = jnp.sum(active, dtype=jnp.int32)
    if batch * (n_features + k) <= _INT32_MAX:
        # One int32 sort of unique packed keys (XLA's single-operand sort is ~5x faster than a
        # key-value sort): active pairs as latent * batch + token, inactive ones after all of
        # them as n_features * batch + (their flat slot position), so every key is distinct.
        tokens = jnp.arange(batch, dtype=jnp.int32)[:, None]
        slots = jnp.arange(n, dtype=jnp.int32).reshape(batch, k)
        keys = jnp.where(active, indices * batch + tokens, n_features * batch + slots).reshape(-1)
        sorted_keys = jnp.sort(keys)
        latents = jnp.minimum(sorted_keys // batch, n_features)
        rank = jnp.searchsorted(sorted_keys, keys, method="scan_unrolled").astype(jnp.int32)

        def to_sorted(per_slot: jax.Array) -> jax.Array:
            flat = per_slot.reshape(-1)
            return (
                jnp.zeros_like(flat)
                .at[rank]
                .set(flat, unique_indices=True, mode="promise_in_bounds")
            )

        return PairsByLatent(latents, sorted_keys % batch, to_sorted, n_active)
    # Too many (batch, latent) combinations to pack into int32: a key-value sort instead.
    latent_keys = jnp.where(active, indices, n_features).reshape(-1)
    latents, positions = jax.lax.sort(
        (latent_keys, jnp.arange(n, dtype=jnp.int32)), num_keys=1, is_stable=True
    )

    def gather_sorted(per_slot: jax.Array) -> jax.Array:
        return jnp.take(per_slot.reshape(-1), positions, mode="clip")

    return PairsByLatent(latents, positions // k, gather_sorted, n_active)


def _like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Give a cotangent the varying mesh axes of its primal."""
    return vary_over(cotangent, varying_axes(primal))


def _unify(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Cast arrays to vary over the union of their mesh axes, so cotangents type-check."""
    union = varying_axes(*arrays)
    return tuple(vary_over(a, union) for a in arrays)


def walk_pairs_by_latent(
    g_partial: jax.Array,
    centered: jax.Array,
    w_dec: jax.Array,
    values: jax.Array,
    g_values: jax.Array,
    indices: jax.Array,
    active: jax.Array,
    chunk_elements: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of ``W_dec`` ``[F, d]``, ``W_enc`` ``[d, F]`` and ``b_enc`` from the pairs.

    For every active slot ``(b, j)`` with latent ``f = indices[b, j]``:
    ``g_pre = g_values[b, j] + g_partial[b] . w_dec[f]``, and ``W_dec[f] += values[b, j] *
    g_partial[b]``, ``W_enc[:, f] += g_pre * centered[b]``, ``b_enc[f] += g_pre``. In XLA ops:
    sort the pairs by latent and walk them in chunks (see the module docstring) of at most
    ``chunk_elements`` per ``[chunk, d_model]`` block (``sorted_chunk``).
    """
    n_features, d_model = w_dec.shape
    pairs = pairs_by_latent(indices, active, n_features)
    values_sorted = pairs.to_sorted(values)
    g_values_sorted = pairs.to_sorted(g_values)
    chunk = sorted_chunk(pairs.latents.shape[0], d_model, chunk_elements)

    def walk(i, grads):
        grad_w_dec, grad_w_enc_t, grad_b_enc = grads
        start = i * chunk
        latents = jax.lax.dynamic_slice_in_dim(pairs.latents, start, chunk)
        tokens = jax.lax.dynamic_slice_in_dim(pairs.tokens, start, chunk)
        value = jax.lax.dynamic_slice_in_dim(values_sorted, start, chunk)
        g_value = jax.lax.dynamic_slice_in_dim(g_values_sorted, start, chunk)
        # Only the last chunk can reach past the active pairs: clamp their latent into range
        # and give them exactly zero updates (a select, so a NaN elsewhere cannot leak in).
        valid = latents < n_features
        rows = jnp.minimum(latents, n_features - 1)
        g_rows = jnp.take(g_partial, tokens, axis=0, mode="clip")
        # d loss / d pre_selected = d loss / d value, since the pair is past the ReLU.
        g_pre = g_value + jnp.sum(g_rows * jnp.take(w_dec, rows, axis=0, mode="clip"), axis=1)
        g_pre = jnp.where(valid, g_pre, 0.0)
        dec_updates = jnp.where(valid[:, None], value[:, None] * g_rows, 0.0)
        enc_updates = g_pre[:, None] * jnp.take(centered, tokens, axis=0, mode="clip")
        return (
            grad_w_dec.at[rows].add(dec_updates, mode="promise_in_bounds"),
            grad_w_enc_t.at[rows].add(enc_updates, mode="promise_in_bounds"),
            grad_b_enc.at[rows].add(g_pre, mode="promise_in_bounds"),
        )

    zeros = (
        _like(jnp.zeros((n_features, d_model), w_dec.dtype), g_partial),
        _like(jnp.zeros((n_features, d_model), centered.dtype), g_partial),
        _like(jnp.zeros((n_features,), centered.dtype), g_partial),
    )
    n_chunks = (pairs.n_active + chunk - 1) // chunk
    grad_w_dec, grad_w_enc_t, grad_b_enc = jax.lax.fori_loop(0, n_chunks, walk, zeros)
    return grad_w_dec, grad_w_enc_t.T, grad_b_enc


def _walk_sized_for_platform(*args: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``walk_pairs_by_latent`` with cache-sized chunks on CPU, large ones on GPU and TPU."""
    return jax.lax.platform_dependent(
        *args,
        cpu=walk_pairs_by_latent,
        default=functools.partial(
            walk_pairs_by_latent, chunk_elements=ACCELERATOR_SORTED_CHUNK_ELEMENTS
        ),
    )


def topk_values_and_decode(
    pre_selected: jax.Array,
    mask: jax.Array,
    x: jax.Array,
    b_dec: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    w_dec: jax.Array,
    indices: jax.Array,
    straight_through: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Latent values and this shard's partial reconstruction, with sparse gradients.

    Args:
        pre_selected: ``[batch, k]`` pre-activations at ``indices``, already computed densely;
            mathematically ``(x[b] - b_dec) @ W_enc[:, idx[b, j]] + b_enc[idx[b, j]]``, and
            differentiated as that (through the ``k`` chosen columns only).
        mask: ``[batch, k]`` bool, the slots this shard owns.
        x, b_dec, w_enc, b_enc, w_dec: the input and this shard's parameters.
        indices: ``[batch, k]`` int32 local latent of each slot.
        straight_through: differentiate the ReLU as the identity, so that a negative
            pre-activation gets the gradient it would have if it were positive (AuxK's variant
            for latents whose pre-activations are all below 0). The values are unchanged.

    Returns:
        ``values`` ``[batch, k]`` (``relu(pre_selected)``, 0 where not owned) and the partial
        reconstruction ``[batch, d_model]`` (without ``b_dec``; sum it over the shards).
    """
    return _topk_values_and_decode(
        straight_through, *_unify(pre_selected, mask, x, b_dec, w_enc, b_enc, w_dec, indices)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _topk_values_and_decode(
    straight_through, pre_selected, mask, x, b_dec, w_enc, b_enc, w_dec, indices
):
    del straight_through  # only the backward pass differs
    values = jnp.where(mask, jax.nn.relu(pre_selected), 0.0)
    return values, gather_sum(values, indices, w_dec)


def _topk_fwd(straight_through, pre_selected, mask, x, b_dec, w_enc, b_enc, w_dec, indices):
    values, partial = _topk_values_and_decode(
        straight_through, pre_selected, mask, x, b_dec, w_enc, b_enc, w_dec, indices
    )
    residuals = (pre_selected, mask, x, b_dec, w_enc, b_enc, w_dec, indices, values)
    return (values, partial), residuals


def _topk_bwd(straight_through, residuals, cotangents):
    pre_selected, mask, x, b_dec, w_enc, b_enc, w_dec, indices, values = residuals
    g_values, g_partial = cotangents
    # Pairs with a gradient: owned and past the ReLU (its derivative at 0 is 0, as in jax.nn);
    # straight through, every owned pair (a value of 0 still gives W_dec no gradient).
    active = mask if straight_through else mask & (pre_selected > 0)
    grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec = active_pair_grads(
        g_partial, g_values, x, b_dec, w_enc, w_dec, values, indices, active
    )
    # d x[b] = sum_j g_pre[b, j] W_enc[:, idx[b, j]]. x is data, not a parameter: in training
    # XLA drops this (and the [batch, k, d] gather) as dead code.
    g_pre_slots = g_values + jnp.einsum(
        "bd,bkd->bk", g_partial, jnp.take(w_dec, indices, axis=0, mode="clip")
    )
    grad_x = gather_sum(jnp.where(active, g_pre_slots, 0.0), indices, w_enc.T)
    return (
        jnp.zeros_like(pre_selected),
        None,
        _like(grad_x, x),
        _like(grad_b_dec, b_dec),
        _like(grad_w_enc, w_enc),
        _like(grad_b_enc, b_enc),
        _like(grad_w_dec, w_dec),
        None,
    )


_topk_values_and_decode.defvjp(_topk_fwd, _topk_bwd)


def active_pair_grads(
    g_partial: jax.Array,
    g_values: jax.Array,
    x: jax.Array,
    b_dec: jax.Array,
    w_enc: jax.Array,
    w_dec: jax.Array,
    values: jax.Array,
    indices: jax.Array,
    active: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients of ``b_dec``, ``W_enc``, ``b_enc`` and ``W_dec`` from the active slots.

    The backward pass of ``partial = sum_j values[b, j] * W_dec[idx[b, j]]`` where each active
    ``values[b, j]`` is the pre-activation ``(x[b] - b_dec) @ W_enc[:, idx] + b_enc[idx]`` itself
    (its derivative is 1: past a ReLU, or above a JumpReLU threshold), and inactive slots are
    constant 0. ``g_values`` is any further cotangent of ``values``. The weight gradients come
    from the native kernel on CPU and ``walk_pairs_by_latent`` elsewhere.
    """
    centered = x - b_dec
    grad_w_dec, grad_w_enc, grad_b_enc = cpu_kernels.on_cpu(
        cpu_kernels.sparse_backward,
        _walk_sized_for_platform,
        g_partial,
        centered,
        w_dec,
        values,
        g_values,
        indices,
        active,
    )
    # d b_dec = -sum over pairs of g_pre W_enc[:, f] = -W_enc @ grad_b_enc: a mat-vec.
    grad_b_dec = -(w_enc @ grad_b_enc)
    return grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec


def sparse_topk_forward(
    params: Params, x: jax.Array, selection: Selection, straight_through: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Values of the selected latents (with sparse gradients) and this shard's partial x_hat;
    ``straight_through`` differentiates the ReLU as the identity."""
    return topk_values_and_decode(
        jax.lax.stop_gradient(selection.values),
        selection.mask,
        as_varying(x),
        as_varying(params["b_dec"]),
        as_varying(params["W_enc"]),
        as_varying(params["b_enc"]),
        as_varying(params["W_dec"]),
        selection.indices,
        straight_through,
    )
