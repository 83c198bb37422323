"""AuxK (Gao et al. 2024): dead latents reconstruct the main model's residual error.

Latents that have not fired for ``dead_window_tokens`` are "dead"; the ``k_aux`` largest dead
pre-activations of each token reconstruct the residual ``x - x_hat`` of the main model, and
``aux_coef`` times that squared error, in the reconstruction loss's units (summed over d_model,
averaged over tokens), joins the loss, pulling dead latents back. The logged ``aux_loss`` is the
same error divided by the residual's variance (1: the dead latents explain none of it).

TopK and BatchTopK use it the same way, in one of two exact variants (``WithAuxK``): with at
most ``4 * k_aux`` latents dead, the usual case, dense matmuls over the dead latents' gathered
columns; past that, the dead latents' top-``k_aux`` shares the encoder matmul's chunked pass with
the main selection (``topk.local_top_k_candidates`` takes both requests), and the auxiliary
decoder and its backward pass gather only the picked latents. The trainer's step holds both and
picks on the device, from the dead count (``TrainProgram.step_fn``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from dictlearn.sae.base import (
    BaseSAEConfig,
    LossContext,
    Params,
    encoder_matmul,
    global_sum,
    with_encoder_dtype,
)
from dictlearn.sae.sparse import sparse_topk_forward
from dictlearn.sae.topk_select import Selection, select_shard_winners, top_k
from sharding import FEATURES, mesh_axis


class AuxKConfig(BaseSAEConfig):
    """Fields of an architecture with the AuxK dead-latent loss."""

    k_aux: int = Field(
        256, ge=0, description="Dead latents used by the AuxK loss per token (0 disables it)."
    )
    aux_coef: float = Field(
        0.5,
        ge=0,
        description=(
            "Weight of the AuxK loss. On Gemma 3 270M activations (TopK) 0.5 left 0.80 % of the "
            "latents dead at 1M tokens (mean of four seeds, 0.59-1.02 %; 1/32, the default "
            "before: 12.8 %) for 5.6 % higher FVU, and at 4M tokens 0.06 % (1/32: 0.49 %) at "
            "equal FVU; on planted data the two are equal. Smaller trades live latents for "
            "reconstruction early in a run. BatchTopK at 1M tokens: 0.5 left 1.8 % dead, 1.0 "
            "0.69 % for 5.9 % higher FVU and spliced CE 2.887 instead of 2.847; at 4M tokens "
            "0.5 left 0.20 % (docs/real_quality.md)."
        ),
    )
    aux_gradient: Literal["relu", "straight_through"] = Field(
        "straight_through",
        description=(
            "How AuxK's loss reaches a picked dead latent's encoder: through its ReLU as in Gao "
            "et al. (no gradient where the pre-activation is below 0), or straight through "
            "(the gradient it would get if it fired). On Gemma 3 270M activations (TopK) at 1M "
            "tokens straight through left 12.8 % of the latents dead instead of 35.4 %, at the "
            "same FVU and spliced loss (docs/real_quality.md)."
        ),
    )


DENSE_AUX_CAPACITY_PER_K_AUX = 4
"""The compact AuxK variant runs while at most this many times ``k_aux`` latents are dead."""


class WithAuxK:
    """Architecture mixin: the AuxK request, switch and loss term for an ``AuxKConfig``.

    Two exact ways to the same loss and gradients:

    - **sparse** (any number of dead latents): the dead latents' top-``k_aux`` per token comes
      from the encoder's chunked pass over all latents, and the auxiliary decoder and its
      backward pass gather the ``k_aux`` picked rows per token (``sparse_topk_forward``);
    - **compact** (at most ``dense_dead_capacity`` dead, the usual case): the dead latents'
      columns are gathered once per step and everything runs as dense matmuls over them. On
      CPU at 16,384 latents and k_aux 256 the sparse variant more than doubled a TopK step;
      per-token gathers of 256 rows cost far more than matmuls over ~1,000 columns.
    """

    config: AuxKConfig

    @property
    def uses_dead_latents(self) -> bool:
        return self.config.k_aux > 0 and self.config.aux_coef > 0

    @property
    def k_aux(self) -> int:
        """Dead latents AuxK picks per token over all shards: ``k_aux``, at most every latent."""
        return min(self.config.k_aux, self.config.n_features)

    @property
    def dense_dead_capacity(self) -> int:
        return min(DENSE_AUX_CAPACITY_PER_K_AUX * self.k_aux, self.config.n_features)

    def _runs(self, ctx: LossContext) -> bool:
        """Whether this step computes AuxK (it is on, and the step was compiled with dead
        latents)."""
        return self.uses_dead_latents and ctx.any_dead

    def aux_requests(
        self, b_enc: jax.Array, dead: jax.Array, ctx: LossContext
    ) -> list[tuple[int, jax.Array]]:
        """What AuxK adds to the encoder pass's requests: the sparse variant's one request."""
        if not self._runs(ctx) or ctx.few_dead:
            return []
        return [self.dead_candidates_request(b_enc, dead)]

    def dead_candidates_request(self, b_enc: jax.Array, dead: jax.Array) -> tuple[int, jax.Array]:
        """The ``(k, bias)`` request for ``local_top_k_candidates``: this shard's top dead latents.

        A shard holds at most ``min(k_aux, n_local)`` of a token's winners. The -inf bias makes
        a live latent's pre-activation -inf, so it can only be picked when fewer than ``k_aux``
        latents are dead (and is then dropped in :meth:`aux_loss`).
        """
        return min(self.config.k_aux, b_enc.shape[0]), jnp.where(dead, b_enc, -jnp.inf)

    def aux_loss(
        self,
        params: Params,
        x: jax.Array,
        x_hat: jax.Array,
        dead: jax.Array,
        candidates: list[tuple[jax.Array, jax.Array]],
        ctx: LossContext,
    ) -> tuple[jax.Array, jax.Array]:
        """Error of reconstructing the residual from the dead latents' ``k_aux`` winners: in
        the reconstruction loss's units (what the loss adds), and divided by the residual's
        variance (the metric); ``(0, 0)`` on a step compiled without dead latents.

        ``candidates`` are the encoder pass's answers to :meth:`aux_requests` (empty for the
        compact variant).

        The loss term is in the main loss's units, so that ``aux_coef`` weighs the same against
        the reconstruction at any d_model and input scale (sparsify adds ``auxk_alpha`` x this
        error / the batch's total variance to its FVU: the same ratio). Divided by the residual's
        variance, as before, the term was ~1 while the reconstruction loss is the residual's
        variance per token (~40 on the planted proxy at d_model 160, more at 640): latents that
        died mid-run under Adam, whose second moments still remembered their live gradients,
        got almost no pull back (bench/planted_quality.py; docs/planted_quality.md).
        """
        if not self._runs(ctx):
            return jnp.float32(0.0), jnp.float32(0.0)
        straight_through = self.config.aux_gradient == "straight_through"
        if ctx.few_dead:
            partial = self._compact_aux_partial(params, x, dead, straight_through)
        else:
            (candidates_dead,) = candidates
            selection: Selection = select_shard_winners(*candidates_dead, k=self.k_aux)
            # Fewer than k_aux dead latents on a shard: the -inf picks are not dead, drop them.
            mask = selection.mask & jnp.isfinite(selection.values)
            _, partial = sparse_topk_forward(
                params, x, selection._replace(mask=mask), straight_through=straight_through
            )
        aux_hat = jax.lax.psum(partial, mesh_axis(FEATURES))
        residual = jax.lax.stop_gradient(x - x_hat)
        err = global_sum(jnp.sum((aux_hat - residual) ** 2))
        mean_res = global_sum(jnp.sum(residual, axis=0)) / ctx.global_batch
        var = global_sum(jnp.sum((residual - mean_res) ** 2))
        return err / ctx.global_batch, err / jnp.maximum(var, 1e-12)

    def _compact_aux_partial(
        self, params: Params, x: jax.Array, dead: jax.Array, straight_through: bool
    ) -> jax.Array:
        """This shard's AuxK reconstruction by dense matmuls over its (at most
        ``dense_dead_capacity``) dead latents' gathered columns; the same winners, values and
        gradients as the sparse variant's per-token gathers."""
        slots = min(self.dense_dead_capacity, dead.shape[0])
        (dead_index,) = jnp.nonzero(dead, size=slots, fill_value=0)
        real = jnp.arange(slots) < jnp.sum(dead)
        w_enc = params["W_enc"][:, dead_index]
        encoder_params = {"W_enc": w_enc, "b_dec": params["b_dec"]}
        if self.config.encoder_dtype != "float32":
            # The selection's pre-activations at the encoder's dtype, as the sparse variant's
            # chunked pass computes them; gradients flow through the float32 product below.
            ranked = encoder_matmul(
                with_encoder_dtype(encoder_params, self.config.encoder_dtype), x
            )
            ranked = jax.lax.stop_gradient(ranked)
            pre = encoder_matmul(encoder_params, x)
            pre = ranked + (pre - jax.lax.stop_gradient(pre))
        else:
            pre = encoder_matmul(encoder_params, x)
        pre = pre + params["b_enc"][dead_index]
        k = min(self.config.k_aux, slots)
        values, slot = top_k(jax.lax.stop_gradient(pre), k, jnp.where(real, 0.0, -jnp.inf))
        selection = select_shard_winners(values, slot, k=self.k_aux)
        won = selection.mask & jnp.isfinite(selection.values)
        rows = jnp.arange(pre.shape[0])[:, None]
        # Unmasked slots hold garbage indices that may repeat a winner's: add, never overwrite.
        chosen = jnp.zeros(pre.shape, jnp.int32).at[rows, selection.indices].add(won) > 0
        active = jax.nn.relu(pre)
        if straight_through:
            active = pre + jax.lax.stop_gradient(active - pre)
        return jnp.where(chosen, active, 0.0) @ params["W_dec"][dead_index]


__all__ = ["AuxKConfig", "WithAuxK"]
