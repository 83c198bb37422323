"""Multi-host training under a real local Ray cluster: 2 JAX processes x 4 CPU devices.

Each run starts two Ray trainer actors that join one ``jax.distributed`` program (gloo
collectives over loopback) and train on a ``data=4 x model=2`` mesh, the same mesh a single
process builds over its 8 virtual devices.

Why 2 processes and 1 process agree only to float32 rounding: the data-parallel sums (the loss,
gradients and metrics psum over ``data``) run in XLA's in-process all-reduce on one process, which
adds the four replicas in rank order, ``((x0 + x1) + x2) + x3``, and in gloo's ring all-reduce
across processes, which associates them differently for each chunk of the buffer (checked on this
stack: no single order reproduces gloo's result element-wise). Float addition is not associative,
so the first step already differs in the last bit and the difference stays at a few ulps. Runs
with the same process count are bit-identical, so every resume check compares like with like.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import ray

from dictlearn.config import ConfigError
from dictlearn.ray_cluster import local_ray_cluster
from dictlearn.tracking import read_metrics
from dictlearn.train.config import TrainConfig
from dictlearn.train.trainer import TrainResult, run_dir_of
from dictlearn.train.trainer import main as train_in_process
from launch import multihost
from tests.train.helpers import (
    assert_trees_equal,
    cli_env,
    committed_steps,
    make_planted,
    restore_final,
    start_cli,
    tiny_config,
    with_overrides,
    write_config,
)

STEPS = 40
EVERY = 10
HALF = STEPS // 2
TWO_HOSTS = {"hosts": 2, "devices_per_host": 4}

# 2 processes vs 1 (see the module docstring), float32 (ulp 1.2e-7 relative). Measured over 40
# steps: every floating-point leaf of the state (params, Adam moments) within 2.0e-7 of the leaf's
# largest magnitude, logged losses within 1.7e-7 relative. The bounds leave a 5x margin; a real
# fault (a host reading the wrong rows, a missing reduction) moves values by O(1).
STATE_TOL = 1e-6
"""max |2-process - 1-process| over a leaf, relative to the leaf's largest magnitude."""
METRIC_RTOL = 1e-6
# Integer leaves and metrics that must agree exactly even across process counts.
EXACT_METRICS = ("l0", "dead_fraction", "dead_count_next", "lr", "sparsity_scale", "tokens")
CLOSE_METRICS = ("loss", "mse", "fvu", "grad_norm", "aux_loss")


@pytest.fixture(scope="module")
def ray_address() -> Any:
    """One local Ray cluster for the module (4 CPUs: two trainer actors plus room to spare)."""
    with local_ray_cluster(num_cpus=4):
        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("multihost")
    make_planted(path / "data")
    return path


def _config(root: Path, name: str, **ray_section: Any) -> TrainConfig:
    return tiny_config(
        root,
        root / "data",
        # A dead window of two batches: latents die and AuxK runs (switched on the device) in
        # every run here, across the kill/resume points too.
        sae={"dead_window_tokens": 128},
        mesh={"data": 4, "model": 2},
        train={"steps": STEPS, "log_every": 1},
        # Async saves, as in production: a kill usually lands while one is being written.
        checkpoint={"every_steps": EVERY, "keep": 5, "async_save": True},
        run={"name": name},
        ray=ray_section,
    )


@pytest.fixture(scope="module")
def single(root: Path, ray_address: str) -> TrainConfig:
    """An uninterrupted run in this process (8 devices): the reference for other process counts.

    (After ``ray_address``: Ray forks its processes before JAX starts threads here.)
    """
    config = _config(root, "single")
    assert train_in_process(config).steps == STEPS
    return config


@pytest.fixture(scope="module")
def multi(root: Path, ray_address: str) -> tuple[TrainConfig, TrainResult]:
    """An uninterrupted 2-host run: the bit-exact reference for 2-host resumes."""
    config = _config(root, "multi", **TWO_HOSTS)
    return config, multihost.main(config)


def _train_rows(config: TrainConfig) -> list[dict[str, Any]]:
    return [row for row in read_metrics(run_dir_of(config)) if "loss" in row]


def assert_states_close(actual: Any, expected: Any) -> None:
    """Integer leaves equal; floating-point leaves within STATE_TOL of the leaf's scale.

    Scaled by the leaf's largest magnitude, not element-wise: a sum's rounding error is an ulp
    of its largest terms, so near-zero elements (Adam moments) carry errors far above their own
    ulp (up to 4e-6 relative here) without anything being wrong.
    """
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
    for path, a, e in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(e))
        assert a.dtype == e.dtype and a.shape == e.shape, path
        if np.issubdtype(a.dtype, np.floating):
            scale = float(np.max(np.abs(e), initial=0.0))
            error = float(np.max(np.abs(a - e), initial=0.0))
            assert error <= STATE_TOL * scale, f"{path}: max error {error:.3g}, scale {scale:.3g}"
        else:
            np.testing.assert_array_equal(a, e, err_msg=path)


