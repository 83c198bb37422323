"""``dictlearn sweep`` end to end on a local Ray cluster: trials, the ledger, re-runs, failures,
changed configs, and branched token budgets against runs from scratch."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dictlearn.config import ConfigError
from dictlearn.ray_cluster import local_ray_cluster
from dictlearn.tracking import read_metrics
from launch.cli import main as cli_main
from launch.submit import infer_stage, prepare
from tests.train.helpers import make_planted

# A line Ray forwards from one of its worker processes: "(run_trial pid=123) ...", maybe coloured.
_RAY_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\S+ pid=\d+(, ip=\S+)?\)")


def _driver_lines(err: str) -> str:
    """``err`` without the lines Ray forwards from its worker processes.

    The module's cluster outlives each sweep, and Ray forwards worker output asynchronously: a
    trial actor that the previous sweep's Tune ended can print Ray's own SIGTERM-handler
    traceback ("The process receives a SIGTERM") into a later call's stderr. What a call itself
    printed is the rest.
    """
    return "\n".join(line for line in err.splitlines() if not _RAY_WORKER_LINE.match(line))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the module (each sweep joins it instead of starting one).

    Its workers get one CPU device each, not the 8 virtual devices tests/conftest.py gives this
    process: the trials are tiny, and one device each keeps them fast.
    """
    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = ""
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with local_ray_cluster(num_cpus=2):
            if saved is not None:
                os.environ["XLA_FLAGS"] = saved
            yield
    finally:
        if saved is not None:
            os.environ["XLA_FLAGS"] = saved


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _sweep_file(path: Path, data_url: str, out: Path, **fields: Any) -> Path:
    config: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(out),
        "base": {
            "data": {
                "path": data_url,
                "eval_fraction": 0.125,
                "block_rows": 64,
                "shuffle_blocks": 4,
            },
            "sae": {"architecture": "topk", "n_features": 32, "k": 4, "k_aux": 16},
            "optimizer": {"lr": 3e-3, "warmup_steps": 4, "decay_fraction": 0.25},
            "train": {"batch_size": 64, "log_every": 8, "eval_batches": 2},
            "checkpoint": {"every_steps": 1000, "async_save": False},
            "tracker": {"wandb_mode": "disabled"},
        },
        "grid": {"n_features": [32, 64], "lr": [3e-3], "tokens": [1280, 1920]},
        "ray": {"max_concurrent_trials": 2},
    }
    config |= fields
    path.write_text(yaml.safe_dump(config))
    return path


def _ledger(root: Path) -> dict[str, dict[str, Any]]:
    return {
        p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("trials/*/trial.json"))
    }


