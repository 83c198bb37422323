"""Settings that used to be checked late (after training) or accepted and silently different."""

from __future__ import annotations

from pathlib import Path

import pytest

from dictlearn.config import ConfigError
from dictlearn.data import DatasetError
from dictlearn.errors import UserError
from dictlearn.train.trainer import main, run_dir_of
from tests.train.helpers import (
    assert_trees_equal,
    make_planted,
    restore_final,
    tiny_config,
    with_overrides,
)


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def test_too_small_heldout_split_is_refused_before_training(planted_url, tmp_path: Path) -> None:
    # 16384 rows in blocks of 64: 256 blocks; 0.1 % holds out none, not one batch of 64.
    config = tiny_config(tmp_path, planted_url, data={"eval_fraction": 0.001})
    with pytest.raises(DatasetError, match=r"eval split .* fewer than one global batch") as err:
        main(config)
    assert "data.eval_fraction=0.001" in str(err.value)
    assert not Path(run_dir_of(config)).exists()  # refused before any step or save


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparsity_warmup_is_refused_without_a_penalty(
    architecture: str, planted_url, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=f"no effect on sae.architecture={architecture}"):
        tiny_config(
            tmp_path,
            planted_url,
            sae={"architecture": architecture},
            optimizer={"sparsity_warmup_steps": 10},
        )


@pytest.mark.parametrize("architecture", ["jumprelu", "relu_l1"])
def test_sparsity_warmup_is_kept_with_a_penalty(
    architecture: str, planted_url, tmp_path: Path
) -> None:
    config = tiny_config(
        tmp_path,
        planted_url,
        sae={"architecture": architecture},
        optimizer={"sparsity_warmup_steps": 10},
    )
    assert config.optimizer.sparsity_warmup_steps == 10


def test_longer_run_past_the_decay_start_is_refused(planted_url, tmp_path: Path) -> None:
    # 4 steps, decay over the last 20 % (from step 3): the checkpoint at 4 is mid-decay.
    short = tiny_config(tmp_path, planted_url, train={"steps": 4})
    assert main(short).steps == 4
    longer = with_overrides(short, "train.steps=8")
    with pytest.raises(UserError, match=r"train.steps 4 -> 8: the checkpoint at step 4 is past"):
        main(longer)
    changed_decay = with_overrides(short, "optimizer.decay_fraction=0.5")
    with pytest.raises(UserError, match=r"optimizer.decay_fraction 0.2 -> 0.5"):
        main(changed_decay)
    assert main(short).steps == 4  # the old length still resumes (nothing to do)


def _extended_trunk(planted_url: str, tmp_path: Path):
    # A constant-lr run (as a sweep's trunk is) may be extended: its steps keep their lr.
    trunk = tiny_config(tmp_path, planted_url, train={"steps": 4}, optimizer={"decay_fraction": 0})
    assert main(trunk).steps == 4
    extended = with_overrides(trunk, "train.steps=8", "optimizer.decay_fraction=0.2")
    assert main(extended).steps == 8
    return extended


def test_longer_run_in_the_constant_phase_is_allowed(planted_url, tmp_path: Path) -> None:
    _extended_trunk(planted_url, tmp_path)


@pytest.mark.slow
def test_longer_run_in_the_constant_phase_is_the_longer_run(planted_url, tmp_path: Path) -> None:
    extended = _extended_trunk(planted_url, tmp_path)
    fresh = with_overrides(extended, "run.name=fresh")
    assert main(fresh).steps == 8
    _, resumed = restore_final(extended)
    _, uninterrupted = restore_final(fresh)
    assert_trees_equal(resumed.state, uninterrupted.state)
