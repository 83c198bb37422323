"""BatchTopK SAE (Bussmann et al. 2024).

Training keeps the ``k * batch`` largest pre-activations of the whole (global) batch, so tokens
get a variable number of latents with the average fixed at ``k``. At inference there is no
batch: a single threshold turns the model into a JumpReLU SAE with a uniform threshold, and that
is how it is used, exported and evaluated (the held-out evaluation scores that rule, not the
batch selection). During training the threshold is a running mean of each step's cut-off (its
smallest selected activation); after the last step it becomes the trained model's mean cut-off
over a few more batches (``threshold_calibration_batches``), as Bussmann et al. estimate it: the
running mean lags the cut-off, which falls as the model trains.

Training runs sparse (``dictlearn.sae.variable_l0``): each chunk of the encoder matmul keeps its
tokens' top ``candidates_per_token`` pre-activations per shard; the batch cut-off is found among
those candidates, and decoding and the backward pass touch only the selected pairs. That is
exact unless some token on some shard has all its candidates selected (more of its values might
be): then the step runs densely, with the exact cut-off of ``topk_select.batch_threshold``.

Dead latents get TopK's AuxK loss (``dictlearn.sae.auxk``), as Bussmann et al.'s code
(``aux_penalty`` 1/32) and dictionary_learning's BatchTopK trainer (``auxk_alpha`` 1/32) do; its
dead-latent candidates share the encoder pass with the batch selection.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from dictlearn.sae.auxk import AuxKConfig, WithAuxK
from dictlearn.sae.base import (
    Architecture,
    ArchState,
    LocalOutputs,
    LossContext,
    Params,
    as_varying,
    global_sum,
    preactivations,
    reconstruction_metrics,
    register,
)
from dictlearn.sae.jumprelu import jumprelu_forward
from dictlearn.sae.sparse import active_pair_grads
from dictlearn.sae.topk import local_top_k_candidates
from dictlearn.sae.topk_select import batch_threshold
from dictlearn.sae.variable_l0 import (
    any_over_mesh,
    decode_slots,
    per_device,
    scatter_per_latent,
    sparse_or_dense,
)
from sharding import BATCH, FEATURES, mesh_axis
from sharding.varying import vary_over, varying_axes


class BatchTopKConfig(AuxKConfig):
    """BatchTopK SAE with AuxK."""

    architecture: Literal["batchtopk"] = "batchtopk"
    k: int = Field(32, gt=0, description="Average active latents per token.")
    candidates_per_token: int = Field(
        0,
        ge=0,
        description="Per-token, per-shard candidates for the batch cut-off and the sparse step "
        "(0 = 4k): a step where some token has all of them selected runs densely (same result, "
        "several times slower); a larger value makes that rarer and the sparse step a bit slower.",
    )
    threshold_momentum: float = Field(
        0.99,
        gt=0,
        lt=1,
        description=(
            "EMA momentum of the running inference threshold (min selected activation), the "
            "threshold of checkpoints before the last step (and of the last, with "
            "threshold_calibration_batches 0). Its memory of ~1/(1 - momentum) steps lags the "
            "cut-off, which falls early in training: after 256 steps on Gemma 3 270M "
            "activations 0.99 held 1.6-1.7x the cut-off, so such an export fired 20-24 latents "
            "per token for k 32 (docs/real_quality.md)."
        ),
    )
    threshold_calibration_batches: int = Field(
        8,
        ge=0,
        description=(
            "After the last step, the exported threshold becomes the trained model's mean batch "
            "cut-off over this many batches of the training stream (those the next steps would "
            "read; forward only, nothing trains on them), as Bussmann et al. estimate it. 0 "
            "keeps the running mean (threshold_momentum)."
        ),
    )


class _BatchTopKPath(NamedTuple):
    """BatchTopK over the candidate slots and densely.

    ``diff = (b_dec, W_enc, b_enc, W_dec)``; ``aux = (x, slot pre, slot indices, cut-off)``, the
    cut-off found among the candidates (the dense path finds its own). Outputs: the partial
    reconstruction, active latents per token, per latent, and the smallest selected value.
    """

    n_select: int
    candidates: int

    def dense(self, diff, aux):
        b_dec, w_enc, b_enc, w_dec = diff
        x = aux[0]
        pre = (x - b_dec) @ w_enc + b_enc
        relu_pre = jax.nn.relu(jax.lax.stop_gradient(pre))
        cutoff = batch_threshold(
            relu_pre, self.n_select, self.candidates, (mesh_axis(BATCH), mesh_axis(FEATURES))
        )
        active = (relu_pre >= cutoff) & (relu_pre > 0)
        counts = active.astype(jnp.float32)
        partial = jnp.where(active, pre, 0.0) @ w_dec
        min_selected = jnp.min(jnp.where(active, relu_pre, jnp.inf))
        return per_device((partial, jnp.sum(counts, axis=1), jnp.sum(counts, axis=0), min_selected))

    def _active(self, aux):
        _, pre, indices, cutoff = aux
        active = (jax.nn.relu(pre) >= cutoff) & (pre > 0)
        return active, jnp.where(active, pre, 0.0), indices

    def sparse(self, diff, aux):
        w_dec = diff[3]
        active, values, indices = self._active(aux)
        counts = active.astype(jnp.float32)
        fire = scatter_per_latent(counts, indices, w_dec.shape[0])
        min_selected = jnp.min(jnp.where(active, values, jnp.inf))
        partial = decode_slots(values, indices, w_dec)
        return per_device((partial, jnp.sum(counts, axis=1), fire, min_selected))

    def sparse_grads(self, diff, aux, cotangents):
        b_dec, w_enc, _, w_dec = diff
        active, values, indices = self._active(aux)
        grads = active_pair_grads(
            cotangents[0],
            jnp.zeros_like(values),
            aux[0],
            b_dec,
            w_enc,
            w_dec,
            values,
            indices,
            active,
        )
        return tuple(vary_over(g, varying_axes(p)) for g, p in zip(grads, diff, strict=True))


def candidate_cutoff(
    relu_candidates: jax.Array, n_select: int, exhaustive: bool
) -> tuple[jax.Array, jax.Array]:
    """The ``n_select``-th largest candidate over the mesh, and whether it may be wrong.

    ``relu_candidates`` ``[batch, m]`` holds each token's top ``m`` (ReLU'd) values on this
    shard. The cut-off among all candidates is the true one unless some token-shard had every
    candidate at or above it (then more of its values might be): that is the returned flag,
    agreed over the mesh. ``exhaustive``: the candidates are all of the shard's values.
    """
    flat = relu_candidates.reshape(-1)
    for axis in (mesh_axis(BATCH), mesh_axis(FEATURES)):
        flat = jax.lax.all_gather(flat, axis, tiled=True)
    if n_select > flat.shape[0]:
        raise ValueError(
            f"sae.candidates_per_token={relu_candidates.shape[1]} is too small to select "
            f"{n_select} values from {flat.shape[0]} candidates; raise it (0 = 4k)"
        )
    # A sort, not lax.top_k: with k = n_select (batch * k, ~1e5) XLA's TopK is far slower.
    cutoff = jax.lax.pmax(
        jnp.sort(flat)[flat.shape[0] - n_select], (mesh_axis(BATCH), mesh_axis(FEATURES))
    )
    # min over the row, not its last column: see topk_select.batch_threshold.
    saturated = jnp.any(jnp.min(relu_candidates, axis=1) >= cutoff) & (not exhaustive)
    return cutoff, any_over_mesh(saturated)


@register
class BatchTopK(WithAuxK, Architecture):
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

    def _candidates(self, n_local: int) -> int:
        return min(self.config.candidates_per_token or 4 * self.config.k, n_local)

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        if ctx.inference:
            return self._inference_loss(params, x, state, ctx)
        n_local = params["b_enc"].shape[0]
        m = self._candidates(n_local)
        requests = [(m, params["b_enc"])]
        with_aux = self.uses_dead_latents and ctx.any_dead
        if with_aux:
            requests.append(self.dead_candidates_request(params["b_enc"], dead))
        candidates = local_top_k_candidates(
            params, x, requests, encoder_dtype=self.config.encoder_dtype
        )
        pre, indices = candidates[0]
        n_select = self.config.k * ctx.global_batch
        cutoff, overflow = candidate_cutoff(jax.nn.relu(pre), n_select, m == n_local)
        diff = tuple(as_varying(params[k]) for k in ("b_dec", "W_enc", "b_enc", "W_dec"))
        # x is data: no gradient flows to it.
        aux = (jax.lax.stop_gradient(as_varying(x)), pre, indices, as_varying(cutoff))
        path = _BatchTopKPath(n_select, m)
        partial, per_token, fire, min_selected = sparse_or_dense(path, overflow, diff, aux)
        x_hat = jax.lax.psum(partial, mesh_axis(FEATURES)) + params["b_dec"]
        recon, metrics = reconstruction_metrics(x, x_hat, per_token, ctx.global_batch)
        # Smallest selected activation this step, the sample for the inference threshold.
        min_selected = jax.lax.stop_gradient(min_selected)
        min_selected = jax.lax.pmin(
            jax.lax.pmin(min_selected, mesh_axis(FEATURES)), mesh_axis(BATCH)
        )
        aux, aux_normalised = (
            self.aux_loss(params, x, x_hat, candidates[1], ctx) if with_aux else (0.0, 0.0)
        )
        loss = recon + self.config.aux_coef * aux
        metrics |= {
            "loss": loss,
            "aux_loss": jnp.asarray(aux_normalised, jnp.float32),
            "batch_threshold": min_selected,
            "dense_fallback": overflow.astype(jnp.float32),
        }
        return loss, LocalOutputs(
            metrics=metrics,
            fire_counts=global_sum(fire.astype(jnp.int32)),
            state_stats={"min_selected": min_selected},
        )

    def _inference_loss(self, params, x, state, ctx: LossContext):
        """The loss of the exported model: a JumpReLU at the learned uniform threshold."""
        n_local = params["b_enc"].shape[0]
        threshold = jnp.full((n_local,), state["threshold"], jnp.float32)
        # No gradient is taken here, so the estimator's bandwidth plays no part.
        out = jumprelu_forward(
            params, x, threshold, 0.0, self._candidates(n_local), self.config.encoder_dtype
        )
        x_hat = jax.lax.psum(out.partial, mesh_axis(FEATURES)) + params["b_dec"]
        recon, metrics = reconstruction_metrics(x, x_hat, out.l0_per_token, ctx.global_batch)
        metrics |= {
            "loss": recon,
            "threshold": jnp.asarray(state["threshold"], jnp.float32),
            "dense_fallback": out.overflow.astype(jnp.float32),
        }
        return recon, LocalOutputs(
            metrics=metrics,
            fire_counts=global_sum(out.fire.astype(jnp.int32)),
            state_stats={},
        )

    @property
    def calibration_batches(self) -> int:
        return self.config.threshold_calibration_batches

    def calibrated_state(self, state: ArchState, samples) -> ArchState:
        """The threshold becomes the mean of the batches' cut-offs (their smallest selected)."""
        sample = samples["min_selected"]
        ok = jnp.isfinite(sample)
        mean = jnp.sum(jnp.where(ok, sample, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
        return {
            "threshold": jnp.where(jnp.any(ok), mean, state["threshold"]),
            "threshold_initialised": state["threshold_initialised"] | jnp.any(ok),
        }

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
