"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Update", April 2024).

``loss = ||x - x_hat||^2 + l1_coef * sum_i f_i * ||W_dec_i||``. Weighting by the decoder norm
makes the penalty invariant to trading encoder scale for decoder scale, so the decoder is left
unconstrained (no unit-norm projection) and rows start small (``decoder_init_norm`` 0.1).

A ReLU SAE's L0 starts at about half of all latents and falls as the penalty bites. Each step
first tries the sparse path (``dictlearn.sae.variable_l0``: the latents with a positive
pre-activation, up to ``sparse_l0_bound`` per token and shard, decoded and differentiated over
those pairs only) and runs densely when some token has more; early in training that is every
step, and the failed attempt costs one extra pass over the encoder output (see README).
"""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from dictlearn.sae.base import (
    Architecture,
    ArchState,
    BaseSAEConfig,
    LocalOutputs,
    LossContext,
    Params,
    as_varying,
    global_sum,
    preactivations,
    reconstruction_metrics,
    register,
)
from dictlearn.sae.sparse import active_pair_grads
from dictlearn.sae.topk import ENCODE_CHUNK_TOKENS
from dictlearn.sae.variable_l0 import (
    any_over_mesh,
    decode_slots,
    dense_in_chunks,
    per_device,
    scatter_per_latent,
    select_slots,
    sparse_or_dense,
)
from sharding import FEATURES, mesh_axis
from sharding.varying import vary_over, varying_axes


class ReLUL1Config(BaseSAEConfig):
    """ReLU + decoder-norm-weighted L1."""

    architecture: Literal["relu_l1"] = "relu_l1"
    sparsity_penalty: ClassVar[bool] = True
    l1_coef: float = Field(5.0, ge=0, description="Weight of the L1 penalty.")
    decoder_init_norm: float = Field(
        0.1, gt=0, description="L2 norm of each decoder row at initialisation."
    )
    sparse_l0_bound: int = Field(
        256,
        ge=0,
        description="Active latents per token (on each feature shard) the sparse step handles; "
        "a step where any token has more runs densely (same result). 0: always dense.",
    )


class _ReLUL1Path(NamedTuple):
    """ReLU + decoder-norm-weighted L1 over slots and densely.

    ``diff = (b_dec, W_enc, b_enc, W_dec)``; ``aux = (x, slot pre, slot indices)``. Outputs: the
    partial reconstruction, ``sum f * ||W_dec||`` over this shard, active latents per token and
    per latent.
    """

    dense_combine = ("tokens", "sum", "tokens", "sum")

    def dense(self, diff, aux):
        b_dec, w_enc, b_enc, w_dec = diff
        latents = jax.nn.relu((aux[0] - b_dec) @ w_enc + b_enc)
        l1 = jnp.sum(latents @ jnp.linalg.norm(w_dec, axis=1))
        active = (latents > 0).astype(jnp.float32)
        return per_device((latents @ w_dec, l1, jnp.sum(active, axis=1), jnp.sum(active, axis=0)))

    def sparse(self, diff, aux):
        w_dec = diff[3]
        _, pre, indices = aux
        values = jax.nn.relu(pre)
        norms = jnp.linalg.norm(w_dec, axis=1)
        l1 = jnp.sum(values * jnp.take(norms, indices))
        counts = (values > 0).astype(jnp.float32)
        fire = scatter_per_latent(counts, indices, w_dec.shape[0])
        partial = decode_slots(values, indices, w_dec)
        return per_device((partial, l1, jnp.sum(counts, axis=1), fire))

    def sparse_grads(self, diff, aux, cotangents):
        b_dec, w_enc, _, w_dec = diff
        x, pre, indices = aux
        g_partial, g_l1, _, _ = cotangents
        values = jax.nn.relu(pre)
        active = pre > 0
        norms = jnp.linalg.norm(w_dec, axis=1)
        # The penalty's own cotangent on each active value: g_l1 * ||W_dec[f]||.
        g_values = jnp.where(active, g_l1 * jnp.take(norms, indices), 0.0)
        grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec = active_pair_grads(
            g_partial, g_values, x, b_dec, w_enc, w_dec, values, indices, active
        )
        # d/dW_dec[f] of g_l1 * (sum_b f[b, f]) * ||W_dec[f]||.
        totals = scatter_per_latent(values, indices, w_dec.shape[0])
        grad_w_dec = grad_w_dec + (g_l1 * totals / norms)[:, None] * w_dec
        grads = (grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec)
        return tuple(vary_over(g, varying_axes(p)) for g, p in zip(grads, diff, strict=True))


@register
class ReLUL1(Architecture):
    name = "relu_l1"
    config_cls = ReLUL1Config
    config: ReLUL1Config
    unit_norm_decoder = False

    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        return jax.nn.relu(preactivations(params, x))

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        cfg = self.config
        n_local = params["b_enc"].shape[0]
        bound = min(cfg.sparse_l0_bound, n_local)
        diff = tuple(as_varying(params[k]) for k in ("b_dec", "W_enc", "b_enc", "W_dec"))
        data = jax.lax.stop_gradient(as_varying(x))  # no gradient flows to the data
        path = _ReLUL1Path()
        if bound == 0:
            overflow = jnp.bool_(True)
            outputs = dense_in_chunks(path, diff, (data,))
        else:
            # Ranked by the pre-activation itself: candidates are exactly the positive ones.
            slots = select_slots(
                params, x, bound, params["b_enc"], ENCODE_CHUNK_TOKENS, cfg.encoder_dtype
            )
            overflow = any_over_mesh(jnp.any(slots.count > bound))
            outputs = sparse_or_dense(path, overflow, diff, (data, slots.pre, slots.indices))
        partial, l1_local, per_token, fire = outputs
        x_hat = jax.lax.psum(partial, mesh_axis(FEATURES)) + params["b_dec"]
        recon, metrics = reconstruction_metrics(x, x_hat, per_token, ctx.global_batch)
        l1 = jax.lax.psum(global_sum(l1_local), mesh_axis(FEATURES)) / ctx.global_batch
        sparsity = cfg.l1_coef * ctx.sparsity_scale * l1
        loss = recon + sparsity
        metrics |= {
            "sparsity_loss": sparsity,
            "l1": l1,
            "loss": loss,
            "dense_fallback": overflow.astype(jnp.float32),
        }
        return loss, LocalOutputs(
            metrics=metrics, fire_counts=global_sum(fire.astype(jnp.int32)), state_stats={}
        )
