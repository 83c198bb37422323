"""JumpReLU SAE trained as in Gemma Scope (Rajamanoharan et al. 2024).

``f = pre * H(pre - theta)`` with a learned per-latent threshold ``theta = exp(log_threshold)``.
The step function has zero gradient almost everywhere, so ``theta`` is trained through
straight-through estimators: a rectangle kernel of width ``bandwidth`` around the threshold
gives pseudo-derivatives for both the JumpReLU itself and the L0 penalty
``l0_coef * sum_i H(pre_i - theta_i)``.
"""

from __future__ import annotations

import math
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
    as_varying,
    finish_reconstruction,
    fire_counts_from_dense,
    global_sum,
    preactivations,
    reconstruction_metrics,
    register,
)
from sharding import FEATURES, mesh_axis


class JumpReLUConfig(BaseSAEConfig):
    """JumpReLU SAE."""

    architecture: Literal["jumprelu"] = "jumprelu"
    sparsity_penalty: ClassVar[bool] = True
    l0_coef: float = Field(1.0, ge=0, description="Weight of the L0 sparsity penalty.")
    bandwidth: float = Field(
        0.001, gt=0, description="Width of the rectangle kernel of the straight-through estimator."
    )
    init_threshold: float = Field(0.001, gt=0, description="Initial threshold of every latent.")


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


@register
class JumpReLU(Architecture):
    name = "jumprelu"
    config_cls = JumpReLUConfig
    config: JumpReLUConfig

    def param_axes(self):
        return super().param_axes() | {"log_threshold": (FEATURES,)}

    def init(self, key, data_mean):
        params = super().init(key, data_mean)
        params["log_threshold"] = jnp.full(
            (self.config.n_features,), math.log(self.config.init_threshold), jnp.float32
        )
        return params

    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        pre = preactivations(params, x)
        return jnp.where(pre > jnp.exp(params["log_threshold"]), pre, 0.0)

    def local_loss(self, params, x, state, dead, ctx: LossContext):
        cfg = self.config
        pre = preactivations(params, x)
        # Replicated over data; per-device STE cotangents must then be summed over data.
        threshold = as_varying(jnp.exp(params["log_threshold"]))
        latents = jumprelu(pre, threshold, cfg.bandwidth)
        x_hat = finish_reconstruction(latents @ params["W_dec"], params["b_dec"])
        active = pre > threshold
        recon, metrics = reconstruction_metrics(x, x_hat, jnp.sum(active, axis=1), ctx.global_batch)
        l0_local = jnp.sum(step(pre, threshold, cfg.bandwidth))
        l0 = jax.lax.psum(global_sum(l0_local), mesh_axis(FEATURES)) / ctx.global_batch
        sparsity = cfg.l0_coef * ctx.sparsity_scale * l0
        loss = recon + sparsity
        metrics |= {"sparsity_loss": sparsity, "loss": loss}
        return loss, LocalOutputs(
            metrics=metrics, fire_counts=fire_counts_from_dense(active), state_stats={}
        )
