"""JumpReLU SAE trained as in Gemma Scope (Rajamanoharan et al. 2024).

``f = pre * H(pre - theta)`` with a learned per-latent threshold ``theta = exp(log_threshold)``.
The step function has zero gradient almost everywhere, so ``theta`` is trained through
straight-through estimators: a rectangle kernel of width ``bandwidth`` around the threshold
gives pseudo-derivatives for both the JumpReLU itself and the L0 penalty
``l0_coef * sum_i H(pre_i - theta_i)``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from dictlearn.sae.base import (
    Architecture,
    ArchState,
    BaseSAEConfig,
    EncoderDtype,
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
    decode_slots,
    dense_in_chunks,
    pair_dots,
    per_device,
    plan_rows,
    scatter_per_latent,
    select_slots,
    sparse_rows_or_dense,
)
from sharding import BATCH, FEATURES, mesh_axis
from sharding.varying import vary_over, varying_axes


class JumpReLUConfig(BaseSAEConfig):
    """JumpReLU SAE."""

    architecture: Literal["jumprelu"] = "jumprelu"
    sparsity_penalty: ClassVar[bool] = True
    l0_coef: float = Field(
        1.0,
        ge=0,
        description=(
            "Weight of the L0 sparsity penalty. With the threshold at the plain lr "
            "(threshold_lr_scale 1) 4 and 16 trained alike at 262k tokens: the log-threshold "
            "moves at most ~lr × threshold_lr_scale per step (docs/real_quality.md)."
        ),
    )
    target_l0: float | None = Field(
        None,
        gt=0,
        description=(
            "Steer the L0 penalty's weight so the training L0 settles at this value: after each "
            "step the weight (starting at l0_coef) is multiplied by "
            "exp(l0_coef_rate × clip(log(L0 / target_l0), −1, 1)), a dual ascent on the "
            "constraint L0 = target_l0. None: the weight stays l0_coef and the L0 is whatever "
            "that weight gives. On Gemma 3 270M at 1M tokens, with init_l0 32 and unit decoder "
            "rows, target 32 ended at L0 34; at decoder_init_norm 0.1 thresholds pushed up "
            "while the weight was high stayed up and L0 fell to 10. Start l0_coef near where "
            "the weight settles (0.04-0.06 there): from 1.0 it fell to 0.008 while L0 sat under "
            "the target and L0 then overshot to 41 (with revive_coef 0.0001, revive_scope "
            "batch); from 0.1 it ended at 29 (docs/real_quality.md)."
        ),
    )
    l0_coef_rate: float = Field(
        0.05,
        gt=0,
        description="With target_l0: the most the log of the L0 penalty's weight moves per step.",
    )
    bandwidth: float = Field(
        0.001,
        gt=0,
        description=(
            "Width of the rectangle kernel of the straight-through estimator. On Gemma 3 270M "
            "at 1M tokens (init_l0 32, target_l0 32, unit decoder rows) 0.001 / 0.01 / 0.1 gave "
            "FVU 0.040 / 0.038 / 0.038, each with 88-89 % of the latents dead "
            "(docs/real_quality.md)."
        ),
    )
    init_threshold: float = Field(
        0.001,
        gt=0,
        description="Initial threshold of every latent (with init_l0: the least one it may get).",
    )
    init_l0: float | None = Field(
        None,
        gt=0,
        description=(
            "Set each latent's initial threshold from the first training batch so that it fires "
            "on init_l0 / n_features of that batch's tokens: training starts at L0 ≈ init_l0 "
            "with no latent silent, instead of descending from the ~half of all latents a "
            "threshold of init_threshold lets fire. Pair it with decoder_init_norm 1.0: at 0.1 "
            "Adam's first steps are large against the encoder's small weights, and on Gemma 3 "
            "270M L0 went from 32 to 808 by step 8 (docs/real_quality.md). None: "
            "init_threshold for every latent."
        ),
    )
    decoder_init_norm: float = Field(
        0.1,
        gt=0,
        description=(
            "L2 norm of each decoder row at initialisation (the encoder starts as their "
            "transpose, so also its scale). At 1.0, about half the latents fire at first and "
            "the reconstruction overshoots ~13x (FVU 72 at step 8 on Gemma 3 270M), which "
            "drives most pre-activations below threshold for good; at 0.1 it starts at FVU 0.24 "
            "(docs/real_quality.md)."
        ),
    )
    threshold_lr_scale: float = Field(
        10.0,
        gt=0,
        description=(
            "Learning-rate multiplier of the log-threshold. Adam moves it by about lr × this per "
            "step whatever its gradient: at 1 (Gemma Scope's single lr) a 1M-token run's "
            "thresholds end where they started. On Gemma 3 270M layer 6 at 1M tokens 10 (with "
            "decoder_init_norm 0.1) gave L0 83, FVU 0.052, 37 % dead (1: L0 887, 62 % dead); 30 "
            "oscillated (docs/real_quality.md)."
        ),
    )
    revive_coef: float = Field(
        0.0,
        ge=0,
        description=(
            "Weight of the dead-latent pull: Anthropic's pre-activation loss, "
            "revive_coef × mean over tokens of Σ (threshold − pre-activation) over the latents "
            "revive_scope names (by default those dead and silent in the batch), which lowers "
            "their threshold and raises their bias until they fire again. Exact in closed form "
            "from the batch mean, so it costs no pass over the tokens. 0: off. On Gemma 3 270M "
            "at 1M tokens, with init_l0 32, target_l0 32 and unit decoder rows (88.6 % dead, "
            "FVU 0.040 without), 0.0003 / 0.001 / 0.01 / 0.1 left 41 / 32 / 20 / 9 % dead at "
            "FVU 0.043 / 0.046 / 0.056 / 0.088 (docs/real_quality.md)."
        ),
    )
    revive_scope: Literal["dead", "batch"] = Field(
        "dead",
        description=(
            "Which latents revive_coef pulls. dead: those counted dead (silent for "
            "dead_window_tokens) that also fire on no token of the batch. batch: every latent "
            "that fires on no token of the batch, so the pull starts one batch after a latent "
            "falls silent, not dead_window_tokens after. On Gemma 3 270M at 1M tokens "
            "(init_l0 32, target_l0 32, unit decoder rows) batch at 0.0001 / 0.0003 / 0.001 "
            "left 27 / 16 / 12 % dead at FVU 0.039 / 0.049 / 0.071 (dead at 0.0003 / 0.001: "
            "41 / 32 % at 0.043 / 0.046; docs/real_quality.md)."
        ),
    )
    sparse_l0_bound: int | None = Field(
        None,
        ge=0,
        description="Latents per token (on each feature shard) the sparse step handles, counting "
        "those within the bandwidth below the threshold; a token with more takes a dense row of "
        "its own, and a step with more than 64 such tokens on a shard runs densely instead (same "
        "result, several times slower). 0: always dense. None: 128 where target_l0 is at most "
        "32, else 256 (the step's cost grows with it: on an H200 at 65,536 latents and 8,192 "
        "tokens 13.9 ms at 128 against 19.5 ms at 256; a target-32 run on Gemma 3 270M had no "
        "token past 100; docs/gpu.md).",
    )

    @property
    def steers_l0(self) -> bool:
        """Whether the L0 penalty's weight is steered to ``target_l0`` (architecture state)."""
        return self.target_l0 is not None

    @property
    def l0_bound(self) -> int:
        """``sparse_l0_bound``, or where it is None the bound the target L0 allows."""
        if self.sparse_l0_bound is not None:
            return self.sparse_l0_bound
        return auto_l0_bound(self.target_l0)

    @property
    def nominal_l0(self) -> float:
        """``target_l0``, else ``init_l0``, else the base's assumption (the L0 is learned)."""
        for l0 in (self.target_l0, self.init_l0):
            if l0 is not None:
                return l0
        return super().nominal_l0


