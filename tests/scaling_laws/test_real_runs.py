"""The reader and the fits on run directories the real trainer wrote (slow: 9 tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dictlearn.config import load_config
from dictlearn.data import PlantedConfig, write_planted_dataset
from dictlearn.train.config import TrainConfig
from launch.train import train
from scaling_laws.fit import fit_sweep
from scaling_laws.results import flops_per_token, read_sweep

TINY = Path(__file__).resolve().parents[2] / "launch" / "configs" / "train_tiny.yaml"


@pytest.mark.slow
def test_a_tiny_real_sweep_is_read_and_fitted(tmp_path):
    data = str(tmp_path / "planted")
    write_planted_dataset(
        data, PlantedConfig(d_model=32, n_features=512, n_tokens=65536, mean_active=8)
    )
    eval_fvu = {}
    for n in (64, 128, 256):
        for steps in (20, 40, 80):
            name = f"n{n}-s{steps}"
            config = load_config(
                TrainConfig,
                TINY,
                [
                    f"data.path={data}",
                    f"sae.n_features={n}",
                    f"train.steps={steps}",
                    "train.batch_size=512",
                    "train.eval_every=0",
                    "optimizer.warmup_steps=5",
                    "checkpoint.every_steps=100000",
                    "tracker.wandb_mode=disabled",
                    f"run.output_dir={tmp_path / 'sweep' / 'trials'}",
                    f"run.name={name}",
                ],
            )
            eval_fvu[name] = train(config).eval_metrics["fvu"]
    record = {"status": "failed", "error": "killed", "attempts": 3}
    (tmp_path / "sweep" / "trials" / "n64-s20" / "trial.json").write_text(json.dumps(record))

    with pytest.warns(UserWarning, match="n64-s20"):
        results = read_sweep(str(tmp_path / "sweep"))
    assert [e.name for e in results.excluded] == ["n64-s20"]
    assert len(results.finished) == 8
    for trial in results.finished:
        assert trial.eval_fvu == pytest.approx(eval_fvu[trial.name], rel=1e-6)
        assert trial.d_model == 32  # from the dataset's manifest: the config leaves it null
        assert trial.tokens == trial.steps * 512
        assert trial.flops == flops_per_token("topk", 32, trial.n_features, 4) * trial.tokens
        assert trial.l0 == pytest.approx(4.0) and trial.train_fvu is not None
    fits = fit_sweep(results, n_boot=8)
    assert fits.loss_law.alpha >= 0 and fits.frontier is not None
    assert fits.lr_law is None  # one learning rate: no lr law, and fits.json says why
