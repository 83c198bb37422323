"""``dictlearn train`` / ``dictlearn planted`` as a user runs them: end to end, SIGTERM, bad input."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dictlearn.config import load_config
from dictlearn.data import commit_manifest, write_shard
from dictlearn.data.format import shard_bin_name
from dictlearn.tracking import has_metrics, read_metrics
from dictlearn.train.config import TrainConfig
from dictlearn.train.trainer import main, run_dir_of
from tests.train.helpers import (
    REPO_ROOT,
    assert_no_traceback,
    cli_command,
    cli_env,
    committed_steps,
    make_planted,
    readme_dictlearn_calls,
    restore_final,
    run_cli,
    start_cli,
    tiny_config,
    tiny_config_dict,
    with_overrides,
    write_config,
)


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _train_steps(run_dir: str | Path, rows: list[dict] | None = None) -> list[int]:
    rows = read_metrics(str(run_dir)) if rows is None else rows
    return [row["step"] for row in rows if "loss" in row]


def test_planted_then_train_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "planted"
    made = run_cli(
        "planted", data, "d_model=16", "n_features=32", "n_tokens=16384", "mean_active=3"
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert f"to {data}" in made.stdout

    config_dict = tiny_config_dict(tmp_path, data)
    config_dict["tracker"] = {"wandb_mode": "offline"}
    config_path = write_config(tmp_path / "train.yaml", config_dict)
    env = cli_env(WANDB_DIR=str(tmp_path / "wandb"), WANDB_CACHE_DIR=str(tmp_path / "cache"))
    # A dead window of one batch: latents die and AuxK runs at every logged step of the CLI's run
    # (with two batches, one latent died and revived on alternate steps: AuxK ran at odd steps).
    overrides = [
        "train.steps=6",
        "train.log_every=2",
        "checkpoint.every_steps=3",
        "sae.dead_window_tokens=64",
    ]
    trained = run_cli("train", config_path, *overrides, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert_no_traceback(trained.stderr)
    assert "training done: 6 steps, 384 tokens" in trained.stdout

    expected = load_config(TrainConfig, config_path, overrides)
    run_dir = Path(run_dir_of(expected))
    assert load_config(TrainConfig, run_dir / "config.yaml") == expected
    rows = read_metrics(str(run_dir))
    assert _train_steps(run_dir, rows) == [2, 4, 6]
    rows_with_loss = [r for r in rows if "loss" in r]
    assert all(
        np.isfinite(r["loss"]) and r["tokens"] == 64 * r["step"] for r in rows if "loss" in r
    )
    assert any("planted_recovery" in r for r in rows)
    assert all(r["aux_loss"] > 0 for r in rows_with_loss[1:]), "AuxK did not run"
    assert committed_steps(run_dir / "checkpoints") == [3, 6]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb")), list(
        run_dir.rglob("*")
    )

    # Re-running a finished run trains nothing more and leaves its checkpoints alone.
    checkpoint_files = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    again = run_cli("train", config_path, *overrides, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training done: 6 steps" in again.stdout
    assert _train_steps(run_dir, read_metrics(str(run_dir))[len(rows) :]) == []
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == (
        checkpoint_files
    )


def test_sigterm_checkpoints_then_resumes(tmp_path: Path, planted_url: str) -> None:
    config = tiny_config(
        tmp_path,
        planted_url,
        # Constant lr, so the resume below may end the run early (train.steps=reached + 2).
        optimizer={"decay_fraction": 0.0},
        train={"steps": 100_000, "log_every": 1},
        checkpoint={"every_steps": 1000, "async_save": True},
    )
    config_path = write_config(tmp_path / "train.yaml", config)
    run_dir = run_dir_of(config)
    log = tmp_path / "train.log"
    proc = start_cli("train", config_path, log=log)
    try:
        deadline = time.monotonic() + 120
        while not has_metrics(run_dir) or not _train_steps(run_dir):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step was logged in 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - signalled < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert_no_traceback(output)
    reached = int(re.search(r"training preempted: .* (\d+) steps", output).group(1))
    assert 1 <= reached < 1000  # stopped mid-run, not at a scheduled checkpoint
    assert committed_steps(Path(run_dir) / "checkpoints") == [reached]
    assert _train_steps(run_dir)[-1] == reached
    _, restored = restore_final(config)
    assert restored.step == reached and restored.data_position == reached

    # Re-running resumes from that checkpoint (in-process: the CLI path is covered above).
    rows_before = len(read_metrics(run_dir))
    resumed = main(with_overrides(config, f"train.steps={reached + 2}"))
    assert resumed.steps == reached + 2 and not resumed.preempted
    new_rows = read_metrics(run_dir)[rows_before:]
    assert _train_steps(run_dir, new_rows) == [reached + 1, reached + 2]


# --- bad input: exit status 2, one message naming the field or file, no traceback -------------


def _nan_dataset(url: str) -> None:
    """A committed dataset whose shard holds a NaN (write_shard refuses NaN, so patch the .bin)."""
    # 512 rows: the 8 steps of the tiny run read all of them.
    rows = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
    info = write_shard(url, 0, rows, "float32")
    rows[300, 3] = np.nan
    (Path(url) / shard_bin_name(0)).write_bytes(rows.astype("<f4").tobytes())
    commit_manifest(url, [info], source_model="test", hook="nan", layer=None)


def _truncated_dataset(url: str) -> None:
    make_planted(url)
    shard = Path(url) / shard_bin_name(1)
    shard.write_bytes(shard.read_bytes()[:-100])


BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    # case: (overrides, regex the message must match)
    "unknown-key": (["sae.kk=3"], r"sae\.(topk\.)?kk: unknown key"),
    "invalid-value": (["optimizer.lr=-1"], r"optimizer\.lr: Input should be greater than 0"),
    "unknown-architecture": (
        ["sae.architecture=nope"],
        r"sae: Input tag 'nope' .* expected tags: 'topk', 'batchtopk', 'jumprelu', 'relu_l1'",
    ),
    "missing-data": (
        ["data.path={tmp}/nowhere"],
        r"no activation dataset at {tmp}/nowhere: the path does not exist; check data\.path",
    ),
    "truncated-shard": (
        ["data.path={tmp}/truncated"],
        r"{tmp}/truncated/shards/shard-00001\.bin: \d+ bytes, expected \d+ \(truncated",
    ),
    "nan-shard": (
        ["data.path={tmp}/nan"],
        # The NaN changed the bytes: the block checksum catches it before the value scan would.
        r"{tmp}/nan/shards/shard-00000\.bin: block 4 \(rows \[256, 320\)\) fails its CRC32 check",
    ),
    "d-model-mismatch": (
        ["sae.d_model=8"],
        r"sae\.d_model=8 but the dataset {data} has d_model 16",
    ),
    "resume-other-config": (
        ["run.name=existing", "sae.k=8"],
        r"{tmp}/runs/existing/checkpoints holds a checkpoint of a different run:\n"
        r"  sae\.k: checkpoint has 4, config has 8",
    ),
}


@pytest.fixture(scope="module")
def bad_input_runs(
    tmp_path_factory: pytest.TempPathFactory, planted_url: str
) -> dict[str, tuple[subprocess.CompletedProcess[str], str]]:
    """Run every bad-input case at once (each is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("bad")
    _nan_dataset(str(tmp / "nan"))
    _truncated_dataset(str(tmp / "truncated"))
    config = tiny_config(tmp, planted_url, train={"steps": 2}, run={"name": "existing"})
    main(config)  # a finished run with a checkpoint (sae.k=4)
    config_path = write_config(tmp / "train.yaml", tiny_config(tmp, planted_url))

    procs = {}
    for case, (overrides, _) in BAD_INPUTS.items():
        args = [o.format(tmp=tmp) for o in overrides]
        procs[case] = subprocess.Popen(
            cli_command("train", config_path, *args),
            cwd=REPO_ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[case] = (
            subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
            BAD_INPUTS[case][1].format(tmp=re.escape(str(tmp)), data=re.escape(planted_url)),
        )
    return results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clean_error(bad_input_runs, case: str) -> None:
    result, pattern = bad_input_runs[case]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert_no_traceback(result.stderr)
    assert re.search(r"dictlearn train: error: (.|\n)*" + pattern, result.stderr), result.stderr


def test_readme_trainer_quick_start_runs_from_a_fresh_directory(tmp_path: Path) -> None:
    """The README's trainer quick start (its second command block, verbatim) with its relative
    paths. (The main command, the pipeline, is tested in tests/launch/test_pipeline.py.)"""
    readme = (REPO_ROOT / "README.md").read_text()
    quick_start = readme.split("```bash")[2].split("```", 1)[0]
    calls = readme_dictlearn_calls(quick_start)
    assert [c[0] for c in calls] == ["planted", "train"]
    # The config path is relative to the checkout; everything it writes is relative to cwd.
    calls[1][1] = str(REPO_ROOT / calls[1][1])
    env = cli_env() | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    for call in calls:
        result = run_cli(*call, env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "training done: 300 steps" in result.stdout
    assert "planted_recovery" in result.stdout
    assert (tmp_path / "runs" / "topk-256-s0" / "checkpoints").is_dir()
