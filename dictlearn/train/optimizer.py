"""Optax optimizer and schedules."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from dictlearn.train.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr``, constant, then linear decay to 0 over ``decay_fraction``."""
    decay_steps = round(cfg.decay_fraction * total_steps)
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        decay = jnp.clip((total_steps - step) / max(total_steps - decay_start, 1), 0.0, 1.0)
        return cfg.lr * warm * jnp.where(step >= decay_start, decay, 1.0)

    return schedule


def sparsity_schedule(cfg: OptimizerConfig):
    """Multiplier on the sparsity penalty: 0 → 1 linearly over ``sparsity_warmup_steps``."""

    def schedule(step):
        if cfg.sparsity_warmup_steps == 0:
            return jnp.float32(1.0)
        return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / cfg.sparsity_warmup_steps)

    return schedule


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adam(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    )
    return optax.chain(*parts)
