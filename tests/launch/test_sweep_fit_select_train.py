"""The whole scaling-law loop through the CLI, from the checked-in ``sweep_tiny.yaml``:
sweep -> fit -> select -> train on the selected config (~4 minutes on 2 cores, so slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dictlearn.tracking import read_metrics
from launch.cli import main as cli_main
from tests.train.helpers import REPO_ROOT, make_planted

pytestmark = pytest.mark.slow


def test_sweep_fit_select_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "planted-tiny"
    # The README's planted command: d_model 32, 64 true features, 131,072 tokens.
    make_planted(data, d_model=32, n_features=64, n_tokens=131072, mean_active=4)
    sweeps = tmp_path / "sweeps"
    sweep_yaml = REPO_ROOT / "launch/configs/sweep_tiny.yaml"
    assert (
        cli_main(["sweep", str(sweep_yaml), f"output_dir={sweeps}", f"base.data.path={data}"]) == 0
    )
    sweep_dir = sweeps / "sweep-tiny"
    trials = sorted((sweep_dir / "trials").iterdir())
    finished = [
        t for t in trials if json.loads((t / "trial.json").read_text())["status"] == "finished"
    ]
    assert len(finished) == 27

    fits_dir = tmp_path / "fits"
    assert cli_main(["fit", str(sweep_dir), "--out", str(fits_dir)]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out.lower() or "α" in out
    fits = json.loads((fits_dir / "fits.json").read_text())
    assert fits

    selected = tmp_path / "selected.yaml"
    assert (
        cli_main(
            [
                "select",
                str(fits_dir / "fits.json"),
                "n_features=512",
                "tokens=131072",
                f"run.output_dir={tmp_path / 'runs'}",
                "--out",
                str(selected),
            ]
        )
        == 0
    )
    header = selected.read_text().splitlines()[:5]
    assert any("predicted" in line.lower() for line in header), header
    config = yaml.safe_load(selected.read_text())
    assert config["sae"]["n_features"] == 512

    assert cli_main(["train", str(selected)]) == 0
    run_dir = tmp_path / "runs" / (config["run"].get("name") or "topk-512-s0")
    rows = [r for r in read_metrics(str(run_dir)) if "eval/fvu" in r]
    assert rows and 0 < rows[-1]["eval/fvu"] < 1
