"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Update", April 2024).

``loss = ||x - x_hat||^2 + l1_coef * sum_i f_i * ||W_dec_i||``. Weighting by the decoder norm
makes the penalty invariant to trading encoder scale for decoder scale, so the decoder is left
unconstrained (no unit-norm projection) and rows start small (``decoder_init_norm`` 0.1).
"""

from __future__ import annotations

from typing import ClassVar, Literal

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
    finish_reconstruction,
    fire_counts_from_dense,
    global_sum,
    preactivations,
    reconstruction_metrics,
    register,
)
from sharding import FEATURES, mesh_axis


class ReLUL1Config(BaseSAEConfig):
    """ReLU + decoder-norm-weighted L1."""

    architecture: Literal["relu_l1"] = "relu_l1"
    sparsity_penalty: ClassVar[bool] = True
    l1_coef: float = Field(5.0, ge=0, description="Weight of the L1 penalty.")
    decoder_init_norm: float = Field(
        0.1, gt=0, description="L2 norm of each decoder row at initialisation."
    )


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
        latents = jax.nn.relu(preactivations(params, x))
        x_hat = finish_reconstruction(latents @ params["W_dec"], params["b_dec"])
        active = latents > 0
        recon, metrics = reconstruction_metrics(x, x_hat, jnp.sum(active, axis=1), ctx.global_batch)
        dec_norms = jnp.linalg.norm(params["W_dec"], axis=1)
        l1 = (
            jax.lax.psum(global_sum(jnp.sum(latents @ dec_norms)), mesh_axis(FEATURES))
            / ctx.global_batch
        )
        sparsity = cfg.l1_coef * ctx.sparsity_scale * l1
        loss = recon + sparsity
        metrics |= {"sparsity_loss": sparsity, "l1": l1, "loss": loss}
        return loss, LocalOutputs(
            metrics=metrics, fire_counts=fire_counts_from_dense(active), state_stats={}
        )
