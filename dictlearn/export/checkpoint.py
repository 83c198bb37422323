"""From a training run's Orbax checkpoint to an :class:`InferenceSAE` and its provenance.

A run is named by its run directory (``runs/topk-4096-s0``), its checkpoint root
(``.../checkpoints``) or one step's directory (``.../checkpoints/300``). The train state is
restored onto a single device (any mesh wrote it), the input normalisation the trainer applied
(the dataset's ``norm_scale``) is folded into the weights so raw activations go in, and each
architecture becomes its inference rule: TopK stays ``topk``, BatchTopK becomes a JumpReLU with
its learned uniform threshold, JumpReLU keeps ``exp(log_threshold)``, ReLU+L1 is ``relu``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import subprocess
from dataclasses import dataclass
from functools import cache
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dictlearn.data import ActivationDataset, DatasetError, storage
from dictlearn.data.format import MANIFEST_NAME
from dictlearn.export.model import ExportError, InferenceSAE
from dictlearn.tracking import has_metrics, read_metrics
from dictlearn.train.checkpoint import Checkpointer
from dictlearn.train.config import TrainConfig
from dictlearn.train.step import TrainProgram
from sharding import MeshConfig, make_mesh

CHECKPOINTS = "checkpoints"
DENSITY_EPS = 1e-10
"""Added before log10 of a firing frequency (SAELens's convention, so dead latents read -10)."""


@dataclass(frozen=True)
class RunCheckpoint:
    """Where one checkpoint of a run lives."""

    run_dir: str
    checkpoint_dir: str
    step: int


def locate_checkpoint(url: str, step: int | None = None) -> RunCheckpoint:
    """Resolve a run directory, checkpoint root or step directory to one checkpoint.

    Raises:
        ExportError: nothing there is a checkpoint, or ``step`` is not one of them.
    """
    url = url.rstrip("/")
    fs, path = storage.filesystem(url)
    base = posixpath.basename(path)
    if base.isdigit() and posixpath.basename(posixpath.dirname(path)) == CHECKPOINTS:
        if step is not None and step != int(base):
            raise ExportError(
                f"{url} is the checkpoint of step {base}, but --step {step} was given"
            )
        step, url = int(base), url[: -len(base) - 1]
    if posixpath.basename(url) == CHECKPOINTS:
        run_dir, ckpt_dir = url[: -len(CHECKPOINTS) - 1], url
    else:
        run_dir, ckpt_dir = url, f"{url}/{CHECKPOINTS}"
    if not fs.exists(storage.filesystem(ckpt_dir)[1]):
        raise ExportError(
            f"{url} is not a training run: no {CHECKPOINTS}/ directory there (give a run "
            "directory, its checkpoints/ directory, or an export directory)"
        )
    checkpointer = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()
    if not steps:
        raise ExportError(f"{ckpt_dir} holds no committed checkpoint; train the run first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"{ckpt_dir} has no checkpoint at step {step}; it has steps {steps}")
    return RunCheckpoint(run_dir=run_dir, checkpoint_dir=ckpt_dir, step=step)


def load_run_sae(
    url: str,
    step: int | None = None,
    dataset_url: str | None = None,
    density_tokens: int = 0,
) -> tuple[InferenceSAE, dict[str, Any]]:
    """Restore a run's checkpoint as an :class:`InferenceSAE` in raw-activation space.

    Args:
        url: run directory, checkpoint root or step directory.
        step: checkpoint step (default: the newest).
        dataset_url: the activation dataset the run trained on (default: its ``data.path``);
            its manifest holds the input normalisation and the hook.
        density_tokens: when > 0, count each latent's firing frequency on the dataset's first
            this many rows (``log_feature_density``).

    Returns:
        The SAE and its provenance (the ``provenance`` block of native exports).

    Raises:
        ExportError: no checkpoint, or the dataset (needed for the normalisation) is missing.
    """
    where = locate_checkpoint(url, step)
    checkpointer = Checkpointer(where.checkpoint_dir, async_save=False)
    try:
        config_dict = checkpointer.restore_config(where.step)
        config = TrainConfig.model_validate(config_dict)
        dataset_url = dataset_url or config.data.path
        try:
            dataset = ActivationDataset.open(dataset_url)
        except (DatasetError, FileNotFoundError) as e:
            raise ExportError(
                f"{where.checkpoint_dir}: the run's dataset {dataset_url} cannot be opened ({e}); "
                "its manifest holds the input normalisation: pass --dataset URL"
            ) from None
        program = TrainProgram(
            _architecture(config, dataset.d_model),
            config.resolved_optimizer(dataset.d_model),
            total_steps=config.train.steps,
            global_batch=config.train.batch_size,
            mesh=make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1]),
            norm_scale=dataset.norm_scale,
        )
        # Not the optimizer state: export needs none, and its layout may have changed since.
        params, arch_state = checkpointer.restore_model(program.abstract_state(), where.step)
    finally:
        checkpointer.close()
    params = {k: np.asarray(v) for k, v in jax.device_get(params).items()}
    arch_state = {k: np.asarray(v) for k, v in jax.device_get(arch_state).items()}
    manifest = dataset.manifest
    sae = _inference_form(
        config,
        params,
        arch_state,
        dataset.norm_scale,
        metadata={
            "model_name": manifest.source_model,
            "hook_name": manifest.hook,
            "hook_layer": manifest.layer,
            "trained_architecture": config.sae.architecture,
            "norm_scale_folded": dataset.norm_scale,
        },
        source=where.run_dir,
    )
    if density_tokens > 0:
        sae = _with_density(sae, dataset, density_tokens)
    provenance = {
        "run_dir": where.run_dir,
        "checkpoint_step": where.step,
        "tokens_trained": where.step * config.train.batch_size,
        "dataset": {
            "url": dataset_url,
            "manifest_sha256": _manifest_digest(dataset_url),
            "n_tokens": manifest.n_tokens,
            "norm_scale": dataset.norm_scale,
        },
        "density_tokens": density_tokens if sae.log_feature_density is not None else 0,
        "metrics": _final_metrics(where.run_dir),
        "config": config_dict,
        "code_version": code_version(),
    }
    return sae, provenance