def auto_l0_bound(target_l0: float | None) -> int:
    """The sparse step's per-token bound for a run that holds its L0 at ``target_l0``: four
    times the target as a power of two, between 128 and 256; 256 without a target.

    The tail, not the mean, sets it: on Gemma 3 270M layer 6 a run held at L0 35 had 1 % of its
    tokens above 70-83 latents and none above 100 (1M and 4M tokens), so 128 leaves no token a
    dense row. 64 is not offered: at 262,144 latents and 16,384 tokens a planted L0 of 27 put
    more than 64 tokens per shard past it, and the step ran densely (216 ms against 53 at 128).
    """
    if target_l0 is None:
        return 256
    return min(256, max(128, 1 << math.ceil(math.log2(4 * target_l0))))


# Pre-activations held at once while setting thresholds from data (float32: 64 MiB).
QUANTILE_CHUNK_ELEMENTS = 1 << 24


def firing_quantile(params: Params, x: jax.Array, fires: int) -> jax.Array:
    """Per local latent, the threshold above which its pre-activation lies on ``fires`` tokens.

    That is the ``fires + 1``-th largest pre-activation over the global batch (rows sharded
    over ``batch``): each data shard keeps its ``fires + 1`` largest per latent, and the
    largest of their union are the global ones. Feature chunks bound the pre-activations
    held at once to ``QUANTILE_CHUNK_ELEMENTS``.
    """
    rows, n_local = x.shape[0], params["b_enc"].shape[0]
    keep = min(fires + 1, rows)
    chunk = math.gcd(n_local, 1 << max(0, (QUANTILE_CHUNK_ELEMENTS // rows).bit_length() - 1))
    w_enc = params["W_enc"].reshape(-1, n_local // chunk, chunk).transpose(1, 0, 2)
    b_enc = params["b_enc"].reshape(n_local // chunk, chunk)
    centred = x - params["b_dec"]

    def largest(wb: tuple[jax.Array, jax.Array]) -> jax.Array:
        pre = centred @ wb[0] + wb[1]
        return jax.lax.top_k(pre.T, keep)[0]

    top = jax.lax.map(largest, (w_enc, b_enc)).reshape(n_local, keep)
    # The union has at least fires + 1 entries: the caller keeps fires < global batch.
    top = jax.lax.all_gather(top, mesh_axis(BATCH), axis=1, tiled=True)
    return jax.lax.top_k(top, fires + 1)[0][:, fires]


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@jax.custom_vjp
def jumprelu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """``pre * H(pre - threshold)`` with STE gradients for the threshold."""
    return pre * (pre > threshold)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    pre, threshold, bandwidth = res
    grad_pre = g * (pre > threshold)
    grad_threshold = -(threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return grad_pre, jnp.sum(grad_threshold, axis=0), None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Heaviside ``H(pre - threshold)`` with an STE gradient for the threshold only."""
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return step(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _step_bwd(res, g):
    pre, threshold, bandwidth = res
    grad_threshold = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return jnp.zeros_like(pre), jnp.sum(grad_threshold, axis=0), None


step.defvjp(_step_fwd, _step_bwd)

SELECTION_MARGIN = 1e-4
"""Relative slack in the candidate test (times ``1 + threshold``), on top of the bandwidth.

A latent is a candidate when ``matmul + (b_enc - threshold + margin) > 0``: that sum is rounded
differently from ``pre - threshold``, and the slack keeps every pair within half a bandwidth of
the threshold (the estimator's window) a candidate however it rounds."""


def candidate_rank_bias(b_enc: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """``select_slots``'s ``rank_bias`` for JumpReLU: ``b_enc - threshold + margin``, so the
    candidates are the latents within the bandwidth (plus ``SELECTION_MARGIN``) below their
    threshold."""
    margin = bandwidth + SELECTION_MARGIN * (1.0 + jnp.abs(threshold))
    return b_enc - threshold + margin


OVERFLOW_ROWS_PER_SHARD = 64
"""Tokens per shard with more candidates than ``sparse_l0_bound`` that a sparse step still
takes, each through a dense row of its own; more than that on any shard and the step runs
densely. JumpReLU's L0 varies per token with a long tail: on Gemma 3 270M layer 6 an SAE of
mean L0 75 gave 0.7 % of the tokens more than 256 latents (the largest 639), ~30 in a batch of
4,096, and its run, without these rows, was dense at every logged step. The rows cost about
five ``[64, d_model]`` by ``[d_model, n_local]`` products, forward and backward (~8 % of the
encoder matmul's FLOPs at batch 4,096), only in steps that have such tokens (a ``lax.cond``)."""


class JumpOutputs(NamedTuple):
    """This shard's part of a JumpReLU forward pass."""

    partial: jax.Array
    """``[batch, d_model]`` partial reconstruction (without ``b_dec``; sum over shards)."""
    l0: jax.Array
    """Scalar count of active (token, latent) pairs, with the L0 estimator's gradient."""
    l0_per_token: jax.Array
    """``[batch]`` active latents per token (float, no gradient)."""
    fire: jax.Array
    """``[n_local]`` tokens on which each latent is active (float, no gradient)."""
    overflow: jax.Array
    """Whether this step ran densely (too many tokens had more candidates than slots)."""
    saturated: jax.Array
    """Tokens on this shard with more candidates than slots (int32; dense rows or, past
    ``OVERFLOW_ROWS_PER_SHARD`` on any shard, the dense step)."""


def _dense_rows(pre, threshold, bandwidth, w_dec, valid=None):
    """JumpReLU's dense formulas on rows of pre-activations ``[rows, n_local]``: the partial
    reconstruction and the L0 count (both with the estimators' gradients), the active latents
    per row and per latent. Rows where ``valid`` is false count nothing."""
    latents = jumprelu(pre, threshold, bandwidth)
    active = (pre > threshold).astype(jnp.float32)
    l0_terms = step(pre, threshold, bandwidth)
    if valid is not None:
        keep = valid[:, None]
        latents = jnp.where(keep, latents, 0.0)
        active = jnp.where(keep, active, 0.0)
        l0_terms = jnp.where(keep, l0_terms, 0.0)
    return latents @ w_dec, jnp.sum(l0_terms), jnp.sum(active, axis=1), jnp.sum(active, axis=0)


class _JumpReLUPath(NamedTuple):
    """JumpReLU over slots plus a few dense token rows, and all densely.

    ``diff = (b_dec, W_enc, b_enc, W_dec, threshold)``; ``aux = (x, slot pre, slot indices,
    rows, row is valid)``. ``rows`` ``[OVERFLOW_ROWS_PER_SHARD]`` are the tokens with more
    candidates than slots: their slots hold -inf (unused) and they are decoded from their whole
    dense row instead; unused entries repeat token 0 with ``row is valid`` false.
    """

    bandwidth: float
    rows: bool = True
    """Static: decode the overflowing tokens' rows (the step's path when any token overflows);
    without, the rows cost nothing."""
    dense_combine = ("tokens", "sum", "tokens", "sum")

    def dense(self, diff, aux):
        b_dec, w_enc, b_enc, w_dec, threshold = diff
        x = aux[0]
        pre = (x - b_dec) @ w_enc + b_enc
        return per_device(_dense_rows(pre, threshold, self.bandwidth, w_dec))

    def _rows(self, diff, aux):
        """The overflowing tokens' dense rows: ``(partial [rows, d], l0, counts [rows], fire
        [n_local])``; differentiable in ``diff`` through ``partial`` and ``l0``."""
        b_dec, w_enc, b_enc, w_dec, threshold = diff
        x, rows, valid = aux[0], aux[3], aux[4]
        pre = (x[rows] - b_dec) @ w_enc + b_enc
        return _dense_rows(pre, threshold, self.bandwidth, w_dec, valid)

    def sparse(self, diff, aux):
        *_, w_dec, threshold = diff
        _, pre, indices = aux[:3]
        active = pre > jnp.take(threshold, indices)
        values = jnp.where(active, pre, 0.0)
        counts = active.astype(jnp.float32)
        fire = scatter_per_latent(counts, indices, threshold.shape[0])
        partial = decode_slots(values, indices, w_dec)
        l0 = jnp.sum(counts)
        per_token = jnp.sum(counts, axis=1)
        if self.rows:
            rows = aux[3]
            row_partial, row_l0, row_counts, row_fire = self._rows(diff, aux)
            # Invalid rows add zeros (to token 0).
            partial = partial.at[rows].add(row_partial)
            per_token = per_token.at[rows].add(row_counts)
            l0, fire = l0 + row_l0, fire + row_fire
        return per_device((partial, l0, per_token, fire))

    def sparse_grads(self, diff, aux, cotangents):
        b_dec, w_enc, _, w_dec, threshold = diff
        x, pre, indices = aux[:3]
        g_partial, g_l0, _, _ = cotangents
        slot_threshold = jnp.take(threshold, indices)
        active = pre > slot_threshold
        values = jnp.where(active, pre, 0.0)
        grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec = active_pair_grads(
            g_partial, jnp.zeros_like(values), x, b_dec, w_enc, w_dec, values, indices, active
        )
        # Both estimators are nonzero only within half a bandwidth of the threshold, on either
        # side of it: the pairs there need d loss / d latent even when the latent is 0.
        window = _rectangle((pre - slot_threshold) / self.bandwidth) > 0
        g_latent = pair_dots(g_partial, w_dec, indices, window)
        per_pair = -(slot_threshold / self.bandwidth) * g_latent - (1.0 / self.bandwidth) * g_l0
        grad_threshold = scatter_per_latent(
            jnp.where(window, per_pair, 0.0), indices, threshold.shape[0]
        )
        grads = (grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec, grad_threshold)
        if self.rows:
            _, row_vjp = jax.vjp(lambda d: self._rows(d, aux)[:2], diff)
            (row_grads,) = row_vjp((g_partial[aux[3]], g_l0))
            grads = tuple(a + b for a, b in zip(grads, row_grads, strict=True))
        return tuple(vary_over(g, varying_axes(p)) for g, p in zip(grads, diff, strict=True))


def jumprelu_forward(
    params: Params,
    x: jax.Array,
    threshold: jax.Array,
    bandwidth: float,
    bound: int,
    encoder_dtype: EncoderDtype = "float32",
) -> JumpOutputs:
    """JumpReLU latents decoded, on this shard, over at most ``bound`` slots per token.

    Call inside ``shard_map``. ``threshold`` is ``[n_local]``; it and the parameters get the
    dense formulas' gradients exactly (``jumprelu`` and ``step`` above), ``x`` none (it is data).
    Tokens with more than ``bound`` candidates take dense rows of their own, up to
    ``OVERFLOW_ROWS_PER_SHARD`` per shard; a step with more on any shard runs densely.
    ``encoder_dtype`` is the selection matmul's input dtype (the dense path stays float32).
    """
    n_local = params["b_enc"].shape[0]
    bound = min(bound, n_local)
    x = jax.lax.stop_gradient(as_varying(x))
    diff = tuple(
        as_varying(a)
        for a in (params["b_dec"], params["W_enc"], params["b_enc"], params["W_dec"], threshold)
    )
    path = _JumpReLUPath(float(bandwidth))
    if bound == 0:
        outputs = dense_in_chunks(path, diff, (x,))
        return JumpOutputs(*outputs, overflow=jnp.bool_(True), saturated=jnp.int32(x.shape[0]))
    slots = select_slots(
        params,
        x,
        bound,
        candidate_rank_bias(params["b_enc"], threshold, bandwidth),
        ENCODE_CHUNK_TOKENS,
        encoder_dtype,
    )
    saturated = slots.count > bound
    plan = plan_rows(saturated, OVERFLOW_ROWS_PER_SHARD)
    slot_pre = jnp.where(saturated[:, None], -jnp.inf, slots.pre)
    aux = (x, slot_pre, slots.indices, plan.rows, plan.valid)
    outputs = sparse_rows_or_dense(path, plan, diff, aux)
    return JumpOutputs(*outputs, overflow=plan.overflow, saturated=plan.n_saturated)


@register
class JumpReLU(Architecture):
    name = "jumprelu"
    config_cls = JumpReLUConfig
    config: JumpReLUConfig

    def param_axes(self):
        return super().param_axes() | {"log_threshold": (FEATURES,)}

    @property
    def lr_multipliers(self) -> dict[str, float]:
        return {"log_threshold": self.config.threshold_lr_scale}

    def init(self, key, data_mean):
        params = super().init(key, data_mean)
        params["log_threshold"] = jnp.full(
            (self.config.n_features,), math.log(self.config.init_threshold), jnp.float32
        )
        return params

    def state_axes(self):
        # Only runs that steer the weight hold it: older checkpoints keep their layout.
        return {"l0_coef": ()} if self.config.steers_l0 else {}

    def init_state(self) -> ArchState:
        if not self.config.steers_l0:
            return {}
        return {"l0_coef": jnp.float32(self.config.l0_coef)}

    def update_state(self, state: ArchState, stats) -> ArchState:
        cfg = self.config
        if not cfg.steers_l0:
            return state
        # log(0) = -inf clips to -1: an L0 of 0 lowers the weight at the full rate.
        error = jnp.clip(jnp.log(stats["l0"] / cfg.target_l0), -1.0, 1.0)
        return {"l0_coef": state["l0_coef"] * jnp.exp(cfg.l0_coef_rate * error)}

    @property
    def initialises_from_data(self) -> bool:
        return self.config.init_l0 is not None

    def local_data_init(self, params, x, global_batch):
        cfg = self.config
        assert cfg.init_l0 is not None
        fires = max(1, min(global_batch - 1, round(cfg.init_l0 / cfg.n_features * global_batch)))
        threshold = firing_quantile(params, x, fires)
        return params | {
            "log_threshold": jnp.log(jnp.maximum(threshold, cfg.init_threshold)),
        }

    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        pre = preactivations(params, x)
        return jnp.where(pre > jnp.exp(params["log_threshold"]), pre, 0.0)

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        cfg = self.config
        threshold = jnp.exp(params["log_threshold"])
        out = jumprelu_forward(params, x, threshold, cfg.bandwidth, cfg.l0_bound, cfg.encoder_dtype)
        x_hat = jax.lax.psum(out.partial, mesh_axis(FEATURES)) + params["b_dec"]
        recon, metrics = reconstruction_metrics(x, x_hat, out.l0_per_token, ctx.global_batch)
        l0 = jax.lax.psum(global_sum(out.l0), mesh_axis(FEATURES)) / ctx.global_batch
        l0_coef = state["l0_coef"] if cfg.steers_l0 else cfg.l0_coef
        sparsity = l0_coef * ctx.sparsity_scale * l0
        fire_counts = global_sum(out.fire.astype(jnp.int32))
        loss = recon + sparsity
        metrics |= {
            "sparsity_loss": sparsity,
            "dense_fallback": out.overflow.astype(jnp.float32),
            # (token, shard) pairs that took a dense row (or, past the bound, the dense step).
            "saturated_tokens": jax.lax.psum(
                out.saturated, (mesh_axis(BATCH), mesh_axis(FEATURES))
            ).astype(jnp.float32),
        }
        state_stats = {}
        if cfg.steers_l0:
            state_stats = {"l0": l0}
            metrics["l0_coef"] = l0_coef
        if cfg.revive_coef > 0:
            silent = fire_counts == 0
            if cfg.revive_scope == "dead":
                silent = silent & dead
            pull = cfg.revive_coef * silent_latent_pull(
                params, x, threshold, silent, ctx.global_batch
            )
            loss = loss + pull
            metrics["revive_loss"] = pull
        metrics["loss"] = loss
        return loss, LocalOutputs(metrics=metrics, fire_counts=fire_counts, state_stats=state_stats)


def silent_latent_pull(
    params: Params, x: jax.Array, threshold: jax.Array, silent: jax.Array, global_batch: int
) -> jax.Array:
    """Mean over the global batch of ``Σ_i relu(threshold_i - pre_i)`` over the ``silent``
    latents (this shard's, summed over shards): Anthropic's pre-activation loss on the latents
    that fired on no token of the batch (``revive_scope``: and are dead, or all of them).

    A latent that fired on no token of the batch has ``pre <= threshold`` on every token, so the
    relu is the identity there and the sum over tokens is ``n threshold_i - Σ_t pre_ti`` with
    ``Σ_t pre_ti = (Σ_t x_t - n b_dec) @ W_enc[:, i] + n b_enc_i``: linear in the batch sum, one
    ``[d_model] @ [d_model, n_local]`` product instead of a pass over the tokens. ``b_dec`` gets
    no gradient from it (the pull moves the dead latents, not the shared bias).
    """
    n_local = x.shape[0]
    centred_sum = jax.lax.stop_gradient(
        jnp.sum(x, axis=0) - n_local * params["b_dec"]
    )  # this device's tokens
    pre_sum = centred_sum @ params["W_enc"] + n_local * params["b_enc"]
    gap = jnp.where(silent, n_local * threshold - pre_sum, 0.0)
    return jax.lax.psum(global_sum(jnp.sum(gap)), mesh_axis(FEATURES)) / global_batch
