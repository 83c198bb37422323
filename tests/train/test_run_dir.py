"""Run directories another run already holds: refused before any step (exit 2, the fix in the
message, nothing changed), or emptied on purpose with ``checkpoint.resume=overwrite``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from dictlearn.config import to_yaml
from dictlearn.tracking import Tracker, read_metrics
from dictlearn.train.config import GroupTrainConfig
from dictlearn.train.group import main as group_main
from dictlearn.train.trainer import main, run_dir_of
from tests.train.helpers import (
    REPO_ROOT,
    assert_no_traceback,
    cli_command,
    cli_env,
    committed_steps,
    make_planted,
    tiny_config,
    tiny_config_dict,
    write_config,
)


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _train_steps(run_dir: str | Path) -> list[int]:
    return [row["step"] for row in read_metrics(str(run_dir)) if "loss" in row]


def _leave_uncheckpointed_run(tmp: Path, planted_url: str, name: str, **sections) -> Path:
    """A run directory as a run of ``sections`` leaves it when killed before its first save."""
    config = tiny_config(tmp, planted_url, run={"name": name}, **sections)
    run_dir = Path(run_dir_of(config))
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    tracker = Tracker(str(run_dir), {}, wandb_mode="disabled")
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0})
    tracker.close()
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "checkpoints" not in p.parts
    }


CASES: dict[str, tuple[list[str], int, str]] = {
    # case: (overrides, exit status, regex of the message on stderr)
    "never-over-checkpoints": (
        ["run.name=finished", "checkpoint.resume=never"],
        2,
        r"checkpoint\.resume=never but {tmp}/runs/finished/checkpoints holds checkpoints of "
        r"steps 2: use another run\.name, checkpoint\.resume=auto to continue from step 2, or "
        r"checkpoint\.resume=overwrite to delete it and start over",
    ),
    "another-config-without-checkpoint": (
        ["run.name=stranger"],
        2,
        r"{tmp}/runs/stranger holds another run \(no checkpoint, but its config\.yaml "
        r"differs\):\n  sae\.k: config\.yaml has 8, config has 4\n"
        r"use another run\.name, or checkpoint\.resume=overwrite to delete it and start over",
    ),
    "metrics-without-config": (
        ["run.name=orphan"],
        2,
        r"{tmp}/runs/orphan holds metrics but no config\.yaml \(another run's, or a damaged "
        r"one\): use another run\.name, or checkpoint\.resume=overwrite",
    ),
    "overwrite": (
        ["run.name=replaced", "checkpoint.resume=overwrite", "train.steps=4"],
        0,
        r"checkpoint\.resume=overwrite: deleted checkpoints \[2\] in {tmp}/runs/replaced/"
        r"checkpoints\n.*starting {tmp}/runs/replaced at step 0",
    ),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory, planted_url: str):
    """Every case at once (each is mostly interpreter start-up), plus the tmp dir and the
    snapshot of each run directory before."""
    tmp = tmp_path_factory.mktemp("rundirs")
    for name in ("finished", "replaced"):  # finished 2-step runs of sae.k=8, checkpointed
        main(tiny_config(tmp, planted_url, train={"steps": 2}, sae={"k": 8}, run={"name": name}))
    _leave_uncheckpointed_run(tmp, planted_url, "stranger", sae={"k": 8})
    orphan = _leave_uncheckpointed_run(tmp, planted_url, "orphan")
    (orphan / "config.yaml").unlink()
    before = {name: _snapshot(tmp / "runs" / name) for name in ("finished", "stranger", "orphan")}
    config_path = write_config(tmp / "train.yaml", tiny_config_dict(tmp, planted_url))
    procs = {
        case: subprocess.Popen(
            cli_command("train", config_path, *overrides),
            cwd=REPO_ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (overrides, _, _) in CASES.items()
    }
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return tmp, before, results


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_of_another_run(cli_runs, case: str) -> None:
    tmp, before, results = cli_runs
    result, (_, status, pattern) = results[case], CASES[case]
    assert result.returncode == status, result.stderr[-3000:]
    assert_no_traceback(result.stderr)
    pattern = pattern.format(tmp=re.escape(str(tmp)))
    if status == 2:
        assert re.search(r"dictlearn train: error: " + pattern, result.stderr), result.stderr
        name = CASES[case][0][0].removeprefix("run.name=")
        # Refused before anything changed: same files, no step trained, no checkpoint written.
        assert _snapshot(tmp / "runs" / name) == before[name]
        expected = [2] if name == "finished" else []
        assert committed_steps(tmp / "runs" / name / "checkpoints") == expected
    else:
        assert re.search(pattern, result.stderr, re.DOTALL), result.stderr
        run_dir = tmp / "runs" / "replaced"
        assert committed_steps(run_dir / "checkpoints") == [4]
        assert _train_steps(run_dir) == [1, 2, 3, 4]  # the old run's rows are gone
        assert "k: 4" in (run_dir / "config.yaml").read_text()


def test_same_config_without_checkpoint_starts_over(tmp_path: Path, planted_url: str) -> None:
    """A run stopped before its first save: the same config starts it again from step 0."""
    run_dir = _leave_uncheckpointed_run(tmp_path, planted_url, "early")
    result = main(tiny_config(tmp_path, planted_url, train={"steps": 3}, run={"name": "early"}))
    assert result.steps == 3
    assert _train_steps(run_dir) == [1, 2, 3]  # once each: the stopped run's rows were dropped


def test_group_refuses_never_over_checkpoints(tmp_path: Path, planted_url: str) -> None:
    data = tiny_config_dict(tmp_path, planted_url, train={"steps": 2})
    data["group"] = [{"name": "a"}, {"name": "b", "sae": {"k": 8}}]
    config = GroupTrainConfig.model_validate(data)
    group_main(config)
    never = GroupTrainConfig.model_validate(data | {"checkpoint": {"resume": "never"}})
    with pytest.raises(ValueError, match=r"checkpoint\.resume=never but .*/runs/a/checkpoints"):
        group_main(never)
