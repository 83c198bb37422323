"""Resuming: bit-identity after SIGKILL, and restoring a checkpoint onto meshes of other shapes."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dictlearn.tracking import read_metrics
from dictlearn.train.trainer import main, run_dir_of
from sharding import MeshConfig, make_mesh
from tests.train.helpers import (
    ARCHITECTURES,
    assert_trees_equal,
    committed_steps,
    make_planted,
    restore_final,
    run_cli,
    start_cli,
    tiny_config,
    with_overrides,
    write_config,
)

# The kill window (from the middle checkpoint to the end) spans 50 steps and 5 saves, about a
# second, while a poll takes milliseconds: the kill lands mid-run even on a loaded machine.
KILL_STEPS = 100
KILL_EVERY = 10


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _train_rows(run_dir: str) -> list[dict]:
    """Metric rows of training steps (not eval or planted-recovery rows)."""
    return [row for row in read_metrics(run_dir) if "loss" in row]


def _kill_mid_run(config_path: Path, checkpoint_dir: Path, log: Path, steps: int) -> int:
    """Start ``dictlearn train``, SIGKILL it once a checkpoint past the middle has committed.

    Returns the newest committed step left behind.
    """
    proc = start_cli("train", config_path, log=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = committed_steps(checkpoint_dir)
            if done and done[-1] >= steps // 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-training (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    )
    left = committed_steps(checkpoint_dir)
    assert left and steps // 2 <= left[-1] < steps, left
    return left[-1]


# "topk+auxk": a dead window of two batches, so latents die and AuxK runs (on the device's
# choice, step by step) before and after the kill.
RESUMED = {a: {"architecture": a} for a in ARCHITECTURES} | {
    "topk+auxk": {"architecture": "topk", "dead_window_tokens": 128},
    # The steered L0 weight is architecture state; the first-batch thresholds run only on a
    # fresh start, never on the resume.
    "jumprelu+target": {"architecture": "jumprelu", "init_l0": 8.0, "target_l0": 8.0},
}


@pytest.mark.parametrize(
    "architecture",
    [
        pytest.param(a, marks=() if a in ("topk+auxk", "batchtopk") else pytest.mark.slow)
        for a in RESUMED
    ],
)
def test_resume_after_sigkill_is_bit_identical(
    tmp_path: Path, planted_url: str, architecture: str
) -> None:
    config = tiny_config(
        tmp_path,
        planted_url,
        sae=RESUMED[architecture],
        mesh={"data": 4, "model": 2},
        train={"steps": KILL_STEPS, "log_every": 1},
        # Async saves: the kill usually lands while one is being written.
        checkpoint={"every_steps": KILL_EVERY, "keep": 2, "async_save": True},
        run={"name": "killed"},
    )
    # Checkpoint cadence may change on resume without changing the result, so the reference
    # skips the intermediate saves.
    reference = with_overrides(config, "run.name=reference", f"checkpoint.every_steps={KILL_STEPS}")
    main(reference)

    config_path = write_config(tmp_path / "train.yaml", config)
    checkpoint_dir = Path(run_dir_of(config)) / "checkpoints"
    resumed_from = _kill_mid_run(config_path, checkpoint_dir, tmp_path / "killed.log", KILL_STEPS)

    rerun = run_cli("train", config_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (
        f"resuming {run_dir_of(config)} from step {resumed_from} "
        f"(checkpoint {checkpoint_dir}/{resumed_from}, data position {resumed_from})"
    ) in rerun.stderr, rerun.stderr[-3000:]

    _, resumed = restore_final(config)
    _, expected = restore_final(reference)
    assert resumed.step == expected.step == KILL_STEPS
    assert resumed.data_position == expected.data_position == KILL_STEPS
    assert_trees_equal(resumed.state, expected.state)

    # Every step's row is there once (the killed run's rows after its checkpoint were dropped
    # and logged again), with the reference's values.
    rows = _train_rows(run_dir_of(config))
    assert [r["step"] for r in rows] == list(range(1, KILL_STEPS + 1))
    reference_rows = {r["step"]: r for r in _train_rows(run_dir_of(reference))}
    for row in rows:
        for key in ("loss", "mse", "l0", "aux_loss", "l0_coef"):
            assert row.get(key) == reference_rows[row["step"]].get(key), (row["step"], key)
    if architecture == "jumprelu+target":
        assert len({r["l0_coef"] for r in rows}) > 2, "the L0 weight never moved"
    if architecture == "topk+auxk":
        after = [r for r in rows if r["step"] > resumed_from]
        assert any(r["aux_loss"] > 0 for r in after), "AuxK never ran after the resume"


# ~20 s; tests/launch/test_multihost.py moves checkpoints between meshes in the default run.
@pytest.mark.slow
def test_restore_onto_other_meshes_and_continue(tmp_path: Path, planted_url: str) -> None:
    config = tiny_config(
        tmp_path,
        planted_url,
        sae={"architecture": "batchtopk"},  # has arch_state (the threshold EMA) as well as params
        mesh={"data": 2, "model": 4},
        # Constant lr: the finished run may then be extended (train.steps=9 below).
        optimizer={"decay_fraction": 0.0},
        train={"steps": 6, "log_every": 1},
        checkpoint={"every_steps": 3, "keep": 5},
    )
    main(config)
    _, original = restore_final(config)
    assert original.step == 6

    targets = {
        "data=4,model=2": make_mesh(MeshConfig(data=4, model=2)),
        "data=1,model=1": make_mesh(MeshConfig(data=1, model=1), devices=jax.devices()[:1]),
    }
    for name, mesh in targets.items():
        program, restored = restore_final(config, mesh=mesh)
        assert restored.step == 6 and restored.data_position == original.data_position, name
        assert_trees_equal(restored.state, original.state)
        expected_shardings = jax.tree.leaves(program.state_shardings)
        for leaf, sharding in zip(jax.tree.leaves(restored.state), expected_shardings, strict=True):
            assert leaf.sharding.mesh.shape == mesh.shape, name
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (name, leaf.sharding)
        # The restored state is directly usable by the new mesh's compiled step.
        state, metrics = program.train_step(
            restored.state, program.global_batch_array(np.ones((64, 16), np.float32))
        )
        assert np.isfinite(float(metrics["loss"])), name
        assert int(state.step) == 7

    # Resuming the run itself on another mesh (mesh may change between a run and its resume),
    # against a copy of it continued on the original mesh: the same computation, up to the
    # order of floating-point reductions.
    stay = with_overrides(config, "run.name=stay")
    shutil.copytree(run_dir_of(config), run_dir_of(stay))
    moved = main(with_overrides(config, "mesh.data=4", "mesh.model=2", "train.steps=9"))
    assert moved.steps == 9 and not moved.preempted
    assert main(with_overrides(stay, "train.steps=9")).steps == 9
    moved_rows = {r["step"]: r for r in _train_rows(moved.run_dir)}
    assert sorted(moved_rows) == list(range(1, 10))  # steps 1-6 from the first run, then 7-9
    program, moved_final = restore_final(with_overrides(config, "mesh.data=4", "mesh.model=2"))
    assert moved_final.step == 9
    assert moved_final.state.params["W_enc"].sharding.mesh.shape == {"data": 4, "model": 2}
    _, stay_final = restore_final(stay)
    for key, value in stay_final.state.params.items():
        np.testing.assert_allclose(
            np.asarray(moved_final.state.params[key]), np.asarray(value), rtol=1e-5, atol=1e-6
        )
