"""TopK SAE (Gao et al. 2024) with the AuxK dead-latent loss.

Each token keeps its ``k`` largest pre-activations (ReLU'd). The decoder and the encoder's
backward pass touch only those ``k`` latents (``dictlearn.sae.sparse``); the only dense work is
the encoder's forward matmul and the top-k itself.

AuxK: latents that have not fired for ``dead_window_tokens`` are "dead"; the ``k_aux`` largest
dead pre-activations of each token reconstruct the main model's residual error, and ``aux_coef``
times that squared error, in the reconstruction loss's units (summed over d_model, averaged over
tokens), joins the loss, pulling dead latents back. The logged ``aux_loss`` is the same error
divided by the residual's variance (1: the dead latents explain none of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field, model_validator

from dictlearn.sae.base import (
    Architecture,
    ArchState,
    BaseSAEConfig,
    EncoderDtype,
    LocalOutputs,
    LossContext,
    Params,
    as_varying,
    encoder_matmul,
    global_sum,
    preactivations,
    reconstruction_metrics,
    register,
    with_encoder_dtype,
)
from dictlearn.sae.sparse import topk_values_and_decode
from dictlearn.sae.topk_select import Selection, select_shard_winners, top_k
from sharding import FEATURES, mesh_axis


class TopKConfig(BaseSAEConfig):
    """TopK SAE."""

    architecture: Literal["topk"] = "topk"
    k: int = Field(32, gt=0, description="Active latents per token.")
    k_aux: int = Field(
        256, ge=0, description="Dead latents used by the AuxK loss per token (0 disables it)."
    )
    aux_coef: float = Field(
        0.5,
        ge=0,
        description=(
            "Weight of the AuxK loss. On Gemma 3 270M activations 0.5 left 0.80 % of the latents "
            "dead at 1M tokens (mean of four seeds, 0.59-1.02 %; 1/32, the default before: "
            "12.8 %) for 5.6 % higher FVU, and at "
            "4M tokens 0.06 % (1/32: 0.49 %) at equal FVU; on planted data the two are equal. "
            "Smaller trades live latents for reconstruction early in a run "
            "(docs/real_quality.md)."
        ),
    )
    learn_b_dec: bool = Field(
        False,
        description=(
            "Train b_dec (False: keep it at its initial value, the data mean). On Gemma 3 270M "
            "activations a learned b_dec left 62 % of the latents dead at 1M tokens, a fixed "
            "one 35 %, with lower held-out FVU and spliced loss; on planted data fixed was "
            "better on every number too (docs/real_quality.md)."
        ),
    )
    aux_gradient: Literal["relu", "straight_through"] = Field(
        "straight_through",
        description=(
            "How AuxK's loss reaches a picked dead latent's encoder: through its ReLU as in Gao "
            "et al. (no gradient where the pre-activation is below 0), or straight through "
            "(the gradient it would get if it fired). On Gemma 3 270M activations at 1M tokens "
            "straight through left 12.8 % of the latents dead instead of 35.4 %, at the same "
            "FVU and spliced loss (docs/real_quality.md)."
        ),
    )

    @model_validator(mode="after")
    def _k_fits(self) -> TopKConfig:
        if self.k > self.n_features:
            raise ValueError(f"k={self.k} must not exceed n_features={self.n_features}")
        return self


ENCODE_CHUNK_TOKENS = 1024
"""Tokens per pass of the encoder matmul and top-k in ``local_top_k_candidates``.

The top-k reads each chunk's ``[chunk, n_local]`` pre-activations while they are still in cache
instead of storing the whole ``[batch, n_local]`` to memory and reading it back. On a 2-core CPU
at d_model 640 (4096 tokens) this made matmul + top-k 40 ms faster at 16,384 latents and about
150 ms at 65,536; it also bounds that buffer's memory on any device."""


