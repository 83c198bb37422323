"""The default learning rate: the fitted law, resolved per run (and per group member)."""

from __future__ import annotations

import math

import pytest

from dictlearn.config import validate
from dictlearn.train.config import GroupTrainConfig, TrainConfig
from dictlearn.train.lr_law import (
    FITTED_BATCH_SIZE,
    FITTED_D_MODEL,
    LR_LAW_C,
    LR_LAW_DELTA,
    LR_LAW_GAMMA,
    default_lr,
    extrapolation_note,
)
from dictlearn.train.optimizer import learning_rate_schedule


def _config(**sections) -> dict:
    return {"data": {"path": "/data/acts"}, **sections}


def test_law_matches_its_constants_and_falls_with_width_and_tokens() -> None:
    assert default_lr(4096, 245_760) == pytest.approx(
        LR_LAW_C * 4096**LR_LAW_GAMMA * 245_760**LR_LAW_DELTA, rel=1e-12
    )
    assert default_lr(4096, 245_760) == pytest.approx(3.92e-3, rel=0.01)
    assert default_lr(8192, 245_760) < default_lr(4096, 245_760)
    assert default_lr(4096, 2 * 245_760) < default_lr(4096, 245_760)
    with pytest.raises(ValueError):
        default_lr(0, 100)


def test_rule_reads_the_law_in_steps_and_scales_with_width() -> None:
    """At the fitted batch and width the rule is the law; at 4x the batch, the law at the tokens
    of the same number of steps; at a quarter of the width, twice the lr (the planted evidence:
    7.6e-3 on the proxy, 3.0e-3 at full size, both at 1M tokens and batch 4,096)."""
    n, tokens = 4096, 1 << 20
    assert default_lr(n, tokens, FITTED_BATCH_SIZE, FITTED_D_MODEL) == default_lr(n, tokens)
    assert default_lr(n, tokens, 4 * FITTED_BATCH_SIZE) == pytest.approx(
        default_lr(n, tokens // 4), rel=1e-12
    )
    assert default_lr(n, tokens, d_model=FITTED_D_MODEL // 4) == pytest.approx(
        2 * default_lr(n, tokens), rel=1e-12
    )
    assert default_lr(n, tokens, 4096, 160) == pytest.approx(7.6e-3, rel=0.01)
    assert default_lr(16384, tokens, 4096, 640) == pytest.approx(3.0e-3, rel=0.01)
    with pytest.raises(ValueError):
        default_lr(n, tokens, 0)


def test_unset_lr_resolves_from_n_and_tokens_and_an_explicit_one_wins() -> None:
    cfg = validate(
        TrainConfig,
        _config(
            sae={"architecture": "topk", "n_features": 2048},
            optimizer={"warmup_steps": 10},
            train={"steps": 100, "batch_size": 512},
        ),
    )
    assert cfg.optimizer.lr is None  # the config (and its hash) records "the law"
    assert cfg.resolved_optimizer(16).lr == pytest.approx(default_lr(2048, 51_200, 512, 16))
    schedule = learning_rate_schedule(cfg.resolved_optimizer(16), 100)
    assert math.isclose(float(schedule(50)), default_lr(2048, 51_200, 512, 16), rel_tol=1e-6)
    explicit = validate(TrainConfig, _config(optimizer={"lr": 1e-3}))
    assert explicit.resolved_optimizer(16).lr == 1e-3
    with pytest.raises(ValueError, match="resolved_optimizer"):
        learning_rate_schedule(cfg.optimizer, 100)


def test_group_members_each_get_their_own_widths_lr() -> None:
    group = validate(
        GroupTrainConfig,
        _config(
            train={"steps": 64, "batch_size": 1024},
            group=[
                {"name": "small", "sae": {"n_features": 1024}},
                {"name": "large", "sae": {"n_features": 16384}},
                {"name": "fixed", "sae": {"n_features": 1024}, "optimizer": {"lr": 0.01}},
            ],
        ),
    )
    small, large, fixed = (m.resolved_optimizer(640).lr for m in group.members())
    assert small == pytest.approx(default_lr(1024, 65_536))
    assert large == pytest.approx(default_lr(16384, 65_536))
    assert fixed == 0.01


def test_extrapolation_is_named_only_far_outside_the_fit() -> None:
    assert extrapolation_note(4096, 1_000_000) is None
    note = extrapolation_note(1 << 20, 4_000_000_000)
    assert note is not None
    assert "sae.n_features=1,048,576" in note and "tokens=4,000,000,000" in note
