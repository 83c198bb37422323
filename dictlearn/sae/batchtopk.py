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
those candidates, and decoding and the backward pass touch only the selected pairs. A token whose
candidates on a shard are all selected (more of its values might be) is "saturated": it takes a
dense row of its own there, and the cut-off is searched exactly over the other tokens'
candidates and those rows (``cutoff_with_rows``). Real activations have a few such tokens of huge
norm in many batches. Only when a shard has more than ``SATURATED_TOKENS_PER_SHARD`` of them
(early in training) does the step run densely, with the exact cut-off of
``topk_select.batch_threshold``.

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
from dictlearn.sae.topk_select import batch_threshold, bisect_kth_largest
from dictlearn.sae.variable_l0 import (
    decode_slots,
    per_device,
    plan_rows,
    scatter_per_latent,
    sparse_rows_or_dense,
)
from sharding import BATCH, FEATURES, mesh_axis
from sharding.varying import vary_over, varying_axes


class BatchTopKConfig(AuxKConfig):
    """BatchTopK SAE with AuxK."""

    architecture: Literal["batchtopk"] = "batchtopk"
    k: int = Field(32, gt=0, description="Average active latents per token.")

    learn_b_dec: bool = Field(
        False,
        description=(
            "Train b_dec (False: keep it at its initial value, the data mean). On Gemma 3 270M "
            "activations at 1M tokens (AuxK on, threshold calibrated) a fixed b_dec gave "
            "lower held-out FVU (0.0348 vs 0.0359) and spliced CE (2.847 vs 2.880) with 1.8 % "
            "of the latents dead on held-out rows (learned: 1.4 %); without AuxK, 0.0336 vs "
            "0.0348 and 32 % vs 73 % dead (docs/real_quality.md)."
        ),
    )
    candidates_per_token: int = Field(
        0,
        ge=0,
        description="Per-token, per-shard candidates for the batch cut-off and the sparse step "
        "(0 = 4k). A token with all of them selected takes a dense row of its own; a step with "
        "more than 32 such tokens on a shard runs densely (same result, several times slower). "
        "A larger value makes both rarer and the sparse step a bit slower.",
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

    @property
    def nominal_l0(self) -> float:
        return self.k


SATURATED_TOKENS_PER_SHARD = 32
"""Tokens per shard whose selected latents may outnumber their candidates that a sparse step
still takes, each through a dense row of its own; more than that on any shard and the step runs
densely. Real activations have rare tokens of huge norm (Gemma 3 270M layer 6: 0-3 tokens of 20-30x
the median centred norm per batch of 4,096) that BatchTopK gives thousands of latents, so that
without these rows 216 of the first 245 steps of a 1M-token run there ran densely
(docs/real_quality.md); with them, from step 27 of 256 on. A step with saturated tokens pays
about seven products of ``[32, d_model]`` by ``[d_model, n_local]`` for the rows, forward and
backward (~5 % of the encoder matmul's FLOPs at batch 4,096); a step without skips them (a
``lax.cond``): computed every step, they cost 4-8 % of BatchTopK's step time at 16,384 latents
on CPU."""


class _BatchTopKPath(NamedTuple):
    """BatchTopK over the candidate slots plus a few dense token rows, and all densely.

    ``diff = (b_dec, W_enc, b_enc, W_dec)``; ``aux = (x, slot pre, slot indices, cut-off, rows,
    row is valid)``. The cut-off is the exact one from the candidates and the rows (the dense
    path finds its own). ``rows`` ``[SATURATED_TOKENS_PER_SHARD]`` are the tokens whose every
    candidate was selected: their slots hold -inf (unused) and they are decoded from their whole
    dense row instead; unused entries repeat token 0 with ``row is valid`` false. Outputs: the
    partial reconstruction, active latents per token, per latent, and the smallest selected
    value.
    """

    n_select: int
    candidates: int
    rows: bool = True
    """Static: decode the saturated tokens' rows (the step's path when any token is saturated);
    without, the rows cost nothing."""

    def dense(self, diff, aux):
        b_dec, w_enc, b_enc, w_dec = diff
        x = aux[0]
        pre = (x - b_dec) @ w_enc + b_enc
        cutoff = batch_threshold(
            jax.nn.relu(jax.lax.stop_gradient(pre)),
            self.n_select,
            self.candidates,
            (mesh_axis(BATCH), mesh_axis(FEATURES)),
        )
        return per_device(select_and_decode_rows(pre, cutoff, w_dec))

    def _active(self, aux):
        _, pre, indices, cutoff = aux[:4]
        active = (jax.nn.relu(pre) >= cutoff) & (pre > 0)
        return active, jnp.where(active, pre, 0.0), indices

    @staticmethod
    def _rows(diff, aux):
        """The saturated tokens' dense rows: ``(partial [rows, d], counts [rows], fire
        [n_local], smallest selected)``; differentiable in ``diff`` through ``partial``."""
        b_dec, w_enc, b_enc, w_dec = diff
        x, cutoff, rows, valid = aux[0], aux[3], aux[4], aux[5]
        pre = (x[rows] - b_dec) @ w_enc + b_enc
        return select_and_decode_rows(pre, cutoff, w_dec, valid)

    def sparse(self, diff, aux):
        w_dec = diff[3]
        rows = aux[4]
        active, values, indices = self._active(aux)
        counts = active.astype(jnp.float32)
        fire = scatter_per_latent(counts, indices, w_dec.shape[0])
        min_selected = jnp.min(jnp.where(active, values, jnp.inf))
        partial = decode_slots(values, indices, w_dec)
        per_token = jnp.sum(counts, axis=1)
        if self.rows:
            row_partial, row_counts, row_fire, row_smallest = self._rows(diff, aux)
            fire = fire + row_fire
            min_selected = jnp.minimum(min_selected, row_smallest)
            # Invalid rows add zeros (to token 0).
            partial = partial.at[rows].add(row_partial)
            per_token = per_token.at[rows].add(row_counts)
        return per_device((partial, per_token, fire, min_selected))

    def sparse_grads(self, diff, aux, cotangents):
        b_dec, w_enc, _, w_dec = diff
        active, values, indices = self._active(aux)
        slot_grads = active_pair_grads(
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
        if self.rows:
            _, row_vjp = jax.vjp(lambda d: self._rows(d, aux)[0], diff)
            (row_grads,) = row_vjp(cotangents[0][aux[4]])
            slot_grads = tuple(a + b for a, b in zip(slot_grads, row_grads, strict=True))
        return tuple(vary_over(g, varying_axes(p)) for g, p in zip(slot_grads, diff, strict=True))


def select_and_decode_rows(
    pre: jax.Array, cutoff: jax.Array, w_dec: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """BatchTopK's selection on dense rows of pre-activations ``[rows, n_local]``.

    Keeps the values at or above ``cutoff`` (and above 0) of the rows where ``valid`` holds (all
    when None). Returns the partial reconstruction ``[rows, d]`` (differentiable in ``pre`` and
    ``w_dec``), the kept latents per row and per latent, and the smallest kept value (inf if
    none).
    """
    relu_pre = jax.nn.relu(jax.lax.stop_gradient(pre))
    active = (relu_pre >= cutoff) & (relu_pre > 0)
    if valid is not None:
        active &= valid[:, None]
    counts = active.astype(jnp.float32)
    partial = jnp.where(active, pre, 0.0) @ w_dec
    smallest = jnp.min(jnp.where(active, relu_pre, jnp.inf))
    return partial, jnp.sum(counts, axis=1), jnp.sum(counts, axis=0), smallest


def candidate_cutoff(
    relu_candidates: jax.Array, n_select: int, exhaustive: bool
) -> tuple[jax.Array, jax.Array]:
    """The ``n_select``-th largest candidate over the mesh, and the tokens it may be wrong for.

    ``relu_candidates`` ``[batch, m]`` holds each token's top ``m`` (ReLU'd) values on this
    shard. The cut-off among all candidates is the true one unless some token-shard had every
    candidate at or above it (then more of its values might be): those tokens are returned,
    ``[batch]`` bool on this shard. ``exhaustive``: the candidates are all of the shard's values.
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
    saturated = (jnp.min(relu_candidates, axis=1) >= cutoff) & (not exhaustive)
    return cutoff, saturated


def cutoff_with_rows(
    params: Params,
    x: jax.Array,
    relu_candidates: jax.Array,
    saturated: jax.Array,
    rows: jax.Array,
    valid: jax.Array,
    n_select: int,
    enabled: jax.Array,
) -> jax.Array:
    """The exact ``n_select``-th largest pre-activation (ReLU'd) of the batch over the mesh.

    The values searched are the unsaturated tokens' candidates and the saturated tokens' whole
    rows (``rows``, all of them when ``valid`` counts every saturated token). They hold every
    value at or above the true cut-off: an unsaturated token's smallest candidate is below the
    candidates' cut-off, which is at most the true one. So their ``n_select``-th largest is it.
    A bisection on the float bits (``topk_select.bisect_kth_largest``), a scalar ``psum`` per
    round; no work when ``enabled`` is false (the result is then meaningless).
    """
    row_values = jax.nn.relu(preactivations(jax.lax.stop_gradient(params), x[rows]))
    values = jnp.concatenate(
        [
            jnp.where(saturated[:, None], -jnp.inf, relu_candidates).reshape(-1),
            jnp.where(valid[:, None], row_values, -jnp.inf).reshape(-1),
        ]
    )
    return bisect_kth_largest(
        values, n_select, (mesh_axis(BATCH), mesh_axis(FEATURES)), enabled=enabled
    )


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
        requests = [(m, params["b_enc"]), *self.aux_requests(params["b_enc"], dead, ctx)]
        candidates = local_top_k_candidates(
            params, x, requests, encoder_dtype=self.config.encoder_dtype
        )
        pre, indices = candidates[0]
        n_select = self.config.k * ctx.global_batch
        relu_candidates = jax.nn.relu(pre)
        cutoff, saturated = candidate_cutoff(relu_candidates, n_select, m == n_local)
        # Tokens with more selected latents than candidates take dense rows of their own (up
        # to SATURATED_TOKENS_PER_SHARD per shard); past that the whole step runs densely.
        plan = plan_rows(saturated, SATURATED_TOKENS_PER_SHARD)
        # Both conds run one branch: steps without saturated tokens pay nothing for the rows.
        cutoff = jax.lax.cond(
            plan.with_rows,
            lambda: cutoff_with_rows(
                params,
                x,
                relu_candidates,
                saturated,
                plan.rows,
                plan.valid,
                n_select,
                plan.with_rows,
            ),
            lambda: cutoff,
        )
        diff = tuple(as_varying(params[k]) for k in ("b_dec", "W_enc", "b_enc", "W_dec"))
        # x is data: no gradient flows to it. A saturated token's slots are unused: its dense
        # row decodes it.
        aux = (
            jax.lax.stop_gradient(as_varying(x)),
            jnp.where(saturated[:, None], -jnp.inf, pre),
            indices,
            as_varying(cutoff),
            plan.rows,
            plan.valid,
        )
        partial, per_token, fire, min_selected = sparse_rows_or_dense(
            _BatchTopKPath(n_select, m), plan, diff, aux
        )
        x_hat = jax.lax.psum(partial, mesh_axis(FEATURES)) + params["b_dec"]
        recon, metrics = reconstruction_metrics(x, x_hat, per_token, ctx.global_batch)
        # Smallest selected activation this step, the sample for the inference threshold.
        min_selected = jax.lax.stop_gradient(min_selected)
        min_selected = jax.lax.pmin(
            jax.lax.pmin(min_selected, mesh_axis(FEATURES)), mesh_axis(BATCH)
        )
        aux, aux_normalised = self.aux_loss(params, x, x_hat, dead, candidates[1:], ctx)
        loss = recon + self.config.aux_coef * aux
        metrics |= {
            "loss": loss,
            "aux_loss": jnp.asarray(aux_normalised, jnp.float32),
            "batch_threshold": min_selected,
            "dense_fallback": plan.overflow.astype(jnp.float32),
            # (token, shard) pairs whose latents took a dense row (or, past the bound, the step).
            "saturated_tokens": jax.lax.psum(
                plan.n_saturated, (mesh_axis(BATCH), mesh_axis(FEATURES))
            ).astype(jnp.float32),
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
