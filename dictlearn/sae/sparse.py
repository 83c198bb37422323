"""Sparse encoder gradients and sparse decoding for TopK SAEs.

A TopK SAE uses only ``k`` of ``n_features`` latents per token, so apart from the encoder's
forward matmul (needed to find them) nothing should cost ``O(batch * n_features * d_model)``:

* ``decode_sparse``: ``x_hat = sum_j v[b, j] * W_dec[idx[b, j]]`` is a gather of ``k`` rows per
  token; its autodiff is a scatter-add into ``k`` rows (the gradient of ``W_dec``) and a gather
  (the gradient of the values).
* ``selected_preactivations``: the values of the chosen pre-activations are read out of the dense
  forward pass, but their gradient flows back only into the ``k`` chosen encoder columns
  (scatter-add), not through a dense ``[batch, n_features]`` cotangent and a second matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_sparse(values: jax.Array, indices: jax.Array, w_dec: jax.Array) -> jax.Array:
    """``[batch, d_model]`` partial reconstruction from ``k`` (value, row) pairs per token."""
    rows = jnp.take(w_dec, indices, axis=0)  # [B, k, d]
    return jnp.einsum("bk,bkd->bd", values, rows)


@jax.custom_vjp
def selected_preactivations(
    pre_selected: jax.Array,
    x: jax.Array,
    b_dec: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    indices: jax.Array,
) -> jax.Array:
    """Return ``pre_selected`` (already computed densely) with a sparse gradient attached.

    Mathematically ``pre_selected[b, j] == (x[b] - b_dec) @ W_enc[:, idx[b, j]] + b_enc[idx]``;
    the forward pass reuses the dense result, the backward pass touches only those columns.
    """
    del x, b_dec, w_enc, b_enc, indices
    return pre_selected


def _selected_fwd(pre_selected, x, b_dec, w_enc, b_enc, indices):
    return pre_selected, (x, b_dec, w_enc, b_enc, indices)


def _like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Give a cotangent the per-device ("varying") mesh axes of its primal (inside shard_map)."""
    have = jax.typeof(cotangent).manual_axis_type.varying
    missing = tuple(jax.typeof(primal).manual_axis_type.varying - have)
    return jax.lax.pcast(cotangent, missing, to="varying") if missing else cotangent


def _selected_bwd(residuals, g):
    x, b_dec, w_enc, b_enc, indices = residuals
    d_model, n_features = w_enc.shape
    flat_idx = indices.reshape(-1)
    # dW_enc[:, f] = sum over (b, j) with idx[b, j] == f of g[b, j] * (x[b] - b_dec).
    updates = (g[:, :, None] * (x - b_dec)[:, None, :]).reshape(-1, d_model)
    grad_w_enc_t = jnp.zeros((n_features, d_model), w_enc.dtype).at[flat_idx].add(updates)
    grad_b_enc = jnp.zeros((n_features,), g.dtype).at[flat_idx].add(g.reshape(-1))
    # d b_dec = -sum_b sum_j g[b, j] W_enc[:, idx[b, j]] = -W_enc @ grad_b_enc: a mat-vec, no gather.
    grad_b_dec = -(w_enc @ grad_b_enc)
    # d x[b] = sum_j g[b, j] W_enc[:, idx[b, j]]; XLA drops it, since x is data, not a parameter.
    grad_x = jnp.einsum("bk,bkd->bd", g, jnp.take(w_enc.T, indices, axis=0))
    return (
        jnp.zeros_like(g),
        _like(grad_x, x),
        _like(grad_b_dec, b_dec),
        _like(grad_w_enc_t.T, w_enc),
        _like(grad_b_enc, b_enc),
        None,
    )


selected_preactivations.defvjp(_selected_fwd, _selected_bwd)
