"""dictlearn's global-norm clip against optax's, the optimizer state layout checkpoints use, and
every ``optimizer.name`` trained and resumed end to end."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dictlearn.tracking import read_metrics
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.optimizer import (
    clip_by_global_norm,
    decay_start_step,
    learning_rate_schedule,
    make_optimizer,
    schedule_free_average,
    schedule_free_train_point,
)
from dictlearn.train.trainer import main
from tests.train.helpers import (
    assert_trees_equal,
    make_planted,
    restore_final,
    tiny_config,
    with_overrides,
)


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
    cfg = OptimizerConfig(lr=4e-4)
    schedule = optax.constant_schedule(cfg.lr)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    ours = make_optimizer(cfg, total_steps=10).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(reference.init(params))


@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sign"])
def test_schedule_free_average_form_follows_optax(name: str) -> None:
    """Keeping the average x as the parameters (our step) traces optax's own y-form iterates.

    The target stays farther from the start than the steps can travel, so no coordinate crosses
    its optimum: there a sign step flips on float32 rounding, which says nothing about the forms.
    """
    target = {k: jnp.sign(v) * (1.0 + jnp.abs(v)) for k, v in _grads(1.0).items()}
    cfg = OptimizerConfig(name=name, lr=0.01, warmup_steps=3, b1=0.95, grad_clip=None)
    opt = make_optimizer(cfg, total_steps=40)

    def grad(p):
        return jax.grad(lambda q: sum(jnp.sum((q[k] - target[k]) ** 2) for k in q))(p)

    start = {k: jnp.zeros_like(v) for k, v in target.items()}
    y, ref_state = start, opt.init(start)  # optax's form: the gradient point is the params
    x, state = start, opt.init(start)  # ours: the average is the params
    for _ in range(40):
        updates, ref_state = opt.update(grad(y), ref_state, y)
        y = optax.apply_updates(y, updates)
        point = schedule_free_train_point(state, x)
        updates, state = opt.update(grad(point), state, point)
        x = schedule_free_average(state, optax.apply_updates(point, updates))
    expected = optax.contrib.schedule_free_eval_params(ref_state[-1], y)
    for key in target:
        np.testing.assert_allclose(x[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # ...and the average moved towards the minimum.
    distance = optax.tree.norm(jax.tree.map(jnp.subtract, x, target))
    assert float(distance) < 0.95 * float(optax.tree.norm(target))


def test_schedule_free_never_decays() -> None:
    cfg = OptimizerConfig(name="schedule_free_sign", lr=4e-4, warmup_steps=10, decay_fraction=0.5)
    schedule = learning_rate_schedule(cfg, total_steps=100)
    assert decay_start_step(cfg, 100) == 100
    assert float(schedule(99)) == pytest.approx(cfg.lr)
    assert float(schedule(4)) == pytest.approx(cfg.lr / 2)


def test_schedule_free_needs_momentum() -> None:
    with pytest.raises(ValueError, match=r"optimizer\.b1 must be > 0"):
        OptimizerConfig(name="schedule_free_sign", b1=0.0)


@pytest.mark.parametrize("name", ["lion", "schedule_free_adamw", "schedule_free_sign"])
def test_new_optimizers_train_and_resume_bit_identical(name: str, tmp_path) -> None:
    """On a sharded tiny run, each optimizer (Adam's resume is tested in test_resume) stays
    finite, and a run stopped half way and resumed from its checkpoint (the schedule-free
    average, z and weight sum included) ends bit-identical to one that never stopped."""
    data = tmp_path / "data"
    make_planted(data)
    # No decay, so the 10-step run's schedule is the 20-step run's up to step 10 (lion decays).
    optimizer = {"name": name, "lr": 1e-3, "decay_fraction": 0.0}
    common = {"optimizer": optimizer, "checkpoint": {"every_steps": 10}}
    whole = tiny_config(tmp_path / "whole", data, train={"steps": 20}, **common)
    result = main(whole)
    assert result.steps == 20 and not result.preempted
    losses = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    halves = tiny_config(tmp_path / "halves", data, train={"steps": 10}, **common)
    main(halves)
    main(with_overrides(halves, "train.steps=20"))
    _, expected = restore_final(whole)
    _, actual = restore_final(with_overrides(halves, "train.steps=20"))
    assert_trees_equal(actual.state, expected.state)


@pytest.mark.parametrize("name", ["adam", "lion", "schedule_free_sign"])
def test_b_dec_stays_at_the_data_mean_when_not_learned(name: str, tmp_path) -> None:
    """``sae.learn_b_dec=false`` keeps b_dec exactly at its initial value (the normalised data
    mean) under every optimizer kind, while the other parameters train; learned, it moves."""
    from dictlearn.data import ActivationDataset

    data = tmp_path / "data"
    make_planted(data)
    dataset = ActivationDataset.open(str(data))
    initial = np.asarray(jnp.asarray(dataset.mean) * dataset.norm_scale)
    moved = {}
    for learn in (False, True):
        config = tiny_config(
            tmp_path / f"{name}-{learn}",
            data,
            train={"steps": 8},
            optimizer={"name": name, "lr": 1e-2},
            sae={"learn_b_dec": learn},
        )
        main(config)
        _, restored = restore_final(config)
        params = jax.device_get(restored.state.params)
        moved[learn] = float(np.max(np.abs(params["b_dec"] - initial)))
        assert np.all(np.isfinite(params["W_enc"]))
    assert moved[False] == 0.0
    assert moved[True] > 1e-3


@pytest.mark.parametrize("name", ["adam", "lion", "schedule_free_adamw", "schedule_free_sign"])
def test_lr_multiplier_scales_only_the_named_parameter(name: str) -> None:
    """``lr_multipliers`` (JumpReLU's threshold_lr_scale) moves the named parameter c times as
    far per step and leaves the others' steps as they were; a factor of 1 leaves the optimizer,
    and so the checkpointed state's layout, exactly as without it."""
    params = {k: jnp.zeros_like(v) for k, v in _grads(1.0).items()}
    cfg = OptimizerConfig(name=name, lr=1e-3, warmup_steps=1, grad_clip=1.0)
    plain = make_optimizer(cfg, total_steps=10)
    scaled = make_optimizer(cfg, total_steps=10, lr_multipliers={"b": 7.0})
    same = make_optimizer(cfg, total_steps=10, lr_multipliers={"b": 1.0})
    assert jax.tree.structure(same.init(params)) == jax.tree.structure(plain.init(params))

    grads = _grads(3.0)  # over the clip norm: the clip sees the unscaled gradients
    p_plain, s_plain = params, plain.init(params)
    p_scaled, s_scaled = params, scaled.init(params)
    for _ in range(3):
        u_plain, s_plain = plain.update(grads, s_plain, p_plain)
        u_scaled, s_scaled = scaled.update(grads, s_scaled, p_scaled)
        p_plain = optax.apply_updates(p_plain, u_plain)
        p_scaled = optax.apply_updates(p_scaled, u_scaled)
    assert float(jnp.max(jnp.abs(p_plain["b"]))) > 0
    # The gradients are constant and no coordinate reaches an optimum, so every step of "b"
    # (and the schedule-free average of them) is c times the unscaled one.
    np.testing.assert_allclose(p_scaled["b"], 7.0 * p_plain["b"], rtol=1e-5)
    np.testing.assert_array_equal(p_scaled["W"], p_plain["W"])
