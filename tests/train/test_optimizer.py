"""dictlearn's global-norm clip against optax's, and the optimizer state layout checkpoints use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dictlearn.train.config import OptimizerConfig
from dictlearn.train.optimizer import clip_by_global_norm, make_optimizer


def _grads(scale: float) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "W": jnp.asarray(rng.normal(size=(33, 17)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(17,)) * scale, jnp.float32),
    }


@pytest.mark.parametrize("scale", [0.001, 10.0])  # under the clip norm, then over it
def test_clip_equals_optax_clip_by_global_norm(scale: float) -> None:
    grads = _grads(scale)
    ours, _ = jax.jit(clip_by_global_norm(1.0).update)(grads, optax.EmptyState())
    theirs, _ = jax.jit(optax.clip_by_global_norm(1.0).update)(grads, optax.EmptyState())
    clipped = float(optax.tree.norm(grads)) >= 1.0
    assert clipped == (scale > 1)
    for key in grads:
        if clipped:  # t * (max / norm) vs (t / norm) * max: float32 rounding apart
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    if clipped:
        np.testing.assert_allclose(float(optax.tree.norm(ours)), 1.0, rtol=1e-6)


def test_optimizer_state_has_optax_layout() -> None:
    """Same pytree as optax's own chain, so checkpoints written before the change restore."""
    params = _grads(1.0)
    cfg = OptimizerConfig()
    schedule = optax.constant_schedule(cfg.lr)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    ours = make_optimizer(cfg, total_steps=10).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(reference.init(params))