def local_top_k_candidates(
    params: Params,
    x: jax.Array,
    biased_k: Sequence[tuple[int, jax.Array]],
    chunk_tokens: int | None = None,
    encoder_dtype: EncoderDtype = "float32",
) -> list[tuple[jax.Array, jax.Array]]:
    """This shard's top-k of ``(x - b_dec) @ W_enc + bias`` for each ``(k, bias)``, chunk by chunk.

    Each request shares the one matmul per chunk: TopK asks for the ``k`` largest
    pre-activations (``bias = b_enc``) and, when AuxK runs, the ``k_aux`` largest among dead
    latents (``bias = where(dead, b_enc, -inf)``). The ``[batch, n_local]`` matmul is never
    stored whole. Returns ``(values, local indices)``, each ``[batch, k]``, per request; no
    gradient flows through them. ``chunk_tokens`` defaults to ``ENCODE_CHUNK_TOKENS``;
    ``encoder_dtype`` is the matmul's input dtype (``BaseSAEConfig.encoder_dtype``).
    """
    if chunk_tokens is None:
        chunk_tokens = ENCODE_CHUNK_TOKENS
    params = with_encoder_dtype(jax.lax.stop_gradient(params), encoder_dtype)
    requests = [(k, jax.lax.stop_gradient(bias)) for k, bias in biased_k]

    def select(x_chunk: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        unbiased = encoder_matmul(params, x_chunk)
        return [top_k(unbiased, k, bias) for k, bias in requests]

    rows, d_model = x.shape
    n_chunks = -(-rows // max(chunk_tokens, 1))
    if n_chunks <= 1:
        return select(x)
    chunk = -(-rows // n_chunks)  # balanced chunks; pad the last one rather than shrink them all
    padded = jnp.pad(x, ((0, n_chunks * chunk - rows), (0, 0)))
    stacked = jax.lax.map(select, padded.reshape(n_chunks, chunk, d_model))
    return [
        (values.reshape(-1, k)[:rows], indices.reshape(-1, k)[:rows])
        for (k, _), (values, indices) in zip(requests, stacked, strict=True)
    ]


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


@register
class TopK(Architecture):
    name = "topk"
    config_cls = TopKConfig
    config: TopKConfig

    @property
    def uses_dead_latents(self) -> bool:
        return self.config.k_aux > 0 and self.config.aux_coef > 0

    @property
    def k_aux(self) -> int:
        """Dead latents AuxK picks per token over all shards: ``k_aux``, at most every latent."""
        return min(self.config.k_aux, self.config.n_features)

    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        pre = preactivations(params, x)
        values, indices = jax.lax.top_k(pre, self.config.k)
        latents = jnp.zeros_like(pre)
        rows = jnp.arange(pre.shape[0])[:, None]
        return latents.at[rows, indices].set(jax.nn.relu(values))

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        cfg = self.config
        n_local = params["b_enc"].shape[0]
        # A shard holds at most min(k, n_local) of a token's k winners: that many candidates
        # per shard make the merged selection the single-device one whatever the mesh.
        requests = [(min(cfg.k, n_local), params["b_enc"])]
        with_aux = self.uses_dead_latents and ctx.any_dead
        if with_aux:
            # -inf bias: a live latent's pre-activation becomes -inf, so it can only be picked
            # when fewer than k_aux latents are dead (and is then dropped in _aux_loss).
            requests.append((min(cfg.k_aux, n_local), jnp.where(dead, params["b_enc"], -jnp.inf)))
        candidates = local_top_k_candidates(params, x, requests, encoder_dtype=cfg.encoder_dtype)
        selection = select_shard_winners(*candidates[0], k=cfg.k)
        values, partial = sparse_topk_forward(params, x, selection)
        x_hat = jax.lax.psum(partial, mesh_axis(FEATURES)) + params["b_dec"]
        active = selection.mask & (values > 0)
        recon, metrics = reconstruction_metrics(x, x_hat, jnp.sum(active, axis=1), ctx.global_batch)
        fire = (
            jnp.zeros((n_local,), jnp.int32)
            .at[selection.indices.reshape(-1)]
            .add(active.reshape(-1).astype(jnp.int32))
        )
        fire_counts = global_sum(fire)

        aux, aux_normalised = (
            self._aux_loss(
                params, x, x_hat, select_shard_winners(*candidates[1], k=self.k_aux), ctx
            )
            if with_aux
            else (0.0, 0.0)
        )
        loss = recon + cfg.aux_coef * aux
        metrics |= {"aux_loss": jnp.asarray(aux_normalised, jnp.float32), "loss": loss}
        return loss, LocalOutputs(metrics=metrics, fire_counts=fire_counts, state_stats={})

    def _aux_loss(
        self, params, x, x_hat, selection: Selection, ctx: LossContext
    ) -> tuple[jax.Array, jax.Array]:
        """Error of reconstructing the residual from dead latents only: in the reconstruction
        loss's units (what the loss adds), and divided by the residual's variance (the metric).

        The loss term is in the main loss's units, so that ``aux_coef`` weighs the same against
        the reconstruction at any d_model and input scale (sparsify adds ``auxk_alpha`` x this
        error / the batch's total variance to its FVU: the same ratio). Divided by the residual's
        variance, as before, the term was ~1 while the reconstruction loss is the residual's
        variance per token (~40 on the planted proxy at d_model 160, more at 640): latents that
        died mid-run under Adam, whose second moments still remembered their live gradients,
        got almost no pull back (bench/planted_quality.py; docs/planted_quality.md).
        """
        residual = jax.lax.stop_gradient(x - x_hat)
        # Fewer than k_aux dead latents on a shard: the -inf picks are not dead, drop them.
        selection = selection._replace(mask=selection.mask & jnp.isfinite(selection.values))
        _, partial = sparse_topk_forward(
            params, x, selection, straight_through=self.config.aux_gradient == "straight_through"
        )
        aux_hat = jax.lax.psum(partial, mesh_axis(FEATURES))
        err = global_sum(jnp.sum((aux_hat - residual) ** 2))
        mean_res = global_sum(jnp.sum(residual, axis=0)) / ctx.global_batch
        var = global_sum(jnp.sum((residual - mean_res) ** 2))
        return err / ctx.global_batch, err / jnp.maximum(var, 1e-12)


__all__ = ["TopK", "TopKConfig", "local_top_k_candidates", "sparse_topk_forward"]
