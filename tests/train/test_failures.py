"""Divergence: a NaN/Inf loss or state stops the run, and the last good checkpoint stays usable."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from dictlearn.data import (
    ActivationDataset,
    BatchStream,
    commit_manifest,
    write_shard,
)
from dictlearn.tracking import read_metrics
from dictlearn.train.trainer import TrainingDiverged, main, run_dir_of
from tests.train.helpers import (
    assert_no_traceback,
    committed_steps,
    make_planted,
    restore_final,
    run_cli,
    tiny_config,
    write_config,
)

D_MODEL = 16
BLOW_UP = 1e25  # finite in float32, but its square is not: the loss overflows to Inf


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url, d_model=D_MODEL)
    return url


def _write_blow_up_dataset(url: str) -> None:
    """128 blocks of ordinary rows plus one block of huge (finite) rows, shuffled in.

    The huge block's statistics are replaced by ordinary ones before the manifest is committed,
    so the input normalisation does not shrink them away: the batch holding them overflows.
    """
    rng = np.random.default_rng(0)
    normal = write_shard(url, 0, rng.normal(size=(8192, D_MODEL)).astype(np.float32), "float32")
    huge = write_shard(url, 1, np.full((64, D_MODEL), BLOW_UP, np.float32), "float32")
    scale = huge.n_tokens / normal.n_tokens
    huge = huge.model_copy(
        update={
            "sum": [s * scale for s in normal.sum],
            "sum_sq_norm": normal.sum_sq_norm * scale,
        }
    )
    commit_manifest(url, [normal, huge], source_model="test", hook="blow-up", layer=None)


def _first_bad_batch(config) -> int:
    """Index of the first global batch of the run's data order that holds a huge row."""
    dataset = ActivationDataset.open(config.data.path)
    with BatchStream(
        dataset,
        global_batch=config.train.batch_size,
        seed=config.train.seed,
        block_rows=config.data.block_rows,
        shuffle_blocks=config.data.shuffle_blocks,
    ) as stream:
        for index in range(10_000):
            if np.abs(next(stream)).max() >= BLOW_UP:
                return index
    raise AssertionError("no batch holds the huge rows")


def _assert_checkpoints_finite(config) -> None:
    for step in committed_steps(Path(run_dir_of(config)) / "checkpoints"):
        _, restored = restore_final(config, step=step)
        for leaf in jax.tree.leaves(restored.state):
            assert np.isfinite(np.asarray(leaf)).all(), f"checkpoint {step} holds NaN/Inf"


def test_inf_loss_stops_with_last_good_checkpoint(tmp_path: Path) -> None:
    url = str(tmp_path / "blow-up")
    _write_blow_up_dataset(url)
    config = tiny_config(
        tmp_path,
        url,
        train={"steps": 200, "log_every": 1, "seed": 2},  # seed 2: huge rows in batch 12
        checkpoint={"every_steps": 3, "keep": 2, "async_save": True},
    )
    bad = _first_bad_batch(config)  # global batch `bad` is consumed by step bad + 1
    assert 6 <= bad < 150, f"pick another seed: the huge rows come in batch {bad}"
    good = bad // 3 * 3  # the last checkpoint whose step ran on ordinary batches only

    with pytest.raises(TrainingDiverged) as raised:
        main(config)
    message = str(raised.value)
    checkpoint_dir = f"{run_dir_of(config)}/checkpoints"
    assert f"loss became inf at step {bad + 1}" in message
    assert f"last good checkpoint (step {good}) in {checkpoint_dir} is intact" in message

    assert committed_steps(checkpoint_dir) == [good - 3, good]
    _, restored = restore_final(config)
    assert restored.step == good and restored.data_position == good
    _assert_checkpoints_finite(config)
    rows = read_metrics(run_dir_of(config))
    assert rows[-1]["step"] == bad + 1 and rows[-1]["loss"] == "inf"
    assert all(np.isfinite(r["loss"]) for r in rows[:-1])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_nonfinite_update_is_never_checkpointed(tmp_path: Path, planted_url: str) -> None:
    # lr=1e39 is Inf in float32: the first loss is finite, but the first update is not. Nothing
    # may be saved from then on, and no non-finite checkpoint may be called good.
    config = tiny_config(
        tmp_path,
        planted_url,
        optimizer={"lr": 1e39, "warmup_steps": 0},
        checkpoint={"every_steps": 1},
    )
    with pytest.raises(TrainingDiverged, match="NaN/Inf at step 1: no checkpoint was written"):
        main(config)
    assert committed_steps(Path(run_dir_of(config)) / "checkpoints") == []


def test_cli_divergence_is_a_clean_error(tmp_path: Path, planted_url: str) -> None:
    config = tiny_config(
        tmp_path,
        planted_url,
        # Warm-up makes the first update large but finite (lr 2.5e29): step 1 is saved and its
        # state is finite; the loss of step 2 overflows. It overflows through b_dec (x - b_dec
        # ~1e29): with b_dec kept at the mean (TopK's default) the huge encoder only silences
        # every latent, and the loss stays finite.
        optimizer={"lr": 1e30, "warmup_steps": 4},
        sae={"learn_b_dec": True},
        train={"steps": 20},
        checkpoint={"every_steps": 1},
    )
    result = run_cli("train", write_config(tmp_path / "train.yaml", config))
    assert result.returncode == 2, result.stderr[-3000:]
    assert_no_traceback(result.stderr)
    checkpoint_dir = f"{run_dir_of(config)}/checkpoints"
    assert re.search(
        rf"dictlearn train: error: loss became nan at step 2: the last good checkpoint "
        rf"\(step 1\) in {re.escape(checkpoint_dir)} is intact",
        result.stderr,
    ), result.stderr[-3000:]
    assert committed_steps(checkpoint_dir) == [1]
    _assert_checkpoints_finite(config)