def assert_rows_close(actual: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected, strict=True):
        for key in EXACT_METRICS:
            assert a.get(key) == e.get(key), (a["step"], key)
        for key in CLOSE_METRICS:
            np.testing.assert_allclose(
                a[key], e[key], rtol=METRIC_RTOL, err_msg=f"{a['step']} {key}"
            )


def _copy_checkpoint(source: TrainConfig, target: TrainConfig, step: int) -> None:
    """Start ``target``'s run directory with ``source``'s checkpoint of ``step`` only."""
    src = Path(run_dir_of(source)) / "checkpoints" / str(step)
    shutil.copytree(src, Path(run_dir_of(target)) / "checkpoints" / str(step))


def test_two_hosts_match_one_process(
    single: TrainConfig, multi: tuple[TrainConfig, TrainResult]
) -> None:
    config, result = multi
    assert result.steps == STEPS and not result.preempted
    _, two = restore_final(config)
    _, one = restore_final(single)
    assert two.step == one.step == STEPS
    assert two.data_position == one.data_position == STEPS
    assert_states_close(two.state, one.state)

    # Only process 0 wrote metrics: one row per step, matching the single process's.
    assert_rows_close(_train_rows(config), _train_rows(single))
    assert any(r["aux_loss"] > 0 for r in _train_rows(config)), "AuxK never ran"
    expected = {r["step"]: r for r in read_metrics(run_dir_of(single))}
    recovery = [r for r in read_metrics(run_dir_of(config)) if "planted_recovery" in r]
    assert len(recovery) == 1
    np.testing.assert_allclose(
        recovery[0]["planted_recovery"], expected[STEPS]["planted_recovery"], rtol=METRIC_RTOL
    )
    assert result.eval_metrics["planted_recovery"] == recovery[0]["planted_recovery"]
    assert (Path(run_dir_of(config)) / "config.yaml").is_file()


def test_checkpoints_move_between_one_and_two_hosts(
    root: Path, single: TrainConfig, multi: tuple[TrainConfig, TrainResult]
) -> None:
    multi_config, _ = multi
    # Written by 2 processes, continued by 1.
    two_to_one = _config(root, "two_to_one")
    _copy_checkpoint(multi_config, two_to_one, HALF)
    assert train_in_process(two_to_one).steps == STEPS
    # Written by 1 process, continued by 2.
    one_to_two = _config(root, "one_to_two", **TWO_HOSTS)
    _copy_checkpoint(single, one_to_two, HALF)
    assert multihost.main(one_to_two).steps == STEPS

    _, reference = restore_final(single)
    reference_rows = _train_rows(single)[HALF:]
    for config in (two_to_one, one_to_two):
        _, final = restore_final(config)
        assert final.step == STEPS and final.data_position == STEPS, config.run_name
        assert_states_close(final.state, reference.state)
        # Resumed from the copied checkpoint: only the second half was trained (and logged).
        assert_rows_close(_train_rows(config), reference_rows)


