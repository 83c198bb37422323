"""``dictlearn pipeline`` end to end: real Gemma 3 270M, real local Ray, real trainer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dictlearn.tracking import has_metrics
from tests.train.helpers import (
    REPO_ROOT,
    assert_no_traceback,
    cli_env,
    readme_dictlearn_calls,
    run_cli,
)

# A pipeline small enough for the default test run (~1 minute, mostly model load + Ray start).
TINY = [
    "generate.max_tokens=4096",
    "generate.context_length=64",
    "generate.corpus.n_shards=2",
    "generate.hooks=[resid_post.2]",
    "train.sae.n_features=256",
    "train.sae.k=8",
    "train.train.batch_size=256",
    "train.train.steps=8",
    "train.train.log_every=4",
    "train.checkpoint.every_steps=4",
    "eval.tokens=128",
    "eval.context_length=64",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return cli_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")


def test_pipeline_runs_then_skips_finished_stages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["pipeline", f"output_dir={out}", "name=tiny", *TINY]
    first = run_cli(*args, env=_env(tmp_path), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_no_traceback(first.stderr)
    summary = first.stdout
    for line in (
        "pipeline done",
        "tokens",
        "FVU",
        "L0",
        "dead",
        "run dir",
        "checkpoint",
        "loss recovered",
    ):
        assert line in summary, summary

    record = json.loads((out / "tiny" / "pipeline.json").read_text())
    gen, train, evaluation = record["stages"]
    assert [(s["stage"], s["status"]) for s in record["stages"]] == [
        ("generate", "ran"),
        ("train", "ran"),
        ("eval", "ran"),
    ]
    spliced = evaluation["result"]["metrics"]
    assert spliced["ce_clean"] < spliced["ce_zero_ablated"]
    assert evaluation["result"]["sae"] == train["result"]["run_dir"]
    assert Path(evaluation["directory"]).name == f"eval-{evaluation['version']}"
    gen_dir, train_dir = Path(gen["directory"]), Path(train["directory"])
    assert gen_dir.name == f"generate-{gen['version']}"
    assert train_dir.name == f"train-{train['version']}"
    assert (gen_dir / "resid_post.2" / "manifest.json").is_file()
    assert (train_dir / "stage.json").is_file() and has_metrics(str(train_dir))
    assert train["result"]["steps"] == 8
    rows = gen["result"]["tokens"]
    assert 0 < rows <= 4096

    # The same command again: both stages finished, nothing runs.
    started = time.perf_counter()
    again = run_cli(*args, env=_env(tmp_path), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") >= 3
    assert time.perf_counter() - started < 60
    # A new SAE config is a new train version on the same generated data.
    other = run_cli(*args, "train.sae.k=4", env=_env(tmp_path), timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    record = json.loads((out / "tiny" / "pipeline.json").read_text())
    statuses = [(s["stage"], s["status"]) for s in record["stages"]]
    assert statuses == [("generate", "skipped"), ("train", "ran"), ("eval", "ran")]
    assert record["stages"][1]["version"] != train["version"]


# ~60 s (a Ray worker per hook); tests/launch/test_pipeline_config.py plans the same groups.
@pytest.mark.slow
def test_pipeline_trains_a_group_of_widths_per_hook(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hooks = ["resid_post.1", "resid_post.2"]
    args = [
        "pipeline",
        f"output_dir={out}",
        "name=scope",
        *TINY,
        f"generate.hooks=[{', '.join(hooks)}]",
        "train.widths=[128, 256]",
        "train.train.steps=4",
        # Each member's eval stage is planned (test_pipeline_config); running four full-model
        # evaluations here would only repeat the single-SAE test's at four times the cost.
        "stages=[generate, train]",
    ]
    first = run_cli(*args, env=_env(tmp_path), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_no_traceback(first.stderr)
    record = json.loads((out / "scope" / "pipeline.json").read_text())
    gen, *trains = record["stages"]
    assert gen["stage"] == "generate" and [t["stage"] for t in trains] == ["train", "train"]
    assert [t["status"] for t in trains] == ["ran", "ran"]
    assert len({t["version"] for t in trains}) == 2
    for stage, hook in zip(trains, hooks, strict=True):
        assert stage["result"]["name"] == f"scope-{hook}"
        assert (Path(stage["directory"]) / "stage.json").is_file()
        for width in (128, 256):
            member = stage["result"]["members"][f"topk-{width}"]
            assert member["steps"] == 4
            assert Path(member["run_dir"]) == Path(stage["directory"]) / f"topk-{width}"
            assert (Path(member["run_dir"]) / "config.yaml").is_file()
    for hook in hooks:
        assert f"[train:{hook}] version" in first.stdout, first.stdout
    for width in (128, 256):
        assert first.stdout.count(f"    topk-{width}   ") == 2, first.stdout

    again = run_cli(*args, env=_env(tmp_path), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") >= 3


def test_pipeline_bad_input_is_one_line(tmp_path: Path) -> None:
    result = run_cli("pipeline", f"output_dir={tmp_path}", "train.mesh.model=2", env=_env(tmp_path))
    assert result.returncode == 2
    assert "top-level mesh" in result.stderr
    assert_no_traceback(result.stderr)
    result = run_cli("pipeline", str(tmp_path / "missing.yaml"), env=_env(tmp_path))
    assert result.returncode == 2 and "does not exist" in result.stderr


def _readme_main_calls() -> list[list[str]]:
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    return readme_dictlearn_calls(first_block)


def test_readme_main_command_is_the_default_pipeline() -> None:
    assert _readme_main_calls() == [["pipeline"]]


@pytest.mark.slow
def test_readme_main_command_verbatim(tmp_path: Path) -> None:
    """The README's main command, verbatim, from a fresh directory (~10 minutes on 2 cores)."""
    (call,) = _readme_main_calls()
    result = run_cli(*call, env=_env(tmp_path), cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline done" in result.stdout
    record = json.loads((tmp_path / "runs" / "default" / "pipeline.json").read_text())
    fvu = record["stages"][1]["result"]["eval_metrics"]["fvu"]
    assert fvu < 0.5, result.stdout
