"""TopK SAE (Gao et al. 2024) with the AuxK dead-latent loss.

Each token keeps its ``k`` largest pre-activations (ReLU'd). The decoder and the encoder's
backward pass touch only those ``k`` latents (``dictlearn.sae.sparse``); the only dense work is
the encoder's forward matmul and the top-k itself.

AuxK: latents that have not fired for ``dead_window_tokens`` are "dead"; the ``k_aux`` largest
dead pre-activations of each token reconstruct the main model's residual error, and
``aux_coef`` times that (variance-normalised) error joins the loss, pulling dead latents back.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field, model_validator

from dictlearn.sae.base import (
    Architecture,
    ArchState,
    BaseSAEConfig,
    LocalOutputs,
    LossContext,
    Params,
    as_varying,
    encoder_matmul,
    global_sum,
    preactivations,
    reconstruction_metrics,
    register,
)
from dictlearn.sae.sparse import topk_values_and_decode
from dictlearn.sae.topk_select import Selection, sharded_top_k
from sharding import MODEL


class TopKConfig(BaseSAEConfig):
    """TopK SAE."""

    architecture: Literal["topk"] = "topk"
    k: int = Field(32, gt=0, description="Active latents per token.")
    k_aux: int = Field(
        256, ge=0, description="Dead latents used by the AuxK loss per token (0 disables it)."
    )
    aux_coef: float = Field(1 / 32, ge=0, description="Weight of the AuxK loss.")

    @model_validator(mode="after")
    def _k_fits(self) -> TopKConfig:
        if self.k > self.n_features:
            raise ValueError(f"k={self.k} must not exceed n_features={self.n_features}")
        return self


def sparse_topk_forward(
    params: Params, x: jax.Array, pre: jax.Array, selection: Selection
) -> tuple[jax.Array, jax.Array]:
    """Values of the selected latents (with sparse gradients) and this shard's partial x_hat."""
    pre_sel = jax.lax.stop_gradient(jnp.take_along_axis(pre, selection.indices, axis=1))
    return topk_values_and_decode(
        pre_sel,
        selection.mask,
        as_varying(x),
        as_varying(params["b_dec"]),
        as_varying(params["W_enc"]),
        as_varying(params["b_enc"]),
        as_varying(params["W_dec"]),
        selection.indices,
    )


@register
class TopK(Architecture):
    name = "topk"
    config_cls = TopKConfig
    config: TopKConfig

    @property
    def uses_dead_latents(self) -> bool:
        return self.config.k_aux > 0 and self.config.aux_coef > 0

    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        pre = preactivations(params, x)
        values, indices = jax.lax.top_k(pre, self.config.k)
        latents = jnp.zeros_like(pre)
        rows = jnp.arange(pre.shape[0])[:, None]
        return latents.at[rows, indices].set(jax.nn.relu(values))

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        cfg = self.config
        # The bias goes to the top-k separately: the CPU kernel adds it as it reads, and XLA
        # fuses it into each consumer, so the biased [batch, n_features] is never stored.
        unbiased = jax.lax.stop_gradient(encoder_matmul(params, x))
        b_enc = jax.lax.stop_gradient(params["b_enc"])
        pre = unbiased + b_enc
        selection = sharded_top_k(unbiased, cfg.k, bias=b_enc)
        values, partial = sparse_topk_forward(params, x, pre, selection)
        x_hat = jax.lax.psum(partial, MODEL) + params["b_dec"]
        active = selection.mask & (values > 0)
        recon, metrics = reconstruction_metrics(x, x_hat, jnp.sum(active, axis=1), ctx.global_batch)
        n_local = pre.shape[1]
        fire = (
            jnp.zeros((n_local,), jnp.int32)
            .at[selection.indices.reshape(-1)]
            .add(active.reshape(-1).astype(jnp.int32))
        )
        fire_counts = global_sum(fire)

        aux = (
            self._aux_loss(params, x, x_hat, pre, dead, ctx)
            if self.uses_dead_latents and ctx.any_dead
            else 0.0
        )
        loss = recon + cfg.aux_coef * aux
        metrics |= {"aux_loss": jnp.asarray(aux, jnp.float32), "loss": loss}
        return loss, LocalOutputs(metrics=metrics, fire_counts=fire_counts, state_stats={})

    def _aux_loss(self, params, x, x_hat, pre, dead, ctx: LossContext) -> jax.Array:
        """Variance-normalised error of reconstructing the residual from dead latents only."""
        cfg = self.config
        k_aux = min(cfg.k_aux, pre.shape[1])
        residual = jax.lax.stop_gradient(x - x_hat)
        masked = jnp.where(dead[None, :], pre, -jnp.inf)
        selection = sharded_top_k(masked, k_aux)
        # Fewer than k_aux dead latents on a shard: the -inf picks are not dead, drop them.
        selection = selection._replace(mask=selection.mask & jnp.isfinite(selection.values))
        _, partial = sparse_topk_forward(params, x, masked, selection)
        aux_hat = jax.lax.psum(partial, MODEL)
        err = global_sum(jnp.sum((aux_hat - residual) ** 2))
        mean_res = global_sum(jnp.sum(residual, axis=0)) / ctx.global_batch
        var = global_sum(jnp.sum((residual - mean_res) ** 2))
        return err / jnp.maximum(var, 1e-12)


__all__ = ["TopK", "TopKConfig", "sparse_topk_forward"]
