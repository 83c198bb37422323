"""What a user sees while a run goes: the start/resume and save log lines, and a tokens/s
figure that leaves evaluation and checkpoint time out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from dictlearn.tracking import read_metrics
from dictlearn.train import trainer
from dictlearn.train.checkpoint import Checkpointer
from dictlearn.train.trainer import main, run_dir_of
from tests.train.helpers import make_planted, tiny_config

PAUSE_S = 1.0


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def test_tokens_per_s_leaves_out_eval_and_checkpoint_time(
    tmp_path: Path, planted_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every step evaluates and checkpoints, and each of those takes PAUSE_S longer than it
    # would: counted in, they would hold the figure below batch_size / (2 * PAUSE_S).
    real_evaluate, real_save = trainer.evaluate, Checkpointer.save

    def slow_evaluate(*args, **kwargs):
        time.sleep(PAUSE_S)
        return real_evaluate(*args, **kwargs)

    def slow_save(self, *args, **kwargs):
        time.sleep(PAUSE_S)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(Checkpointer, "save", slow_save)
    config = tiny_config(
        tmp_path,
        planted_url,
        data={"eval_fraction": 0.25},
        train={"steps": 4, "log_every": 1, "eval_every": 1, "eval_batches": 1},
        checkpoint={"every_steps": 1},
    )
    main(config)
    rows = [r for r in read_metrics(run_dir_of(config)) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1's interval holds the compilation; a later step takes well under PAUSE_S alone.
    batch = config.train.batch_size
    assert all(r["tokens_per_s"] > batch / PAUSE_S for r in rows[1:]), rows


def test_every_logged_tokens_per_s_is_a_real_rate(tmp_path: Path, planted_url: str) -> None:
    """Rows are read back one step late, and the last step's with it: the two reads share one
    interval, and the second row used to log 0 tokens/s. It now logs none (the first row's
    figure covers both steps)."""
    config = tiny_config(
        tmp_path, planted_url, train={"steps": 6, "log_every": 1}, checkpoint={"every_steps": 6}
    )
    main(config)
    rows = [r for r in read_metrics(run_dir_of(config)) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    assert len(rates) >= len(rows) - 1 and all(rate > 0 for rate in rates), rows


def test_start_resume_and_save_are_logged(
    tmp_path: Path, planted_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(tmp_path, planted_url, train={"steps": 4}, checkpoint={"every_steps": 2})
    run_dir, checkpoints = run_dir_of(config), f"{run_dir_of(config)}/checkpoints"
    with caplog.at_level(logging.INFO, logger="dictlearn"):
        main(config)
        main(config)  # a finished run: restored at its end, nothing to train
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("dictlearn.train")]
    # Each start says which dead window the run counts with (64 latents, k 4: 2,048 tokens).
    window = [
        "tiny: sae.dead_window_tokens unset: 2048 tokens, in which a latent firing at the "
        "average rate (L0 4 over 64 latents) fires 128 times",
        "tiny: the run's 256 tokens are too few for a latent to go 2048 tokens without firing: "
        "no latent will count as dead and the dead-latent loss will not run",
    ]
    assert messages == [
        *window,
        f"starting {run_dir} at step 0 (no checkpoint to resume)",
        f"checkpoint step 2: {checkpoints}/2 (committed)",
        f"checkpoint step 4: {checkpoints}/4 (committed)",
        *window,
        f"resuming {run_dir} from step 4 (checkpoint {checkpoints}/4, data position 4)",
    ], messages