def _architecture(config: TrainConfig, d_model: int):
    from dictlearn.sae import get_architecture

    return get_architecture(config.sae, d_model)


def _inference_form(
    config: TrainConfig,
    params: dict[str, np.ndarray],
    arch_state: dict[str, np.ndarray],
    norm_scale: float,
    metadata: dict[str, Any],
    source: str,
) -> InferenceSAE:
    """Fold the normalisation into the weights and pick the inference rule.

    The trainer sees ``x * s``; with ``W_enc' = s W_enc``, ``b_dec' = b_dec / s`` and
    ``W_dec' = W_dec / s`` the pre-activations of raw ``x`` are unchanged (so thresholds are
    too) and the reconstruction comes out in raw units.
    """
    s = np.float32(norm_scale)
    architecture = config.sae.architecture
    d_sae = params["b_enc"].shape[0]
    threshold, k, rule = None, None, "relu"
    if architecture == "topk":
        rule, k = "topk", config.sae.k
    elif architecture == "batchtopk":
        rule = "jumprelu"
        threshold = np.full((d_sae,), arch_state["threshold"], np.float32)
    elif architecture == "jumprelu":
        rule, threshold = "jumprelu", np.exp(params["log_threshold"]).astype(np.float32)
    elif architecture != "relu_l1":
        raise ExportError(f"{source}: no inference form is defined for {architecture!r}")
    return InferenceSAE(
        architecture=rule,
        W_enc=(params["W_enc"] * s).astype(np.float32),
        b_enc=params["b_enc"].astype(np.float32),
        W_dec=(params["W_dec"] / s).astype(np.float32),
        b_dec=(params["b_dec"] / s).astype(np.float32),
        threshold=threshold,
        k=k,
        metadata=metadata | ({"k": k} if k else {}),
        source=source,
    )


def _with_density(sae: InferenceSAE, dataset: ActivationDataset, n_tokens: int) -> InferenceSAE:
    """Each latent's firing frequency on the dataset's first ``n_tokens`` rows (in order)."""
    counts = np.zeros((sae.d_sae,), np.int64)
    seen = 0
    for shard in range(dataset.num_shards):
        rows = min(dataset.shard_n_tokens(shard), n_tokens - seen)
        for start in range(0, rows, 4096):
            x = dataset.read_rows(shard, start, min(start + 4096, rows))
            counts += np.asarray(jax.device_get(sae.encode(x) > 0)).sum(axis=0)
        seen += rows
        if seen >= n_tokens:
            break
    density = counts / max(seen, 1)
    return dataclasses.replace(
        sae,
        log_feature_density=np.log10(density + DENSITY_EPS).astype(np.float32),
        metadata=sae.metadata | {"density_tokens": seen},
    )


def _manifest_digest(dataset_url: str) -> str:
    fs, root = storage.filesystem(dataset_url)
    return hashlib.sha256(fs.cat_file(storage.join(root, MANIFEST_NAME))).hexdigest()


def _final_metrics(run_dir: str) -> dict[str, dict[str, float]]:
    """The last value of every train and eval metric the run logged."""
    if not has_metrics(run_dir):
        return {"train": {}, "eval": {}}
    train: dict[str, float] = {}
    evaluation: dict[str, float] = {}
    for row in read_metrics(run_dir):
        for key, value in row.items():
            if not isinstance(value, int | float) or key == "step":
                continue
            if key.startswith("eval/"):
                evaluation[key[5:]] = value
            elif "/" not in key:
                train[key] = value
    return {"train": train, "eval": evaluation}


@cache
def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = package_metadata.version("dictlearn")
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version