class _HostLog(logging.Handler):
    """Collects the driver's "trainer host R/N (pid P on IP)" lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pids: dict[int, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if m := re.match(r"trainer host (\d+)/\d+ \(pid (\d+) ", record.getMessage()):
            self.pids[int(m[1])] = int(m[2])


def _when_checkpointed(
    checkpoint_dir: Path, act: Any, timeout: float = 240
) -> tuple[threading.Thread, dict[str, Any]]:
    """In a thread: once a checkpoint has committed, call ``act()``; record what and when."""
    done: dict[str, Any] = {}

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = committed_steps(checkpoint_dir)
            if steps:
                done["value"] = act()
                done["at"] = time.monotonic()
                done["step"] = steps[-1]
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done


@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_killed_host_fails_fast_and_resume_matches(
    root: Path, multi: tuple[TrainConfig, TrainResult], rank: int
) -> None:
    multi_config, _ = multi
    config = _config(root, f"killed{rank}", **TWO_HOSTS)
    checkpoint_dir = Path(run_dir_of(config)) / "checkpoints"
    hosts = _HostLog()
    logging.getLogger(multihost.__name__).addHandler(hosts)
    logging.getLogger(multihost.__name__).setLevel(logging.INFO)

    def kill() -> int:
        pid = hosts.pids[rank]
        os.kill(pid, signal.SIGKILL)
        return pid

    try:
        thread, killed = _when_checkpointed(checkpoint_dir, kill)
        with pytest.raises(multihost.HostFailure) as failure:
            multihost.main(config)
        failed_after = time.monotonic() - killed["at"]
        thread.join()
    finally:
        logging.getLogger(multihost.__name__).removeHandler(hosts)

    # Prompt (not a collective timeout of minutes), naming the dead host and the checkpoint.
    # Measured here: 0.05-0.2 s from the kill to the driver's error.
    assert failed_after < 10, failed_after
    message = str(failure.value)
    left = committed_steps(checkpoint_dir)
    assert left and EVERY <= left[-1] < STEPS, (left, message)
    assert f"trainer host {rank}/2 (pid {killed['value']} " in message, message
    assert f"step {left[-1]} in {checkpoint_dir}" in message, message
    # Neither host is left running: the survivor was killed, not left in a collective (ray.kill
    # returns before the process has exited; it takes milliseconds).
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in hosts.pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in hosts.pids.values()), hosts.pids

    # The named checkpoint is intact: it restores, and every value is finite.
    _, restored = restore_final(config)
    assert restored.step == restored.data_position == left[-1]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.state))

    # Re-running resumes from it and ends bit-identical to the uninterrupted 2-host run.
    logged_before = [r for r in _train_rows(config) if r["step"] <= left[-1]]
    assert multihost.main(config).steps == STEPS
    _, resumed = restore_final(config)
    _, expected = restore_final(multi_config)
    assert resumed.data_position == expected.data_position == STEPS
    assert_trees_equal(resumed.state, expected.state)
    # The resumed run drops the rows logged after the checkpoint (before the kill) and logs those
    # steps again: every step once, in order, as in the uninterrupted run.
    rows = _train_rows(config)
    assert [r["step"] for r in rows] == [r["step"] for r in _train_rows(multi_config)]
    assert rows[: len(logged_before)] == logged_before  # the rows up to the checkpoint are kept
    new_rows = [r for r in rows if r["step"] > left[-1]]
    assert [r["step"] for r in new_rows] == list(range(left[-1] + 1, STEPS + 1))
    reference = {r["step"]: r for r in _train_rows(multi_config)}
    for row in new_rows:
        for key in (*CLOSE_METRICS, "l0"):
            assert row[key] == reference[row["step"]][key], (row["step"], key)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its raylet) is not running either.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


# ~40 s; the killed-host test covers the same stop-and-resume path in the default run.
@pytest.mark.slow
def test_sigterm_to_driver_checkpoints_then_resumes(
    root: Path, multi: tuple[TrainConfig, TrainResult], ray_address: str
) -> None:
    """``dictlearn train CONFIG ray.hosts=2`` as a subprocess; SIGTERM it like a preemption."""
    multi_config, _ = multi
    config = _config(root, "preempted", **TWO_HOSTS)
    checkpoint_dir = Path(run_dir_of(config)) / "checkpoints"
    config_path = write_config(root / "preempted.yaml", config)
    log = root / "preempted.log"
    proc = start_cli(
        "train", config_path, f"ray.address={ray_address}", env=cli_env(devices=1), log=log
    )
    try:
        thread, _ = _when_checkpointed(checkpoint_dir, lambda: proc.send_signal(signal.SIGTERM))
        proc.wait(timeout=300)
        thread.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "training preempted: checkpoint written, re-run to resume" in output, output[-3000:]
    saved = committed_steps(checkpoint_dir)
    assert saved and EVERY < saved[-1] < STEPS, saved
    match = re.search(
        r"training preempted: checkpoint written, re-run to resume: (\d+) steps", output
    )
    assert match and int(match[1]) == saved[-1], output[-3000:]

    # Re-running resumes from the preemption checkpoint and matches the uninterrupted run.
    assert multihost.main(config).steps == STEPS
    _, resumed = restore_final(config)
    _, expected = restore_final(multi_config)
    assert_trees_equal(resumed.state, expected.state)
    steps = [r["step"] for r in _train_rows(config)]
    assert steps == list(range(1, STEPS + 1)), steps


def test_config_that_does_not_split_over_hosts_fails_before_starting(root: Path) -> None:
    two = _config(root, "bad", **TWO_HOSTS)
    cases = {
        "train.batch_size=65": r"train.batch_size=65 must be a multiple of ray.hosts=2",
        "mesh.data=1 mesh.model=8": r"mesh.data=1 must be a multiple of ray.hosts=2",
        "mesh.data=-1 mesh.model=8": r"mesh.model=8 spans hosts",
        "mesh.data=2 mesh.model=2": r"does not tile ray.hosts=2 x ray.devices_per_host=4 = 8",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            multihost.main(with_overrides(two, *overrides.split()))


def test_cluster_without_room_fails_with_a_clear_message(root: Path, ray_address: str) -> None:
    config = _config(root, "no_room", hosts=2, resources_per_host={"TPU": 4}, start_timeout_s=1)
    with pytest.raises(multihost.HostFailure, match=r"no room for ray.hosts=2 trainer actors"):
        multihost.main(config)
