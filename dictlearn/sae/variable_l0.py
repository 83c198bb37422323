"""Sparse training for SAEs whose number of active latents varies per token.

JumpReLU, BatchTopK and ReLU SAEs activate a different number of latents on each token. Their
steps take TopK's shape (``dictlearn.sae.sparse``): the encoder matmul runs in token chunks and
each chunk keeps, per token, the ``bound`` latents ranked highest by ``pre + rank_bias``
(``select_slots``); decoding and the whole backward pass then touch only those slots.

The bound makes that exact only when no token has more candidates than slots. Every step checks
(one flag, agreed over the whole mesh) and, where some token on some shard overflows, runs that
step through the architecture's dense formulas instead (``sparse_or_dense``): slower, never
wrong. Both paths live inside one custom VJP with ``lax.cond`` in its forward and backward rules,
so the common sparse step keeps no dense residual and pays nothing for the fallback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from dictlearn.sae import cpu_kernels
from dictlearn.sae.base import EncoderDtype, Params, encoder_matmul, with_encoder_dtype
from dictlearn.sae.sparse import gather_sum
from dictlearn.sae.topk_select import top_k
from sharding import BATCH, FEATURES, mesh_axis
from sharding.varying import vary_over


class Slots(NamedTuple):
    """Up to ``bound`` candidate latents of each token on this shard."""

    pre: jax.Array
    """``[batch, bound]`` their pre-activations ``(x - b_dec) @ W_enc + b_enc``, computed as the
    dense matmul computes them (no gradient flows through these); ``-inf`` in unused slots."""
    indices: jax.Array
    """``[batch, bound]`` int32 local latent indices (0 in unused slots)."""
    count: jax.Array
    """``[batch]`` int32 number of candidates; above ``bound`` iff some did not fit."""


def map_token_chunks(fn: Callable[[jax.Array], Any], x: jax.Array, chunk_tokens: int) -> Any:
    """``fn`` over balanced row chunks of ``x`` (the last one padded), results re-joined.

    ``fn`` maps ``[chunk, d]`` to a pytree of arrays with a leading ``chunk`` axis. Chunks keep
    the ``[chunk, n_features]`` encoder output in cache for whatever reads it next.
    """
    rows, d_model = x.shape
    n_chunks = -(-rows // max(chunk_tokens, 1))
    if n_chunks <= 1:
        return fn(x)
    chunk = -(-rows // n_chunks)
    padded = jnp.pad(x, ((0, n_chunks * chunk - rows), (0, 0)))
    stacked = jax.lax.map(fn, padded.reshape(n_chunks, chunk, d_model))
    return jax.tree.map(lambda a: a.reshape(n_chunks * chunk, *a.shape[2:])[:rows], stacked)


def select_slots(
    params: Params,
    x: jax.Array,
    bound: int,
    rank_bias: jax.Array,
    chunk_tokens: int,
    encoder_dtype: EncoderDtype = "float32",
) -> Slots:
    """Per token, the local latents with ``(x - b_dec) @ W_enc + rank_bias > 0``, up to ``bound``.

    The ranking bias folds each architecture's test into one comparison: with ``rank_bias =
    b_enc - threshold + margin`` the candidates are the latents at most ``margin`` below their
    threshold. No gradient flows through the result. On CPU one native pass per row
    (``cpu_kernels.select_above``) collects them in index order; elsewhere a top-``bound`` by
    rank value keeps the best ones (the same set whenever no token overflows). The matmul's
    inputs are ``encoder_dtype`` (``BaseSAEConfig.encoder_dtype``).
    """
    params = with_encoder_dtype(jax.lax.stop_gradient(params), encoder_dtype)
    rank_bias = jax.lax.stop_gradient(rank_bias)
    b_enc = params["b_enc"]

    def select(x_chunk: jax.Array) -> Slots:
        unbiased = encoder_matmul(params, x_chunk)
        return Slots(
            *cpu_kernels.on_cpu(
                functools.partial(cpu_kernels.select_above, bound=bound),
                functools.partial(_select_above_xla, bound=bound),
                unbiased,
                b_enc,
                rank_bias,
            )
        )

    return map_token_chunks(select, x, chunk_tokens)


def _select_above_xla(
    unbiased: jax.Array, b_enc: jax.Array, rank_bias: jax.Array, bound: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``cpu_kernels.select_above`` in XLA ops (candidates in rank order, not index order)."""
    ranked, indices = top_k(unbiased, bound, rank_bias)
    candidate = ranked > 0
    # The dense path's pre-activation is matmul + b_enc, one rounding: recompute it from the
    # matmul output rather than from the ranked value.
    pre = jnp.take_along_axis(unbiased, indices, axis=1) + jnp.take(b_enc, indices)
    # Exact up to the bound; past it, bound + 1 says "overflowed" (min, not [:, -1]: see
    # topk_select.batch_threshold on XLA:CPU rewriting a sliced top-k into a full sort).
    count = jnp.sum(candidate, axis=1, dtype=jnp.int32) + (jnp.min(ranked, axis=1) > 0)
    return (
        jnp.where(candidate, pre, -jnp.inf),
        jnp.where(candidate, indices, 0).astype(jnp.int32),
        count.astype(jnp.int32),
    )


