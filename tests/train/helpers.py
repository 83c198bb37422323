"""Tiny train configs, planted datasets and CLI subprocess helpers shared by the trainer tests.

make_planted(tmp_path / "data")
cfg = tiny_config(tmp_path, str(tmp_path / "data"), sae={"architecture": "jumprelu"})
result = main(cfg)
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from dictlearn.config import apply_overrides, validate
from dictlearn.data import PlantedConfig, PlantedTruth, write_planted_dataset
from dictlearn.train.checkpoint import Checkpointer
from dictlearn.train.config import TrainConfig
from dictlearn.train.trainer import build_program, open_dataset, run_dir_of

REPO_ROOT = Path(__file__).resolve().parents[2]

# Per-architecture SAE sections of a tiny run: 64 latents, sized so every test step takes
# milliseconds. The dead window is long enough that no latent can die within a test's steps,
# so the AuxK path is not even compiled (tests that want it set a short window).
TINY_SAE: dict[str, dict[str, Any]] = {
    "topk": {"architecture": "topk", "n_features": 64, "k": 4, "k_aux": 16},
    "batchtopk": {"architecture": "batchtopk", "n_features": 64, "k": 4},
    "jumprelu": {"architecture": "jumprelu", "n_features": 64, "l0_coef": 0.01},
    "relu_l1": {"architecture": "relu_l1", "n_features": 64, "l1_coef": 0.1},
}
ARCHITECTURES = tuple(TINY_SAE)


def make_planted(
    url: str | os.PathLike[str],
    d_model: int = 16,
    n_features: int = 32,
    n_tokens: int = 16384,
    **fields: Any,
) -> PlantedTruth:
    """Write (idempotently) a small planted dataset at ``url``; extra fields go to PlantedConfig."""
    cfg = PlantedConfig(
        d_model=d_model,
        n_features=n_features,
        n_tokens=n_tokens,
        mean_active=fields.pop("mean_active", 3.0),
        shard_tokens=fields.pop("shard_tokens", 8192),
        **fields,
    )
    return write_planted_dataset(str(url), cfg)


def tiny_config_dict(
    tmp_path: str | os.PathLike[str], data_url: str | os.PathLike[str], **overrides: Any
) -> dict[str, Any]:
    """The tiny config as a plain dict (what a YAML file for the CLI holds).

    ``overrides`` are top-level sections merged into the defaults, e.g.
    ``train={"steps": 5}``. An ``sae`` section naming another architecture starts from that
    architecture's tiny defaults rather than topk's (their fields differ).
    """
    sae = dict(overrides.pop("sae", {}))
    data: dict[str, Any] = {
        "data": {"path": str(data_url), "block_rows": 64, "shuffle_blocks": 4},
        "sae": TINY_SAE[sae.get("architecture", "topk")] | sae,
        "optimizer": {"lr": 1e-3, "warmup_steps": 2},
        "mesh": {"data": -1, "model": 2},
        "train": {"batch_size": 64, "steps": 8, "log_every": 1},
        "checkpoint": {"every_steps": 4, "async_save": False},
        "tracker": {"wandb_mode": "disabled"},
        "run": {"output_dir": str(Path(tmp_path) / "runs"), "name": "tiny"},
    }
    for section, values in overrides.items():
        data[section] = data.get(section, {}) | dict(values)
    return data


def tiny_config(
    tmp_path: str | os.PathLike[str], data_url: str | os.PathLike[str], **overrides: Any
) -> TrainConfig:
    """A validated tiny :class:`TrainConfig`; see :func:`tiny_config_dict` for ``overrides``."""
    return validate(TrainConfig, tiny_config_dict(tmp_path, data_url, **overrides))


def with_overrides(config: TrainConfig, *dotted: str) -> TrainConfig:
    """``config`` with dotted ``key.sub=value`` overrides applied, as the CLI would."""
    return validate(TrainConfig, apply_overrides(config.model_dump(mode="json"), list(dotted)))


def write_config(path: str | os.PathLike[str], config: TrainConfig | dict[str, Any]) -> Path:
    """Write a config (model or dict) as YAML for ``dictlearn train``; returns the path."""
    data = config.model_dump(mode="json") if isinstance(config, TrainConfig) else config
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env(devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment for a ``dictlearn`` subprocess: ``devices`` virtual CPU devices, no tqdm."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TQDM_DISABLE="1",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def cli_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *map(str, args)]


def run_cli(
    *args: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``dictlearn ARGS`` to completion in a subprocess, capturing its output."""
    return subprocess.run(
        cli_command(*args),
        cwd=REPO_ROOT if cwd is None else cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None, log: Path
) -> subprocess.Popen[bytes]:
    """Start ``dictlearn ARGS`` in the background, stdout and stderr going to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cli_command(*args),
            cwd=REPO_ROOT,
            env=cli_env() if env is None else env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def committed_steps(checkpoint_dir: str | os.PathLike[str]) -> list[int]:
    """Steps with a committed checkpoint, read from the directory listing alone.

    Orbax writes a step under a temporary name and renames it to the bare step number when it
    commits, so only all-digit names count. Safe to call while another process is writing.
    """
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, f"expected a clean error, got a traceback:\n{stderr}"


def restore_final(config: TrainConfig, mesh: Mesh | None = None, step: int | None = None):
    """Restore a run's checkpoint (default: latest) onto ``mesh`` (default: the config's).

    Returns:
        ``(program, restored)``: the :class:`TrainProgram` whose abstract state was the target,
        and the :class:`~dictlearn.train.checkpoint.Restored` checkpoint.
    """
    dataset = open_dataset(config)
    program = build_program(config, dataset, mesh=mesh)
    checkpointer = Checkpointer(f"{run_dir_of(config)}/checkpoints", async_save=False)
    try:
        return program, checkpointer.restore(program.abstract_state(), step)
    finally:
        checkpointer.close()


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Same tree structure and bit-identical leaves (NaN-aware, dtype-exact)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
    for path, a, e in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(e))
        assert a.dtype == e.dtype and a.shape == e.shape, (
            f"{path}: {a.dtype}{a.shape} vs {e.dtype}{e.shape}"
        )
        assert np.array_equal(a, e, equal_nan=True), f"{path} differs"


def readme_dictlearn_calls(block: str) -> list[list[str]]:
    """The ``dictlearn`` calls of a README command block, as argument lists without the
    launcher (``python3 -m uv run --frozen dictlearn``, as the README writes them)."""
    calls = []
    for part in block.split("&&"):
        words = shlex.split(part.strip())
        launcher = ["python3", "-m", "uv", "run", "--frozen", "dictlearn"]
        if words[: len(launcher)] == launcher:
            calls.append(words[len(launcher) :])
    return calls
