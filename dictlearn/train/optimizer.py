"""Optax optimizer and schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dictlearn.train.config import OptimizerConfig


def decay_start_step(cfg: OptimizerConfig, total_steps: int) -> int:
    """First step of the linear decay; the lr is the same for every run length before it.

    So a run of ``total_steps`` can branch from a longer constant-lr run's checkpoint at any
    step up to here (``TrainConfig.init``) and be the same run as one trained from scratch.
    """
    decay_steps = round(cfg.decay_fraction * total_steps)
    return max(total_steps - decay_steps, cfg.warmup_steps)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr``, constant, then linear decay to 0 over ``decay_fraction``."""
    decay_start = decay_start_step(cfg, total_steps)

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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` as one multiply by a scalar factor.

    optax divides every element by the norm; XLA will not duplicate a divide into each consumer,
    so the clipped gradients (as large as the parameters) get stored and read back by Adam's two
    moment updates. A multiply fuses into both. The results agree to float32 rounding, and
    exactly when no clipping is needed. The state is optax's (empty), so checkpoints match.
    """

    def update_fn(updates, state, params=None):
        del params
        g_norm = optax.tree.norm(updates)
        factor = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm).astype(g_norm.dtype)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if set) then Adam on the learning-rate schedule."""
    parts = []
    if cfg.grad_clip is not None:
        parts.append(clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adam(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    )
    return optax.chain(*parts)
