"""Metric segments: exact rows after a resume, on local disk and on (emulated) GCS, and the
reader of old single-file runs; then a SIGKILLed ``dictlearn train`` on ``gs://`` resumed."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import fsspec
import pytest

from dictlearn import tracking
from dictlearn.tracking import METRICS_DIR, METRICS_FILE, Tracker, has_metrics, read_metrics
from dictlearn.train.trainer import run_dir_of
from tests.train.helpers import (
    assert_no_traceback,
    make_planted,
    run_cli,
    start_cli,
    tiny_config,
    write_config,
)

pytest_plugins = ["tests.gcs_emulator"]


def _log_steps(run_dir: str, steps: range, start_step: int = 0, **kwargs) -> None:
    tracker = Tracker(run_dir, {}, start_step=start_step, wandb_mode="disabled", **kwargs)
    try:
        for step in steps:
            tracker.log(step, {"loss": float(step)})
            if step % 5 == 0:
                tracker.log(step, {"fvu": 0.5}, prefix="eval/")
    finally:
        tracker.close()


def _steps(run_dir: str) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir) if "loss" in row]


@pytest.fixture(params=["local", "gcs"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_url") + "/run"


def test_resume_drops_the_rows_after_its_step(run_dir: str) -> None:
    assert not has_metrics(run_dir)
    with pytest.raises(FileNotFoundError, match=f"no metrics in {re.escape(run_dir)}: neither"):
        read_metrics(run_dir)
    _log_steps(run_dir, range(1, 13))  # a run that got to step 12, then stopped
    _log_steps(run_dir, range(11, 21), start_step=10)  # resumed from its checkpoint of step 10
    assert _steps(run_dir) == list(range(1, 21))
    # The eval rows of steps 5 and 10 (kept) and 15, 20 (logged again by the resumed run).
    assert [r["step"] for r in read_metrics(run_dir) if "eval/fvu" in r] == [5, 10, 15, 20]
    # A fresh start over the same directory (same config, no checkpoint) starts from nothing.
    _log_steps(run_dir, range(1, 3), start_step=0)
    assert _steps(run_dir) == [1, 2]


def test_rows_are_durable_at_flush_on_an_object_store(gcs_url: str) -> None:
    run_dir = f"{gcs_url}/run"
    tracker = Tracker(run_dir, {}, wandb_mode="disabled", flush_seconds=3600)
    try:
        tracker.log(1, {"loss": 1.0})
        assert not has_metrics(run_dir)  # buffered: nothing uploaded yet
        tracker.flush()
        assert _steps(run_dir) == [1]
        tracker.log(2, {"loss": 2.0})
        assert _steps(run_dir) == [1]
    finally:
        tracker.close()
    assert _steps(run_dir) == [1, 2]


def test_segments_roll_over(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "SEGMENT_BYTES", 400)  # a few rows per segment
    _log_steps(run_dir, range(1, 31))
    fs, root = fsspec.core.url_to_fs(run_dir)
    parts = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{METRICS_DIR}", detail=False))
    assert len(parts) > 3 and parts[0] == "part-00000.jsonl", parts
    _log_steps(run_dir, range(8, 12), start_step=7)  # drops whole segments and a partial one
    assert _steps(run_dir) == list(range(1, 12))


def test_old_single_file_runs_are_read_and_resumed(tmp_path: Path) -> None:
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 7)]
    # A crash's partial last line is skipped.
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + '\n{"step": 7, "lo')
    assert has_metrics(str(run_dir)) and _steps(str(run_dir)) == list(range(1, 7))
    _log_steps(str(run_dir), range(5, 9), start_step=4)
    assert _steps(str(run_dir)) == list(range(1, 9))
    assert (run_dir / METRICS_FILE).read_text().count("\n") == 4  # rewritten: steps 1-4


def _committed_gcs_steps(checkpoint_url: str) -> list[int]:
    """Steps Orbax has committed on GCS: there it writes a step in place and commits it with a
    ``commit_success.txt`` marker (no rename, as on a local disk)."""
    fs, path = fsspec.core.url_to_fs(checkpoint_url)
    fs.invalidate_cache(path)
    try:
        names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(
        int(n) for n in names if n.isdigit() and fs.exists(f"{path}/{n}/commit_success.txt")
    )


@pytest.mark.slow  # two `dictlearn train` processes against the emulator: ~40-100 s
def test_sigkilled_run_on_gcs_resumes_with_every_row_once(tmp_path: Path, gcs_url: str) -> None:
    data = tmp_path / "data"
    make_planted(data)
    steps = 200
    config = tiny_config(
        tmp_path,
        data,
        train={"steps": steps, "log_every": 1, "eval_every": 50},
        data={"eval_fraction": 0.25},
        checkpoint={"every_steps": 10, "keep": 2, "async_save": True},
        run={"output_dir": gcs_url, "name": "killed"},
    )
    config_path = write_config(tmp_path / "train.yaml", config)
    run_dir = run_dir_of(config)
    log = tmp_path / "killed.log"
    proc = start_cli("train", config_path, log=log)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not _committed_gcs_steps(f"{run_dir}/checkpoints"):
            assert time.monotonic() < deadline, "no checkpoint committed in 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    committed = _committed_gcs_steps(f"{run_dir}/checkpoints")
    assert committed and committed[-1] < steps, committed
    # Every row up to the committed checkpoint was uploaded before that checkpoint committed.
    assert set(range(1, committed[-1] + 1)) <= set(_steps(run_dir))

    resumed = run_cli("train", config_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_no_traceback(resumed.stderr)
    resuming = re.search(r"resuming \S+ from step (\d+) \(checkpoint", resumed.stderr)
    assert resuming, resumed.stderr[-3000:]
    resumed_from = int(resuming[1])
    assert resumed_from >= committed[-1]
    assert f"checkpoint step {steps}: {run_dir}/checkpoints/{steps}" in resumed.stderr
    rows = read_metrics(run_dir)
    assert _steps(run_dir) == list(range(1, steps + 1))
    assert [r["step"] for r in rows if "eval/fvu" in r] == [50, 100, 150, 200, 200]  # + final
    assert sum("planted_recovery" in r for r in rows) == 1
