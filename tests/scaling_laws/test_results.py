"""The sweep reader: finished trials become records; everything else is listed with a reason."""

from __future__ import annotations

import json

import pytest

from scaling_laws.results import SweepWarning, flops_per_token, read_sweep
from tests.scaling_laws.synthetic import BATCH, D_MODEL, K, TrialSpec, write_trial


def spec(n: int, steps: int = 100, lr: float = 3e-4, fvu: float = 0.2) -> TrialSpec:
    return TrialSpec(f"n{n}-s{steps}-lr{lr}", n, steps * BATCH, lr, fvu)


def test_finished_trials_are_read_with_their_numbers(tmp_path):
    write_trial(tmp_path, spec(1024, fvu=0.25))
    write_trial(tmp_path, spec(2048, steps=200, fvu=0.2), status=None)  # no trial.json: fine
    results = read_sweep(str(tmp_path))
    assert results.excluded == []
    a, b = results.finished
    assert (a.n_features, a.tokens, a.lr, a.k, a.architecture) == (
        1024,
        100 * BATCH,
        3e-4,
        K,
        "topk",
    )
    assert a.eval_fvu == 0.25
    assert a.train_fvu == pytest.approx(0.25 * 0.98)
    assert (a.l0, a.dead_fraction, a.d_model) == (K, 0.01, D_MODEL)
    assert a.flops == flops_per_token("topk", D_MODEL, 1024, K) * 100 * BATCH
    assert b.tokens == 200 * BATCH and b.data_path == "/data/acts"
    assert len(results.digest) == 64


def test_failed_running_missing_and_cut_short_trials_are_listed_and_warned(tmp_path):
    write_trial(tmp_path, spec(1024))
    write_trial(tmp_path, spec(2048), status="failed", error="OOM on host 3")
    write_trial(tmp_path, spec(4096), status="running")
    write_trial(tmp_path, spec(8192), final_eval=False)
    (write_trial(tmp_path, spec(512)) / "metrics.jsonl").unlink()
    nan = write_trial(tmp_path, spec(256))
    rows = [json.loads(line) for line in (nan / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["eval/fvu"] = "nan"  # what the tracker writes for a NaN
    (nan / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(SweepWarning, match="6 trial\\(s\\) left out") as record:
        results = read_sweep(str(tmp_path), expected=["planned-but-never-started"])
    assert [t.n_features for t in results.finished] == [1024]
    reasons = {e.name.split("-")[0]: (e.status, e.reason) for e in results.excluded}
    assert reasons["n2048"] == ("failed", "failed after 3 attempts: OOM on host 3")
    assert reasons["n4096"][0] == "running"
    assert reasons["n8192"] == (
        "incomplete",
        "no eval/fvu at the final step 100 (last logged step 50)",
    )
    assert reasons["n512"] == ("missing", "no metrics")
    assert reasons["n256"] == ("incomplete", "eval/fvu at step 100 is 'nan'")
    assert reasons["planned"] == ("missing", "no trial directory")
    assert "OOM on host 3" in str(record[0].message)


def test_d_model_comes_from_the_dataset_manifest_when_the_config_has_none(tmp_path):
    run = write_trial(tmp_path, spec(1024))
    text = (run / "config.yaml").read_text().replace(f"d_model: {D_MODEL}", "d_model: null")
    data = tmp_path / "acts"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"d_model": 640}))
    (run / "config.yaml").write_text(text.replace("path: /data/acts", f"path: {data}"))
    (trial,) = read_sweep(str(tmp_path)).finished
    assert trial.d_model == 640
    assert trial.flops == flops_per_token("topk", 640, 1024, K) * trial.tokens
    (data / "manifest.json").unlink()
    (trial,) = read_sweep(str(tmp_path)).finished
    assert trial.d_model is None and trial.flops is None
    (trial,) = read_sweep(str(tmp_path), d_model=512).finished
    assert trial.d_model == 512


def test_not_a_sweep_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trials/"):
        read_sweep(str(tmp_path))
