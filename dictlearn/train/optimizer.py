"""Optax optimizer and schedules."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from dictlearn.train.config import OptimizerConfig


def decay_start_step(cfg: OptimizerConfig, total_steps: int) -> int:
    """First step of the linear decay; the lr is the same for every run length before it.

    So a run of ``total_steps`` can branch from a longer constant-lr run's checkpoint at any
    step up to here (``TrainConfig.init``) and be the same run as one trained from scratch.
    """
    if cfg.schedule_free:
        return total_steps
    decay_steps = round(cfg.decay_fraction * total_steps)
    return max(total_steps - decay_steps, cfg.warmup_steps)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr``, constant, then linear decay to 0 over ``decay_fraction``.

    Schedule-free optimizers never decay (``decay_start_step`` is the run's end).
    """
    if cfg.lr is None:  # a caller's bug: TrainConfig.resolved_optimizer fills it in
        raise ValueError("optimizer.lr is null here: pass TrainConfig.resolved_optimizer")
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


def scale_named_updates(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of the named top-level parameters by their factor (no state)."""

    def update_fn(updates, state, params=None):
        del params
        scaled = {
            name: u * multipliers[name] if name in multipliers else u for name, u in updates.items()
        }
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, lr_multipliers: Mapping[str, float] | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping (if set), then ``cfg.name`` on the learning-rate schedule.

    ``lr_multipliers`` (``Architecture.lr_multipliers``) scale the named parameters' updates,
    i.e. their learning rate; factors of 1 are dropped, and with none left the chain (and so the
    checkpointed optimizer state) is the same as without them. For the schedule-free optimizers
    the scaling sits inside the wrapper, on the base step, so its average stays consistent.

    For the schedule-free optimizers the last element of the chain's state is optax's
    ``ScheduleFreeState``; the train step keeps the parameter average (the point to evaluate and
    export) as the state's parameters, see :func:`schedule_free_train_point`.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    multipliers = {k: float(v) for k, v in (lr_multipliers or {}).items() if v != 1.0}
    scaled = [scale_named_updates(multipliers)] if multipliers else []
    parts = []
    if cfg.grad_clip is not None:
        parts.append(clip_by_global_norm(cfg.grad_clip))
    if cfg.name == "adam":
        parts += [optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), *scaled]
    elif cfg.name == "lion":
        parts += [optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=0.0), *scaled]
    elif cfg.name == "schedule_free_adamw":
        # b1=0 Adam inside (the wrapper supplies the momentum), as optax.contrib's own
        # schedule_free_adamw does; built here so the warm-up is ours and weight decay is off.
        base = optax.chain(
            optax.scale_by_adam(b1=0.0, b2=cfg.b2, eps=cfg.eps),
            optax.scale_by_learning_rate(schedule),
            *scaled,
        )
        parts.append(optax.contrib.schedule_free(base, schedule, b1=cfg.b1))
    elif cfg.name == "schedule_free_sign":
        base = optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(schedule), *scaled)
        parts.append(optax.contrib.schedule_free(base, schedule, b1=cfg.b1))
    else:  # the config's Literal makes this unreachable
        raise ValueError(f"optimizer.name={cfg.name!r} is not supported")
    return optax.chain(*parts)


def schedule_free_train_point(opt_state, average):
    """The point a schedule-free optimizer evaluates gradients at, from its parameter average.

    optax keeps the gradient point ``y`` as the parameters and recovers the average
    ``x = (y - (1 - b1) z) / b1`` for evaluation. We keep ``x`` instead, so that everything
    that reads a checkpoint (eval, export, branches) sees the parameters to use, and form
    ``y = b1 x + (1 - b1) z`` inside the step.
    """
    sf = opt_state[-1]
    return jax.tree.map(lambda x, z: sf.b1 * x + (1.0 - sf.b1) * z, average, sf.z)


def schedule_free_average(opt_state, train_point):
    """The parameter average ``x`` after an update that moved the gradient point to ``y``."""
    return optax.contrib.schedule_free_eval_params(opt_state[-1], train_point)
