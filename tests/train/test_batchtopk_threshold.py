"""BatchTopK's exported threshold: the trained model's mean batch cut-off, set after the last step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dictlearn.data import BatchStream
from dictlearn.train.step import unsharded_copy
from dictlearn.train.trainer import main, open_dataset
from tests.train.helpers import make_planted, restore_final, tiny_config, with_overrides

STEPS = 8
CALIBRATION_BATCHES = 3


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _dense_cutoff(params: dict[str, np.ndarray], x: np.ndarray, n_select: int) -> float:
    """The ``n_select``-th largest ReLU'd pre-activation of the batch, in numpy (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    pre = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0.0)
    return float(np.sort(pre.ravel())[-n_select])


def test_exported_threshold_is_the_mean_cutoff_of_the_next_batches(
    tmp_path: Path, planted_url: str
) -> None:
    config = tiny_config(
        tmp_path,
        planted_url,
        sae={"architecture": "batchtopk", "threshold_calibration_batches": CALIBRATION_BATCHES},
        mesh={"data": 4, "model": 2},
        train={"steps": STEPS},
    )
    running = with_overrides(config, "run.name=running", "sae.threshold_calibration_batches=0")
    main(config)
    main(running)
    program, calibrated = restore_final(config)
    _, uncalibrated = restore_final(running)

    # Calibration reads, it does not train: the same parameters, optimizer state and data
    # position (the calibration batches stay unread for a longer run).
    assert calibrated.step == uncalibrated.step == STEPS
    assert calibrated.data_position == uncalibrated.data_position == STEPS
    for key, value in unsharded_copy(uncalibrated.state.params).items():
        np.testing.assert_array_equal(unsharded_copy(calibrated.state.params)[key], value)

    # The reference: the train split's next batches read by a reader of our own, cut off in
    # numpy with the final parameters.
    dataset = open_dataset(config)
    stream = BatchStream(
        dataset,
        global_batch=config.train.batch_size,
        seed=config.train.seed,
        split="train",
        eval_fraction=config.data.eval_fraction,
        block_rows=config.data.block_rows,
        shuffle_blocks=config.data.shuffle_blocks,
        position=STEPS,
    )
    params = unsharded_copy(calibrated.state.params)
    n_select = config.sae.k * config.train.batch_size
    with stream:
        cutoffs = [
            _dense_cutoff(
                params, np.asarray(next(stream), np.float64) * program.norm_scale, n_select
            )
            for _ in range(CALIBRATION_BATCHES)
        ]
    threshold = float(calibrated.state.arch_state["threshold"])
    np.testing.assert_allclose(threshold, np.mean(cutoffs), rtol=1e-5)
    assert bool(calibrated.state.arch_state["threshold_initialised"])
    # Without calibration the export keeps the running mean of the training steps' cut-offs,
    # another number.
    running_threshold = float(uncalibrated.state.arch_state["threshold"])
    assert abs(running_threshold - threshold) > 1e-3 * threshold, (running_threshold, threshold)