def decode_slots(values: jax.Array, indices: jax.Array, w_dec: jax.Array) -> jax.Array:
    """``[batch, d_model]``: ``sum_j values[b, j] * W_dec[indices[b, j]]``; on CPU the native
    kernel skips zero values, so the cost follows the active slots, not the bound."""
    (partial,) = cpu_kernels.on_cpu(
        cpu_kernels.sparse_decode, _gather_sum_tuple, values, indices, w_dec
    )
    return partial


def _gather_sum_tuple(values: jax.Array, indices: jax.Array, w_dec: jax.Array):
    return (gather_sum(values, indices, w_dec),)


def pair_dots(
    g_partial: jax.Array, w_dec: jax.Array, indices: jax.Array, mask: jax.Array
) -> jax.Array:
    """``[batch, k]``: ``g_partial[b] . W_dec[idx[b, j]]`` where ``mask``, else 0.

    The cotangent of a latent whether or not it is in the reconstruction: JumpReLU's threshold
    estimator needs it for the pairs within the kernel bandwidth of the threshold, which are few
    (the native kernel on CPU computes only those).
    """
    return cpu_kernels.on_cpu(
        cpu_kernels.pair_dots, _pair_dots_xla, g_partial, w_dec, indices, mask
    )[0]


def _pair_dots_xla(g_partial, w_dec, indices, mask):
    dots = jnp.einsum("bd,bkd->bk", g_partial, jnp.take(w_dec, indices, axis=0, mode="clip"))
    return (jnp.where(mask, dots, 0.0),)


def any_over_mesh(flag: jax.Array) -> jax.Array:
    """True on every device iff ``flag`` is true on any (inside ``shard_map``)."""
    return jax.lax.psum(jnp.asarray(flag, jnp.int32), (mesh_axis(BATCH), mesh_axis(FEATURES))) > 0


def per_device(tree: Any) -> Any:
    """Type every array in ``tree`` as varying over the whole mesh (both ``cond`` branches
    must return identically typed values)."""
    return jax.tree.map(lambda a: vary_over(a, (mesh_axis(BATCH), mesh_axis(FEATURES))), tree)


class SparsePath(Protocol):
    """An architecture's step written twice: densely (the reference) and over slots.

    Implementations are hashable, static objects (NamedTuples of config values). ``diff`` is a
    tuple of differentiable per-device arrays, ``aux`` one of slot arrays with no gradient.
    Both ``dense`` and ``sparse`` return the same tuple of float arrays, typed ``per_device``.

    ``dense_combine`` (optional) says that ``dense`` is token-separable, so that it may run in
    token chunks (``dense_in_chunks``): it reads only ``aux[0]``, the ``[batch, d_model]``
    input, and for each output how chunks combine: ``"tokens"`` (a per-token array, chunks
    concatenated) or ``"sum"`` (a sum over tokens).
    """

    def dense(self, diff: tuple, aux: tuple) -> tuple: ...

    def sparse(self, diff: tuple, aux: tuple) -> tuple: ...

    def sparse_grads(self, diff: tuple, aux: tuple, cotangents: tuple) -> tuple:
        """Cotangents of ``diff`` (typed like ``diff``) from the outputs' ``cotangents``."""
        ...


def sparse_or_dense(path: SparsePath, overflow: jax.Array, diff: tuple, aux: tuple) -> tuple:
    """``path.dense(diff, aux)`` if ``overflow`` else ``path.sparse(diff, aux)``, and gradients
    likewise: the dense branch's by autodiff of ``path.dense``, the sparse one's from
    ``path.sparse_grads``. ``overflow`` must be the same on every device (``any_over_mesh``):
    the dense branch may run collectives."""
    return _sparse_or_dense(path, overflow, diff, aux)


DENSE_CHUNK_TOKENS = 1024
"""Tokens per pass of a token-separable dense path (``dense_in_chunks``).

Unchunked, the dense formulas hold several ``[batch, n_local]`` float32 buffers at once, and
the dense branch is compiled into every step (a ``lax.cond``): a JumpReLU step at 65,536
latents and 4,096 tokens planned 5.2 GiB of temporaries on one device, and at 1M latents and
32,768 tokens it did not fit an H200 (docs/gpu.md)."""


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return next(d for d in range(min(n, max(limit, 1)), 0, -1) if n % d == 0)


