"""The dead window: derived from the width and L0 unless set, and what runs compare with it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from dictlearn.config import ConfigError, validate
from dictlearn.data import ActivationDataset
from dictlearn.sae import BatchTopKConfig, JumpReLUConfig, ReLUL1Config, TopKConfig
from dictlearn.sae.base import MAX_DEAD_WINDOW_TOKENS
from dictlearn.train.config import GroupTrainConfig, TrainConfig
from dictlearn.train.trainer import _config_differences, build_program, main
from launch.sweep import check_sweep_dir
from scaling_laws.sweep import SweepConfig, plan_trials
from tests.train.helpers import make_planted, tiny_config


@pytest.mark.parametrize(
    ("config", "window"),
    [
        # 128 fires of a latent at the average rate L0 / n_features: 128 * n_features / L0.
        (TopKConfig(), 65_536),
        (TopKConfig(n_features=65_536), 262_144),
        (TopKConfig(n_features=1 << 20), 4_194_304),
        (TopKConfig(k=64), 32_768),
        (BatchTopKConfig(n_features=65_536, k=64), 131_072),
        (JumpReLUConfig(), 65_536),  # no L0 set: 32 assumed
        (JumpReLUConfig(init_l0=16), 131_072),
        (JumpReLUConfig(init_l0=16, target_l0=64), 32_768),  # the target wins
        (ReLUL1Config(n_features=4096), 16_384),
        (TopKConfig(n_features=1 << 24, k=1), MAX_DEAD_WINDOW_TOKENS),  # int32 counters
        (TopKConfig(n_features=65_536, dead_window_tokens=1000), 1000),  # set by hand: kept
    ],
)
def test_the_window_is_128_average_fires_unless_set(config: Any, window: int) -> None:
    assert config.dead_window == window


def test_a_window_past_the_counters_range_is_refused() -> None:
    with pytest.raises(
        ConfigError, match="dead_window_tokens: Input should be less than or equal to 1073741824"
    ):
        validate(
            TrainConfig,
            {
                "data": {"path": "/d"},
                "sae": {"architecture": "topk", "dead_window_tokens": MAX_DEAD_WINDOW_TOKENS + 1},
            },
        )


def _dump(**sae: Any) -> dict[str, Any]:
    sae = {"architecture": "topk"} | sae
    return validate(TrainConfig, {"data": {"path": "/d"}, "sae": sae}).model_dump(mode="json")


def test_a_run_saved_with_the_fixed_window_resumes_where_the_derived_one_is_equal() -> None:
    """Runs saved before the window was derived hold 65,536, the fixed default then. At 16,384
    latents and k 32 that is the derived window, so they resume; at 65,536 latents the derived
    window is 262,144, another run, and the difference names the field."""
    same = _dump()
    assert same["sae"]["dead_window_tokens"] is None
    saved = same | {"sae": same["sae"] | {"dead_window_tokens": 65_536}}
    assert _config_differences(saved, same) == []

    wide = _dump(n_features=65_536)
    saved_wide = wide | {"sae": wide["sae"] | {"dead_window_tokens": 65_536}}
    diffs = _config_differences(saved_wide, wide)
    assert [d.split(":")[0] for d in diffs] == ["sae.dead_window_tokens"]
    assert "262144" in diffs[0], diffs
    # Setting the old window by hand resumes it.
    assert (
        _config_differences(saved_wide, _dump(n_features=65_536, dead_window_tokens=65_536)) == []
    )
    # Two configs that both derive the window differ by what it derives from, alone.
    assert [d.split(":")[0] for d in _config_differences(wide, same)] == ["sae.n_features"]


def test_a_sweep_saved_with_the_fixed_window_is_another_sweep(tmp_path: Path) -> None:
    """A sweep's trials derive windows of their own widths, so a sweep directory written when
    the base held the fixed 65,536 is refused even where the base's own width derives 65,536
    (its 32- and 64-latent trials would now count with 1,024 and 2,048)."""
    sweep = validate(SweepConfig, _sweep_dict(tmp_path, n_features=16_384, k=32))
    check_sweep_dir(sweep)  # writes sweep.yaml
    check_sweep_dir(sweep)  # the same config: accepted
    saved = sweep.model_dump(mode="json")
    saved["base"]["sae"]["dead_window_tokens"] = 65_536
    sweep_yaml = Path(sweep.root) / "sweep.yaml"
    sweep_yaml.write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match=r"base\.sae\.dead_window_tokens: sweep\.yaml has 65536"):
        check_sweep_dir(sweep)


def _sweep_dict(tmp_path: Path | None = None, **sae: Any) -> dict[str, Any]:
    return {
        "name": "s",
        "output_dir": str(tmp_path or "/out"),
        "base": {
            "data": {"path": "/d", "eval_fraction": 0.1},
            "sae": {"architecture": "topk", "k": 4} | sae,
            "train": {"batch_size": 64},
        },
        "grid": {"n_features": [32, 64], "lr": [1e-3], "tokens": [1280]},
    }


def test_group_members_and_sweep_trials_derive_their_own_window() -> None:
    """A group's shared section and a sweep's base are dumped and re-validated per member or
    trial with another width: an unset window must stay unset so each derives its own, and a
    window set by hand is every member's."""
    group = validate(
        GroupTrainConfig,
        {
            "data": {"path": "/d"},
            "group": [
                {"name": "narrow"},
                {"name": "wide", "sae": {"n_features": 65_536}},
                {"name": "jump", "sae": {"architecture": "jumprelu", "target_l0": 64}},
            ],
        },
    )
    assert [m.sae.dead_window for m in group.members()] == [65_536, 262_144, 32_768]
    fixed = validate(
        GroupTrainConfig,
        {
            "data": {"path": "/d"},
            "sae": {"architecture": "topk", "dead_window_tokens": 4096},
            "group": [{"name": "narrow"}, {"name": "wide", "sae": {"n_features": 65_536}}],
        },
    )
    assert [m.sae.dead_window for m in fixed.members()] == [4096, 4096]

    sweep = validate(SweepConfig, _sweep_dict())
    assert {t.point.n_features: t.config.sae.dead_window for t in plan_trials(sweep)} == {
        32: 1024,
        64: 2048,
    }


def test_the_trainer_counts_with_the_derived_window_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real run: the step program counts dead latents against the derived window (64 latents,
    k 4: 2,048 tokens), the log names it, and a run too short to reach it says that AuxK will
    not run."""
    url = str(tmp_path / "data")
    make_planted(url)
    config = tiny_config(tmp_path, url, sae={"n_features": 64, "k": 4})
    assert config.sae.dead_window_tokens is None
    caplog.set_level(logging.INFO, logger="dictlearn.train.trainer")
    main(config)
    assert "tiny: sae.dead_window_tokens unset: 2048 tokens" in caplog.text
    # 8 steps of 64 tokens: no latent can go 2,048 tokens without firing.
    assert "no latent will count as dead" in caplog.text

    program = build_program(config, ActivationDataset.open(url))
    assert program.dead_window == 2048
    assert not program.dead_latents_possible
    longer = tiny_config(tmp_path, url, sae={"n_features": 64, "k": 4}, train={"steps": 40})
    assert build_program(longer, ActivationDataset.open(url)).dead_latents_possible
