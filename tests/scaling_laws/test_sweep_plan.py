"""Sweep planning: the grid, random points, names, token budgets and branched decays."""

from __future__ import annotations

from typing import Any

import pytest

from dictlearn.config import ConfigError, validate
from scaling_laws.sweep import SweepConfig, format_lr, plan_sweep, plan_trials


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        both = isinstance(value, dict) and isinstance(a.get(key), dict)
        out[key] = _merge(a[key], value) if both else value
    return out


def _sweep_dict(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "s",
        "output_dir": "/out",
        "base": {
            "data": {"path": "/data", "eval_fraction": 0.1},
            "sae": {"architecture": "topk", "n_features": 8, "k": 4},
            "optimizer": {"warmup_steps": 2, "decay_fraction": 0.25},
            "train": {"batch_size": 64},
        },
        "grid": {"n_features": [32, 64], "lr": [1e-3, 3e-4], "tokens": [1280, 2560]},
    }
    return _merge(base, fields)


def _sweep(**fields: Any) -> SweepConfig:
    return validate(SweepConfig, _sweep_dict(**fields))


def test_grid_names_steps_and_run_dirs() -> None:
    trials = plan_trials(_sweep())
    names = [t.name for t in trials]
    assert len(names) == 8 == len(set(names))
    assert "topk-n32-k4-lr1e-03-t1280" in names and "topk-n64-k4-lr3e-04-t2560" in names
    t = next(t for t in trials if t.name == "topk-n64-k4-lr3e-04-t2560")
    c = t.config
    assert (c.sae.n_features, c.sae.k, c.optimizer.lr, c.train.steps) == (64, 4, 3e-4, 40)
    assert (c.run.output_dir, c.run.name, c.tracker.group) == ("/out/s/trials", t.name, "s")
    assert t.run_dir == f"/out/s/trials/{t.name}" and t.trunk is None and c.init is None


def test_k_and_architecture_axes() -> None:
    cfg = _sweep(
        grid={"k": [2, 4], "architecture": ["topk", "jumprelu"], "n_features": [32]},
        sae_overrides={"jumprelu": {"l0_coef": 0.5}},
    )
    names = [t.name for t in plan_trials(cfg)]
    # topk: 2 k x 2 lr x 2 tokens; jumprelu has no k: 2 lr x 2 tokens.
    assert len(names) == 12 == len(set(names))
    jump = next(t for t in plan_trials(cfg) if t.name.startswith("jumprelu"))
    assert jump.name == "jumprelu-n32-lr1e-03-t1280" and jump.config.sae.l0_coef == 0.5


def test_random_samples_are_deterministic_by_seed() -> None:
    def names(seed: int) -> list[str]:
        cfg = _sweep(random={"samples": 5, "seed": seed, "lr_log_range": [1e-4, 1e-2]})
        return [t.name for t in plan_trials(cfg)]

    a, b, c = names(0), names(0), names(1)
    assert a == b and a != c
    assert len(a) == 13 == len(set(a))  # 8 grid points + 5 random ones
    lrs = [
        t.point.lr for t in plan_trials(_sweep(random={"samples": 5, "lr_log_range": [1e-4, 1e-2]}))
    ]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs[8:])
    assert format_lr(3e-4) == "3e-04" and format_lr(3.16e-4) == "3.16e-04"


def test_branched_decays_share_a_trunk() -> None:
    plan = plan_sweep(_sweep(branch_decays=True, grid={"tokens": [1280, 2560, 5120]}))
    assert len(plan.trunks) == 4 and len(plan.trials) == 12
    trunk = next(t for t in plan.trunks if t.name == "topk-n32-k4-lr1e-03-trunk")
    # 20/40/80 steps decaying over their last 25 %: branch points 15, 30, 60.
    assert trunk.config.train.steps == 60 and trunk.config.optimizer.decay_fraction == 0
    assert trunk.config.checkpoint.keep_steps == [15, 30, 60]
    assert trunk.run_dir == "/out/s/trunks/topk-n32-k4-lr1e-03-trunk"
    branch = next(t for t in plan.trials if t.name == "topk-n32-k4-lr1e-03-t2560")
    assert branch.trunk == trunk.name and branch.config.train.steps == 40
    assert branch.config.init is not None and branch.config.init.step == 30
    assert branch.config.init.from_checkpoint == f"{trunk.run_dir}/checkpoints"
    assert branch.config.optimizer.decay_fraction == 0.25


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"base": {"data": {"eval_fraction": 0}}}, "eval_fraction must be > 0"),
        ({"grid": {"tokens": [100]}}, r"grid.tokens \[100\] are not multiples of .*=64"),
        ({"grid": {"lr": [1e-3, 1e-3]}}, "grid.lr: .*distinct"),
        ({"grid": {"n_fetures": [3]}}, "grid.n_fetures: unknown key"),
        (
            {"branch_decays": True, "base": {"optimizer": {"decay_fraction": 0}}},
            "decay_fraction > 0",
        ),
    ],
)
def test_bad_sweep_configs_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(SweepConfig, _sweep_dict(**fields))
