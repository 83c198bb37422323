"""Read a sweep directory into typed trial records; list the trials that cannot be used.

A sweep directory (what ``dictlearn sweep`` writes) looks like::

    SWEEP_DIR/sweep.yaml                    the resolved sweep config (optional here)
    SWEEP_DIR/trials/<name>/config.yaml     an ordinary `dictlearn train` run directory:
    SWEEP_DIR/trials/<name>/metrics/        resolved TrainConfig + metric rows (read_metrics)
    SWEEP_DIR/trials/<name>/trial.json      the runner's record: status, error, attempts (optional)

A trial is *finished* when its metrics have an ``eval/fvu`` row at ``step ==
train.steps`` and its ``trial.json`` (if any) says ``finished``. Everything else (failed,
still running, cut short, no held-out evaluation, unreadable) is an :class:`Excluded` record
with the reason, so a fit can say exactly what it left out.

    results = read_sweep("runs/sweep-1")
    results.finished   # list[Trial]
    results.excluded   # list[Excluded]
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import yaml

from dictlearn.errors import MissingInputError, UserError
from dictlearn.tracking import has_metrics, read_metrics

TRIALS_DIR = "trials"
TRIAL_RECORD = "trial.json"
SWEEP_CONFIG = "sweep.yaml"


class SweepWarning(UserWarning):
    """Some trials of a sweep were left out (failed, missing, unfinished)."""


@dataclass(frozen=True)
class Trial:
    """One finished training run of a sweep, reduced to what the fits need.

    Attributes:
        name: the trial's directory name under ``trials/``.
        architecture: ``sae.architecture`` (``topk``, ``batchtopk``, ...).
        n_features: ``sae.n_features`` (N).
        k: ``sae.k`` for TopK/BatchTopK, else None.
        d_model: input width, from ``sae.d_model`` or the dataset manifest; None if unknown.
        lr: peak learning rate ``optimizer.lr``.
        warmup_steps: ``optimizer.warmup_steps``.
        decay_fraction: ``optimizer.decay_fraction``.
        batch_size: ``train.batch_size``.
        steps: ``train.steps``.
        tokens: D = steps × batch_size.
        flops: training FLOPs (``flops_per_token × tokens``); None when d_model is unknown.
        eval_fvu: held-out FVU at the final step (the fitted quantity).
        train_fvu: training FVU of the last logged step.
        l0: training L0 of the last logged step.
        dead_fraction: dead-latent fraction of the last logged step.
        data_path: ``data.path``.
        config: the trial's resolved config, as read.
    """

    name: str
    architecture: str
    n_features: int
    k: int | None
    d_model: int | None
    lr: float
    warmup_steps: int
    decay_fraction: float
    batch_size: int
    steps: int
    tokens: int
    flops: float | None
    eval_fvu: float
    train_fvu: float | None
    l0: float | None
    dead_fraction: float | None
    data_path: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Excluded:
    """A trial left out of the fits.

    Attributes:
        name: the trial's name.
        status: ``failed``, ``running``, ``missing`` or ``incomplete``.
        reason: why, in words (the runner's error for a failed trial).
    """

    name: str
    status: str
    reason: str


@dataclass(frozen=True)
class SweepResults:
    """Everything read from one sweep directory.

    Attributes:
        sweep_dir: the directory (local path or URL).
        finished: trials usable for fits, sorted by (N, D, lr).
        excluded: trials left out, with reasons.
        digest: sha256 of ``sweep.yaml`` if present, else of the finished trials' configs:
            identifies the sweep a fit came from.
    """

    sweep_dir: str
    finished: list[Trial]
    excluded: list[Excluded]
    digest: str


def flops_per_token(architecture: str, d_model: int, n_features: int, k: int | None) -> float:
    """Training FLOPs per token of one SAE step, as this trainer runs it.

    TopK / BatchTopK: the encoder matmul is dense (``2·d·N``); everything else touches only the
    ``k`` active latents: decoder forward ``2·k·d``, decoder backward (weights and latents)
    ``4·k·d``, encoder weight gradient ``2·k·d`` (the trainer's sparse backward; no gradient
    flows to the inputs). Total ``2·d·N + 8·k·d``. The usual "×3 for forward + backward" would
    count a dense backward (``6·d·N``) that never runs and inflate C about threefold at large N.

    Dense architectures (``jumprelu``, ``relu_l1``): encoder and decoder forward ``4·d·N``,
    decoder backward ``4·d·N``, encoder weight gradient ``2·d·N``: ``10·d·N``.

    AuxK's extra pass over dead latents is left out: it runs only while latents are dead.

    Args:
        architecture: registered architecture name.
        d_model: input width d.
        n_features: number of latents N.
        k: active latents per token (TopK / BatchTopK; ignored otherwise).

    Returns:
        FLOPs per training token.
    """
    d, n = float(d_model), float(n_features)
    if architecture in ("topk", "batchtopk"):
        if k is None:
            raise UserError(f"{architecture} needs k to count FLOPs")
        return 2.0 * d * n + 8.0 * float(k) * d
    if architecture in ("jumprelu", "relu_l1"):
        return 10.0 * d * n
    raise UserError(f"no FLOP count for architecture {architecture!r}")


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def _read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def _dataset_d_model(data_path: str, cache: dict[str, int | None]) -> int | None:
    """d_model from the activation dataset's manifest, if it can be read (None otherwise)."""
    if data_path not in cache:
        try:
            cache[data_path] = int(_read_json(_join(data_path, "manifest.json"))["d_model"])
        except (OSError, ValueError, KeyError, TypeError):
            cache[data_path] = None
    return cache[data_path]


def _number(value: Any) -> float | None:
    """A finite float, or None (the tracker writes NaN/Inf as strings)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _read_trial(
    url: str, name: str, d_model: int | None, manifests: dict[str, int | None]
) -> Trial | Excluded:
    fs, root = fsspec.core.url_to_fs(url)
    record: dict[str, Any] = {}
    if fs.exists(_join(root, TRIAL_RECORD)):
        try:
            record = _read_json(_join(url, TRIAL_RECORD))
        except (OSError, ValueError) as e:
            return Excluded(name, "incomplete", f"unreadable {TRIAL_RECORD}: {e}")
    status = record.get("status")
    if status == "failed":
        error = record.get("error") or "no error recorded"
        return Excluded(
            name, "failed", f"failed after {record.get('attempts', '?')} attempts: {error}"
        )
    if status not in (None, "finished"):
        return Excluded(name, str(status), f"{TRIAL_RECORD} says {status}")
    if not fs.exists(_join(root, "config.yaml")):
        return Excluded(name, "missing", "no config.yaml")
    if not has_metrics(url):
        return Excluded(name, "missing", "no metrics")
    try:
        with fsspec.open(_join(url, "config.yaml"), "r") as f:
            config = yaml.safe_load(f)
        sae, opt, loop = config["sae"], config["optimizer"], config["train"]
        architecture, n_features = str(sae["architecture"]), int(sae["n_features"])
        k = int(sae["k"]) if sae.get("k") is not None else None
        lr, steps, batch_size = float(opt["lr"]), int(loop["steps"]), int(loop["batch_size"])
        data_path = str(config["data"]["path"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        return Excluded(name, "incomplete", f"config.yaml lacks what a fit needs: {e!r}")
    rows = read_metrics(url)
    final_eval = [r for r in rows if r.get("step") == steps and "eval/fvu" in r]
    eval_fvu = _number(final_eval[-1]["eval/fvu"]) if final_eval else None
    if eval_fvu is None:
        last = max((int(r.get("step", 0)) for r in rows), default=0)
        why = (
            f"no eval/fvu at the final step {steps} (last logged step {last})"
            if not final_eval
            else f"eval/fvu at step {steps} is {final_eval[-1]['eval/fvu']!r}"
        )
        return Excluded(name, "incomplete", why)
    train_rows = [r for r in rows if "fvu" in r]
    last_train = train_rows[-1] if train_rows else {}
    d = sae.get("d_model") or d_model or _dataset_d_model(data_path, manifests)
    tokens = steps * batch_size
    flops = flops_per_token(architecture, d, n_features, k) * tokens if d else None
    return Trial(
        name=name,
        architecture=architecture,
        n_features=n_features,
        k=k,
        d_model=int(d) if d else None,
        lr=lr,
        warmup_steps=int(opt.get("warmup_steps", 0)),
        decay_fraction=float(opt.get("decay_fraction", 0.0)),
        batch_size=batch_size,
        steps=steps,
        tokens=tokens,
        flops=flops,
        eval_fvu=eval_fvu,
        train_fvu=_number(last_train.get("fvu")),
        l0=_number(last_train.get("l0")),
        dead_fraction=_number(last_train.get("dead_fraction")),
        data_path=data_path,
        config=config,
    )


def read_sweep(
    sweep_dir: str, *, d_model: int | None = None, expected: Iterable[str] = ()
) -> SweepResults:
    """Read every trial of a sweep directory.

    Args:
        sweep_dir: the sweep directory (local path or fsspec URL).
        d_model: input width for the FLOP counts when neither the trial configs
            (``sae.d_model``) nor the datasets' manifests give it.
        expected: trial names the sweep planned; any without a directory is listed as missing.

    Returns:
        The finished trials and the excluded ones. Warns (:class:`SweepWarning`) when any trial
        is excluded.

    Raises:
        FileNotFoundError: ``sweep_dir`` has no ``trials/`` directory.
    """
    sweep_dir = sweep_dir.rstrip("/")
    fs, root = fsspec.core.url_to_fs(sweep_dir)
    trials_root = _join(root, TRIALS_DIR)
    if not fs.isdir(trials_root):
        raise MissingInputError(f"{sweep_dir} is not a sweep directory: no {TRIALS_DIR}/ in it")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(trials_root, detail=False))
    names = [n for n in names if fs.isdir(_join(trials_root, n))]
    finished: list[Trial] = []
    excluded: list[Excluded] = []
    manifests: dict[str, int | None] = {}
    for name in names:
        result = _read_trial(_join(sweep_dir, TRIALS_DIR, name), name, d_model, manifests)
        (finished if isinstance(result, Trial) else excluded).append(result)  # type: ignore[arg-type]
    excluded += [Excluded(n, "missing", "no trial directory") for n in expected if n not in names]
    finished.sort(key=lambda t: (t.n_features, t.tokens, t.lr, t.name))
    if fs.exists(_join(root, SWEEP_CONFIG)):
        with fsspec.open(_join(sweep_dir, SWEEP_CONFIG), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    else:
        blob = json.dumps([[t.name, t.config] for t in finished], sort_keys=True).encode()
        digest = hashlib.sha256(blob).hexdigest()
    if excluded:
        listing = "; ".join(f"{e.name} ({e.status}: {e.reason})" for e in excluded)
        warnings.warn(
            f"{len(excluded)} trial(s) left out of the fits: {listing}", SweepWarning, stacklevel=2
        )
    return SweepResults(sweep_dir, finished, excluded, digest)
