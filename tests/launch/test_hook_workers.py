"""The pipeline's train stage on several hooks: each hook's group on a Ray worker of its own.

The config and placement tests are pure; the end-to-end test runs real Ray workers on a local
cluster, training real groups on planted datasets laid out where the generate stage puts them.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from dictlearn.config import ConfigError
from dictlearn.ray_cluster import local_ray_cluster
from dictlearn.tracking import read_metrics
from launch.hook_workers import shared_cluster_resources
from launch.pipeline import PipelineConfig, load_pipeline_config, main, plan_stages
from tests.train.helpers import (
    assert_no_traceback,
    cli_env,
    committed_steps,
    make_planted,
    run_cli,
    start_cli,
)

HOOKS = ["resid_post.1", "resid_post.2"]
TWO_HOOKS = [f"generate.hooks=[{', '.join(HOOKS)}]", "train.widths=[32, 64]"]


def _config(*overrides: str) -> PipelineConfig:
    return load_pipeline_config(None, list(overrides))


def test_only_several_hooks_groups_go_to_workers() -> None:
    assert _config(*TWO_HOOKS).hooks_on_workers
    assert not _config(*TWO_HOOKS, "train.hook_workers.parallel=false").hooks_on_workers
    assert not _config(*TWO_HOOKS, "train.hook=resid_post.2").hooks_on_workers  # one group
    assert not _config(TWO_HOOKS[0]).hooks_on_workers  # one SAE, on the first hook
    assert not _config("train.widths=[32, 64]").hooks_on_workers  # the default: one hook


def test_worker_settings_are_execution_only() -> None:
    base = {k: p.version for k, p in plan_stages(_config(*TWO_HOOKS)).items()}
    placed = _config(
        *TWO_HOOKS,
        "train.hook_workers.gpus=1",
        "train.hook_workers.cpus=4",
        "train.hook_workers.max_concurrent=1",
        "train.hook_workers.address=auto",
        "train.hook_workers.parallel=false",
    )
    assert {k: p.version for k, p in plan_stages(placed).items()} == base
    # Nor do they reach the trainer's config (which would refuse an unknown key).
    for plan in plan_stages(placed).values():
        assert "hook_workers" not in plan.config.model_dump()


def test_worker_resources_and_cluster_size() -> None:
    workers = _config(
        *TWO_HOOKS,
        "train.hook_workers.cpus=2",
        "train.hook_workers.gpus=1",
        "train.hook_workers.resources={accel: 0.5}",
        "train.hook_workers.max_restarts=2",
    ).train.hook_workers
    rc = workers.ray_config(hooks=3)
    assert rc.num_workers == 3  # every hook at once by default
    options = rc.actor_options("w")
    assert (options["num_cpus"], options["num_gpus"], options["resources"]) == (
        2,
        1,
        {"accel": 0.5},
    )
    assert (options["max_restarts"], options["max_task_retries"]) == (2, 2)
    capped = workers.model_copy(update={"max_concurrent": 2})
    assert capped.concurrency(3) == 2 and capped.concurrency(1) == 1
    assert capped.ray_config(hooks=3).num_workers == 2  # a local cluster has room for two
    cpu_only = PipelineConfig().train.hook_workers.ray_config(hooks=2).actor_options("w")
    assert (cpu_only["num_cpus"], cpu_only["num_gpus"], cpu_only["resources"]) == (1, 0, {})


def test_generate_and_hook_workers_share_one_local_cluster_big_enough_for_either() -> None:
    config = _config(
        *TWO_HOOKS,
        "generate.ray.num_workers=3",
        "generate.ray.resources_per_worker={accel: 1}",
        "train.hook_workers.cpus=2",
        "train.hook_workers.gpus=1",
    )
    totals = shared_cluster_resources(config.generate.ray, config.train.hook_workers, hooks=2)
    assert totals == {"CPU": 4, "GPU": 2, "accel": 3}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.hook_workers.resources={CPU: 2}", r"train\.hook_workers\.resources.*cpus"),
        ("train.hook_workers.resources={GPU: 1}", r"train\.hook_workers\.resources.*gpus"),
        ("train.hook_workers.gpus=-1", r"train\.hook_workers\.gpus"),
        ("train.hook_workers.max_concurrent=0", r"train\.hook_workers\.max_concurrent"),
        ("train.hook_workers.cpu=1", r"train\.hook_workers\.cpu: unknown key"),
    ],
)
def test_bad_worker_settings_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(*TWO_HOOKS, override)


def _tiny_overrides(out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        "name=hooks",
        *TWO_HOOKS,
        "stages=[train]",
        "mesh.model=2",
        "train.sae.k=4",
        "train.sae.k_aux=16",
        "train.data={block_rows: 64, shuffle_blocks: 4, eval_fraction: 0.05}",
        "train.train.batch_size=64",
        "train.train.steps=4",
        "train.train.log_every=2",
        "train.checkpoint.every_steps=2",
        "train.tracker.wandb_mode=disabled",
        "train.optimizer.warmup_steps=1",
    ]


def _tiny(out: Path) -> PipelineConfig:
    return _config(*_tiny_overrides(out))


def _finish_generate_stage(config: PipelineConfig, hooks: list[str]) -> None:
    """Lay planted datasets out where the generate stage writes them, and mark it finished."""
    gen_dir = Path(plan_stages(config)["generate"].directory)
    for hook in hooks:
        make_planted(gen_dir / hook, n_tokens=4096, shard_tokens=2048)
    (gen_dir / "stage.json").write_text(json.dumps({"stage": "generate", "result": {}}))


# A Ray cluster, then two JAX worker processes twice: ~2.5 min on 2 shared cores. The default run
# trains two hooks' groups on Ray workers through the CLI (test_pipeline.py's widths test).
@pytest.mark.slow
def test_each_hooks_group_on_its_own_worker_and_failures_stay_per_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _tiny(tmp_path / "out")
    plans = plan_stages(config)
    # The first hook's dataset is missing: its group fails on its worker, the second finishes
    # (and is reported as run, though its stage.json is written before the pipeline reads it).
    _finish_generate_stage(config, HOOKS[1:])
    with local_ray_cluster(num_cpus=2):
        first = main(config)
        out = capsys.readouterr().out
        by_key = {s.key: s for s in first.stages}
        bad, ok = by_key[f"train:{HOOKS[0]}"], by_key[f"train:{HOOKS[1]}"]
        assert (ok.status, bad.status) == ("ran", "failed")
        assert [s.key for s in first.failed] == [f"train:{HOOKS[0]}"]
        assert HOOKS[0] in bad.error and bad.result == {}
        for width in (32, 64):
            member = ok.result["members"][f"topk-{width}"]
            assert member["steps"] == 4
            assert Path(member["run_dir"]) == Path(ok.directory) / f"topk-{width}"
        assert (Path(ok.directory) / "stage.json").is_file()
        assert not (Path(bad.directory) / "stage.json").exists()
        # Two workers, one per hook, each a process of its own (not the pipeline's).
        pids = {line.split("(pid ")[1].split()[0] for line in out.splitlines() if "(pid " in line}
        assert len(pids) == 2, out
        assert f"[train:{HOOKS[0]}] FAILED" in out and f"[train:{HOOKS[1]}] finished" in out
        record = json.loads((tmp_path / "out" / "hooks" / "pipeline.json").read_text())
        assert {s["key"]: s["status"] for s in record["stages"]} == {
            f"train:{HOOKS[0]}": "failed",
            f"train:{HOOKS[1]}": "ran",
        }

        # With its data there, a re-run trains the failed hook alone; the finished one is skipped.
        _finish_generate_stage(config, HOOKS[:1])
        again = main(config)
    statuses = {s.key: s.status for s in again.stages}
    assert statuses == {f"train:{HOOKS[0]}": "ran", f"train:{HOOKS[1]}": "skipped"}
    assert not again.failed
    retried = {s.key: s for s in again.stages}[f"train:{HOOKS[0]}"]
    assert retried.directory == plans[f"train:{HOOKS[0]}"].directory
    assert retried.result["members"]["topk-64"]["steps"] == 4


@pytest.mark.slow  # a Ray cluster and two JAX workers, twice, through the CLI: ~3 min shared
def test_sigterm_reaches_every_hooks_worker_and_a_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Long enough that SIGTERM lands mid-training (a step takes milliseconds to ~0.3 s).
    args = ["pipeline", *_tiny_overrides(out), "train.train.steps=600", "train.train.log_every=5"]
    args.append("train.checkpoint.every_steps=200")
    config = load_pipeline_config(None, args[1:])
    _finish_generate_stage(config, HOOKS)
    trains = [plan for key, plan in plan_stages(config).items() if key.startswith("train:")]
    members = [Path(plan.directory) / f"topk-{w}" for plan in trains for w in (32, 64)]
    env = cli_env(RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="disabled")
    log = tmp_path / "first.log"
    proc = start_cli(*args, env=env, log=log)
    try:
        deadline = time.monotonic() + 600
        while not all(_logged_step(m) >= 10 for m in members):  # both groups are training
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert_no_traceback(text)
    assert "pipeline preempted" in text, text[-3000:]
    record = json.loads((out / "hooks" / "pipeline.json").read_text())
    assert record["preempted"] and len(record["stages"]) == 2
    for plan in trains:
        assert not (Path(plan.directory) / "stage.json").exists()  # not finished
    stopped_at = {}
    for member in members:
        (step,) = committed_steps(member / "checkpoints")[-1:]  # saved on SIGTERM
        assert 10 <= step < 600
        stopped_at[member] = step

    again = run_cli(*args, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    record = json.loads((out / "hooks" / "pipeline.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["ran", "ran"]
    for member in members:
        steps = [row["step"] for row in read_metrics(str(member)) if "loss" in row]
        # The re-run went on from the checkpoint taken on SIGTERM, not from step 0.
        resumed = steps[steps.index(max(s for s in steps if s <= stopped_at[member])) + 1]
        assert stopped_at[member] < resumed <= stopped_at[member] + 5
        assert steps[-1] == 600


def _logged_step(run_dir: Path) -> int:
    try:
        rows = read_metrics(str(run_dir))
    except FileNotFoundError:
        return 0
    return max((row["step"] for row in rows), default=0)