def test_sweep_runs_skips_and_refuses_another_config(
    tmp_path: Path, planted_url: str, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _sweep_file(tmp_path / "sweep.yaml", planted_url, tmp_path / "out")
    root = tmp_path / "out" / "tiny"
    assert cli_main(["sweep", str(config)]) == 0
    out = capsys.readouterr().out
    ledger = _ledger(root)
    assert sorted(ledger) == [
        "topk-n32-k4-lr3e-03-t1280",
        "topk-n32-k4-lr3e-03-t1920",
        "topk-n64-k4-lr3e-03-t1280",
        "topk-n64-k4-lr3e-03-t1920",
    ]
    for name, record in ledger.items():
        assert (record["status"], record["attempts"], record["error"]) == ("finished", 1, None)
        fvu = record["result"]["eval/fvu"]
        assert 0 < fvu < 1
        assert f"{name}: eval fvu {fvu:.4f}" in out  # one line per finished trial
        rows = read_metrics(str(root / "trials" / name))
        assert rows[-1]["step"] == record["result"]["steps"] and "eval/fvu" in rows[-2] | rows[-1]
        assert (root / "trials" / name / "config.yaml").is_file()
    assert yaml.safe_load((root / "sweep.yaml").read_text())["grid"]["tokens"] == [1280, 1920]
    assert "4/4 trials finished, 0 failed" in out

    # Again, with an execution-only change: every trial is skipped, nothing runs.
    started = time.perf_counter()
    assert cli_main(["sweep", str(config), "ray.max_concurrent_trials=1"]) == 0
    out = capsys.readouterr().out
    assert "4 trials (4 finished earlier, skipped)" in out
    assert time.perf_counter() - started < 20
    assert all(r["attempts"] == 1 for r in _ledger(root).values())

    # A change that decides results: refused, naming the field, nothing touched.
    assert cli_main(["sweep", str(config), "base.sae.k=8", "grid.lr=[1e-3]"]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep of another config" in err
    assert "base.sae.k: sweep.yaml has 4, config has 8" in err
    assert "grid.lr: sweep.yaml has [0.003], config has [0.001]" in err
    assert "Traceback" not in _driver_lines(err)


# ~25 s (a trial fails, is retried, the rest finish); slow to keep the default run short.
@pytest.mark.slow
def test_a_failing_trial_is_retried_once_and_the_others_finish(
    tmp_path: Path, planted_url: str, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr=1e30 is a valid config that diverges at run time (the trainer raises on a NaN loss).
    config = _sweep_file(
        tmp_path / "sweep.yaml",
        planted_url,
        tmp_path / "out",
        grid={"n_features": [32], "lr": [3e-3, 1e30], "tokens": [1280]},
    )
    assert cli_main(["sweep", str(config)]) == 1
    out = capsys.readouterr().out
    ledger = _ledger(tmp_path / "out" / "tiny")
    good, bad = ledger["topk-n32-k4-lr3e-03-t1280"], ledger["topk-n32-k4-lr1e+30-t1280"]
    assert good["status"] == "finished" and good["attempts"] == 1
    assert (bad["status"], bad["attempts"]) == ("failed", 2)
    assert bad["error"].startswith("TrainingDiverged: loss became")
    assert "topk-n32-k4-lr1e+30-t1280: FAILED (TrainingDiverged" in out  # the first attempt
    assert "FAILED after 2 attempts: TrainingDiverged" in out
    assert "1/2 trials finished, 1 failed" in out


@pytest.mark.slow
def test_branched_budgets_match_runs_from_scratch(
    tmp_path: Path, planted_url: str, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two budgets, branched from one constant-lr trunk vs trained from scratch (~90 s)."""
    fvus = {}
    for branch in (False, True):
        config = _sweep_file(
            tmp_path / f"sweep-{branch}.yaml",
            planted_url,
            tmp_path / "out",
            name=f"branch-{branch}",
            branch_decays=branch,
            grid={"n_features": [64], "lr": [3e-3], "tokens": [1536, 2560]},
        )
        assert cli_main(["sweep", str(config)]) == 0
        root = tmp_path / "out" / f"branch-{branch}"
        fvus[branch] = {n: r["result"]["eval/fvu"] for n, r in _ledger(root).items()}
        assert (root / "trunks" / "topk-n64-k4-lr3e-03-trunk").is_dir() == branch
    print(capsys.readouterr().out)
    print("eval fvu, scratch vs branched:", fvus)
    assert fvus[True].keys() == fvus[False].keys() and len(fvus[True]) == 2
    for name, scratch in fvus[False].items():
        assert abs(fvus[True][name] / scratch - 1) < 0.01, (name, scratch, fvus[True][name])


def test_bad_sweep_configs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _sweep_file(tmp_path / "sweep.yaml", str(tmp_path / "missing"), tmp_path / "out")
    assert cli_main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no activation dataset at" in err and "Traceback" not in _driver_lines(err)
    assert not (tmp_path / "out").exists()
    assert cli_main(["sweep", str(config), "grid.tokens=[100]"]) == 2
    assert "not multiples of base.train.batch_size=64" in capsys.readouterr().err


def test_submit_takes_sweep_configs(tmp_path: Path) -> None:
    config = _sweep_file(tmp_path / "sweep.yaml", "gs://b/acts", Path("/shared/sweeps"))
    assert infer_stage(yaml.safe_load(config.read_text()), str(config)) == "sweep"
    prepared = prepare(str(config), [])
    # The job's sweep joins the cluster it runs on instead of starting a private one.
    assert prepared.stage == "sweep" and prepared.overrides == ["ray.address=auto"]
    assert prepared.resolved["ray"]["address"] == "auto"


def test_spliced_eval_needs_language_model_activations(
    tmp_path: Path, planted_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _sweep_file(
        tmp_path / "sweep.yaml", planted_url, tmp_path / "out", spliced_eval={"tokens": 128}
    )
    assert cli_main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert "spliced_eval needs activations of a language model" in err
    assert not (tmp_path / "out" / "tiny").exists()


@pytest.mark.slow
def test_sweep_trials_report_the_spliced_evaluation(
    tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Gemma 3 270M activations (generated here), two trials each evaluated spliced into it."""
    from dictlearn.activations import main as generate_main
    from tests.activations.helpers import tiny

    generated = generate_main(tiny(str(tmp_path / "acts"), hooks=["resid_post.1"]))
    data = generated.datasets["resid_post.1"]
    config = _sweep_file(
        tmp_path / "sweep.yaml",
        data,
        tmp_path / "out",
        spliced_eval={"tokens": 128, "context_length": 64, "batch_size": 2},
        grid={"n_features": [32], "lr": [3e-3], "tokens": [640, 1280]},
    )
    assert cli_main(["sweep", str(config)]) == 0
    out = capsys.readouterr().out
    ledger = _ledger(tmp_path / "out" / "tiny")
    assert len(ledger) == 2
    for name, record in ledger.items():
        result = record["result"]
        assert result["spliced/ce_clean"] < result["spliced/ce_zero_ablated"]
        assert f"loss recovered {result['spliced/loss_recovered']:.4f}" in out, (name, out)


def test_a_sweep_from_before_new_fields_continues_only_with_their_old_values(
    tmp_path: Path, planted_url: str
) -> None:
    """A ``sweep.yaml`` written before ``sae.learn_b_dec`` / ``sae.aux_gradient`` existed is
    the same sweep as a config that sets their old values, and another sweep than today's
    defaults (the refusal names both fields), as for a single run's resume."""
    from launch.sweep import SWEEP_FILE, check_sweep_dir, load_sweep_config

    path = _sweep_file(tmp_path / "sweep.yaml", planted_url, tmp_path / "out")
    old_values = load_sweep_config(
        str(path), ["base.sae.learn_b_dec=true", "base.sae.aux_gradient=relu"]
    )
    check_sweep_dir(old_values)
    written = Path(old_values.root) / SWEEP_FILE
    before = yaml.safe_load(written.read_text())
    del before["base"]["sae"]["learn_b_dec"], before["base"]["sae"]["aux_gradient"]
    written.write_text(yaml.safe_dump(before))

    with pytest.raises(ConfigError) as refused:
        check_sweep_dir(load_sweep_config(str(path), []))
    assert "base.sae.aux_gradient: sweep.yaml has None" in str(refused.value)
    assert "base.sae.learn_b_dec: sweep.yaml has None" in str(refused.value)
    check_sweep_dir(old_values)
