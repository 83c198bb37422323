"""BatchTopK SAE (Bussmann et al. 2024).

Training keeps the ``k * batch`` largest pre-activations of the whole (global) batch, so tokens
get a variable number of latents with the average fixed at ``k``. At inference there is no
batch: a single threshold, the running mean of the smallest selected activation seen during
training, turns the model into a JumpReLU SAE with a uniform threshold, and that is how it is
used and exported.
"""

from __future__ import annotations

from typing import Literal

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
    preactivations,
    reconstruction_metrics,
    register,
)
from dictlearn.sae.topk_select import batch_threshold
from sharding import BATCH, FEATURES, mesh_axis


class BatchTopKConfig(BaseSAEConfig):
    """BatchTopK SAE."""

    architecture: Literal["batchtopk"] = "batchtopk"
    k: int = Field(32, gt=0, description="Average active latents per token.")
    candidates_per_token: int = Field(
        0,
        ge=0,
        description="Per-token, per-shard candidates for the exact batch cut-off "
        "(0 = 4k); a larger value avoids the slower exact fallback more often.",
    )
    threshold_momentum: float = Field(
        0.99,
        gt=0,
        lt=1,
        description="EMA momentum of the inference threshold (min selected activation).",
    )


@register
class BatchTopK(Architecture):
    name = "batchtopk"
    config_cls = BatchTopKConfig
    config: BatchTopKConfig

    def state_axes(self):
        return {"threshold": (), "threshold_initialised": ()}

    def init_state(self) -> ArchState:
        return {"threshold": jnp.float32(0.0), "threshold_initialised": jnp.bool_(False)}

    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        """Inference: a JumpReLU with the learned uniform threshold."""
        pre = preactivations(params, x)
        return jnp.where(pre > state["threshold"], pre, 0.0)

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        cfg = self.config
        pre = preactivations(params, x)
        candidates = cfg.candidates_per_token or 4 * cfg.k
        relu_pre = jax.nn.relu(jax.lax.stop_gradient(pre))
        cutoff = batch_threshold(
            relu_pre, cfg.k * ctx.global_batch, candidates, (mesh_axis(BATCH), mesh_axis(FEATURES))
        )
        active = (relu_pre >= cutoff) & (relu_pre > 0)
        latents = jnp.where(active, pre, 0.0)
        x_hat = finish_reconstruction(latents @ params["W_dec"], params["b_dec"])
        recon, metrics = reconstruction_metrics(x, x_hat, jnp.sum(active, axis=1), ctx.global_batch)
        # Smallest selected activation this step, the sample for the inference threshold.
        min_selected = jnp.min(jnp.where(active, relu_pre, jnp.inf))
        min_selected = jax.lax.pmin(
            jax.lax.pmin(min_selected, mesh_axis(FEATURES)), mesh_axis(BATCH)
        )
        metrics |= {"loss": recon, "batch_threshold": min_selected}
        return recon, LocalOutputs(
            metrics=metrics,
            fire_counts=fire_counts_from_dense(active),
            state_stats={"min_selected": min_selected},
        )

    def update_state(self, state: ArchState, stats) -> ArchState:
        m = self.config.threshold_momentum
        sample = stats["min_selected"]
        sample_ok = jnp.isfinite(sample)
        blended = jnp.where(
            state["threshold_initialised"], m * state["threshold"] + (1 - m) * sample, sample
        )
        return {
            "threshold": jnp.where(sample_ok, blended, state["threshold"]),
            "threshold_initialised": state["threshold_initialised"] | sample_ok,
        }