def dense_in_chunks(path: SparsePath, diff: tuple, aux: tuple) -> tuple:
    """``path.dense(diff, aux)``, over chunks of at most ``DENSE_CHUNK_TOKENS`` tokens when the
    path is token-separable (``dense_combine``); each chunk is recomputed in the backward pass
    (``jax.checkpoint``), so neither pass holds more than a chunk's ``[chunk, n_local]``
    buffers. Equal to the unchunked result up to float rounding of the sums."""
    combine = getattr(path, "dense_combine", None)
    x = aux[0]
    rows = x.shape[0]
    chunk = _largest_divisor_at_most(rows, DENSE_CHUNK_TOKENS)
    # Chunks divide the batch exactly (padding rows would count in the sums). A batch with no
    # divisor near the chunk size (a large prime) runs unchunked rather than in tiny chunks.
    if combine is None or chunk == rows or chunk < min(rows, DENSE_CHUNK_TOKENS) // 4:
        return path.dense(diff, aux)
    chunk_dense = jax.checkpoint(lambda d, x_chunk: path.dense(d, (x_chunk,)))
    stacked = jax.lax.map(
        lambda x_chunk: chunk_dense(diff, x_chunk), x.reshape(-1, chunk, x.shape[1])
    )
    return tuple(
        out.reshape(-1, *out.shape[2:]) if how == "tokens" else jnp.sum(out, axis=0)
        for how, out in zip(combine, stacked, strict=True)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_or_dense(path, overflow, diff, aux):
    return jax.lax.cond(overflow, functools.partial(dense_in_chunks, path), path.sparse, diff, aux)


def _sparse_or_dense_fwd(path, overflow, diff, aux):
    # Residuals are the inputs only: the dense branch recomputes what it needs in the backward
    # pass, so the sparse steps never carry (or zero-fill) a dense residual.
    return _sparse_or_dense(path, overflow, diff, aux), (overflow, diff, aux)


def _sparse_or_dense_bwd(path, residuals, cotangents):
    overflow, diff, aux = residuals

    def dense_grads(diff, aux, cotangents):
        _, vjp = jax.vjp(lambda d: dense_in_chunks(path, d, aux), diff)
        return vjp(cotangents)[0]

    grads = jax.lax.cond(overflow, dense_grads, path.sparse_grads, diff, aux, cotangents)
    return None, grads, None


_sparse_or_dense.defvjp(_sparse_or_dense_fwd, _sparse_or_dense_bwd)


class RowPlan(NamedTuple):
    """Which tokens a sparse step decodes from dense rows of their own (``plan_rows``)."""

    rows: jax.Array
    """``[rows_max]`` int32 the first saturated tokens; unused entries repeat token 0."""
    valid: jax.Array
    """``[rows_max]`` bool: the entry is a saturated token."""
    with_rows: jax.Array
    """Some shard has saturated tokens and none has more than ``rows_max`` (mesh-wide)."""
    overflow: jax.Array
    """Some shard has more than ``rows_max``: the step runs densely (mesh-wide)."""
    n_saturated: jax.Array
    """int32 saturated tokens on this shard."""


def plan_rows(saturated: jax.Array, rows_max: int) -> RowPlan:
    """The rows for the ``[batch]`` tokens where ``saturated`` holds (their slots cannot hold
    them), up to ``rows_max`` per shard; past that, on any shard, the step runs densely."""
    n_saturated = jnp.sum(saturated, dtype=jnp.int32)
    overflow = any_over_mesh(n_saturated > rows_max)
    (rows,) = jnp.nonzero(saturated, size=rows_max, fill_value=0)
    return RowPlan(
        rows=rows.astype(jnp.int32),
        valid=jnp.arange(rows_max) < n_saturated,
        with_rows=any_over_mesh(n_saturated > 0) & ~overflow,
        overflow=overflow,
        n_saturated=n_saturated,
    )


def sparse_rows_or_dense(path: SparsePath, plan: RowPlan, diff: tuple, aux: tuple) -> tuple:
    """``sparse_or_dense`` for a path with a static ``rows`` field: with the rows where
    ``plan.with_rows``, without them otherwise (one ``lax.cond`` branch runs, so steps without
    saturated tokens pay nothing for the rows), densely where ``plan.overflow``."""

    def run(rows: bool):
        return lambda d, a: sparse_or_dense(path._replace(rows=rows), plan.overflow, d, a)

    return jax.lax.cond(plan.with_rows, run(True), run(False), diff, aux)


def scatter_per_latent(values: jax.Array, indices: jax.Array, n_features: int) -> jax.Array:
    """``[n_features]``: ``values[b, j]`` summed into latent ``indices[b, j]``."""
    return (
        jnp.zeros((n_features,), values.dtype)
        .at[indices.reshape(-1)]
        .add(values.reshape(-1), mode="promise_in_bounds")
    )
