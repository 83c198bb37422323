"""Turn fitted laws into a ready ``dictlearn train`` config for one large run.

    fits = load_fits("runs/sweep-1/fits/fits.json")
    choice = select_config(fits, n_features=1 << 20, tokens=4_000_000_000)
    choice.config             # a TrainConfig as a dict (validate it with dictlearn's loader)
    choice.predicted_fvu, choice.fvu_interval

The config starts from the sweep's largest finished trial (same data, architecture, k, batch
size, optimizer betas, checkpointing) and changes what the laws decide:

- ``optimizer.lr``: the lr law at (N, D);
- ``train.steps``: ceil(D / batch size), D given directly or from a compute budget C via
  :func:`scaling_laws.results.flops_per_token`;
- ``optimizer.warmup_steps``: the sweep's warm-up (in steps, at the same batch size, the lr law
  was fitted under it), at most 10 % of the run; ``optimizer.decay_fraction``: the sweep's;
- ``sae.dead_window_tokens``: at least the sweep's (if it set one), and long enough that a
  latent firing 1,000× less often than an average one (k/N per token) is not yet called dead,
  but at most a quarter of the run so AuxK can act on real dead latents;
- ``run``: ``<sweep dir>/selected/<architecture>-<N>-selected``;
- ``sae.k_aux`` (TopK's and BatchTopK's AuxK): a power of two near d_model / 2 (Gao et al., 2024), at most N.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec

from dictlearn.errors import MissingInputError
from scaling_laws.fit import FitError
from scaling_laws.laws import FitResult
from scaling_laws.results import flops_per_token

INTERVAL_LEVEL = 0.8
MAX_WARMUP_FRACTION = 0.1
DEAD_RATE_FACTOR = 1000


@dataclass(frozen=True)
class Selection:
    """A chosen config and what the fits predict for it.

    Attributes:
        config: the ``dictlearn train`` config as a plain dict.
        n_features, tokens, flops: the run's size (flops None when d_model is unknown).
        lr, lr_interval: the lr law's value and its 80 % bootstrap interval (the given lr
            twice when it was set by hand).
        predicted_fvu, fvu_interval: predicted held-out FVU and its 80 % prediction interval.
        extrapolation: N and D over the largest fitted N and D (how far the laws are stretched).
        notes: caveats worth printing.
    """

    config: dict[str, Any]
    n_features: int
    tokens: int
    flops: float | None
    lr: float
    lr_interval: tuple[float, float]
    predicted_fvu: float
    fvu_interval: tuple[float, float]
    extrapolation: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON sidecar's content (everything but the config itself)."""
        return {
            "n_features": self.n_features,
            "tokens": self.tokens,
            "flops": self.flops,
            "lr": self.lr,
            "lr_interval_80": list(self.lr_interval),
            "predicted_eval_fvu": self.predicted_fvu,
            "eval_fvu_interval_80": list(self.fvu_interval),
            "extrapolation": self.extrapolation,
            "notes": self.notes,
        }


def load_fits(path: str) -> FitResult:
    """Read ``fits.json`` (local path or URL)."""
    try:
        with fsspec.open(path, "r") as f:
            return FitResult.model_validate_json(f.read())
    except FileNotFoundError as e:
        raise MissingInputError(f"fits file {path} does not exist") from e


def _power_of_two_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def select_config(
    fits: FitResult,
    n_features: int,
    *,
    tokens: int | None = None,
    flops: float | None = None,
    lr: float | None = None,
) -> Selection:
    """Choose the large run's config from the fits.

    Args:
        fits: the fitted laws.
        n_features: N of the run.
        tokens: D, the training tokens; or
        flops: C, the training compute (D = C / flops_per_token(N)).
        lr: a learning rate chosen by hand, used instead of the lr law (which then need not
            exist); the predicted FVU assumes the best lr all the same.

    Returns:
        The :class:`Selection`.

    Raises:
        FitError: neither or both of tokens/flops, flops without a known d_model, or no lr law
            and no ``lr``.
    """
    if (tokens is None) == (flops is None):
        raise FitError("give exactly one of tokens=T or flops=C")
    if fits.lr_law is None and lr is None:
        raise FitError(
            f"the fits have no learning-rate law ({fits.lr_law_missing}); choose one with "
            "optimizer.lr=..."
        )
    fpt = (
        flops_per_token(fits.architecture, fits.d_model, n_features, fits.k)
        if fits.d_model is not None
        else None
    )
    if flops is not None:
        if fpt is None:
            raise FitError(f"flops=C needs d_model, which the fits lack: {fits.frontier_missing}")
        tokens = int(flops / fpt)
    assert tokens is not None
    if tokens <= 0 or n_features <= 0:
        raise FitError(f"n_features and tokens must be positive (got {n_features}, {tokens})")
    batch = fits.batch_size
    steps = max(1, math.ceil(tokens / batch))
    tokens = steps * batch
    notes = []
    if lr is None:
        assert fits.lr_law is not None
        lr, lr_interval = (
            fits.lr_law.predict(n_features, tokens),
            fits.lr_law.interval(n_features, tokens, INTERVAL_LEVEL),
        )
    else:
        lr_interval = (lr, lr)
        notes.append("learning rate set by hand, not by the lr law")
    law = fits.loss_law

    cfg = copy.deepcopy(fits.template_config)
    # A sweep trial may have branched from a trunk's checkpoint; the large run starts fresh.
    cfg.pop("init", None)
    # ...and keeps no sweep-only checkpoints (the trunks' branch points).
    cfg.get("checkpoint", {}).pop("keep_steps", None)
    sweep_opt, sweep_sae = cfg["optimizer"], cfg["sae"]
    sweep_opt["lr"] = lr
    sweep_opt["warmup_steps"] = min(
        int(sweep_opt.get("warmup_steps", 0)), int(steps * MAX_WARMUP_FRACTION)
    )
    cfg["train"]["steps"] = steps
    cfg["train"]["batch_size"] = batch
    sweep_sae["n_features"] = n_features
    k = fits.k
    if k is not None:
        # A null window derives from the width (dictlearn.sae.BaseSAEConfig.dead_window), so
        # only a window the sweep set by hand is a floor for another width.
        sweep_window = int(sweep_sae.get("dead_window_tokens") or 0)
        window = max(sweep_window, DEAD_RATE_FACTOR * n_features // k)
        sweep_sae["dead_window_tokens"] = max(1, min(window, tokens // 4))
    if "k_aux" in sweep_sae and fits.d_model is not None:
        sweep_sae["k_aux"] = min(_power_of_two_near(fits.d_model / 2), n_features)
    # Next to the sweep's evidence but outside trials/, so a later fit does not read it.
    run = cfg.setdefault("run", {})
    run["output_dir"] = f"{fits.sweep_dir.rstrip('/')}/selected"
    run["name"] = f"{fits.architecture}-{n_features}-selected"

    max_n = max(p.n_features for p in law.points)
    max_d = max(p.tokens for p in law.points)
    if n_features > 16 * max_n:
        notes.append(
            f"N is {n_features / max_n:.0f}x the largest fitted width: a long extrapolation"
        )
    return Selection(
        config=cfg,
        n_features=n_features,
        tokens=tokens,
        flops=fpt * tokens if fpt is not None else None,
        lr=lr,
        lr_interval=lr_interval,
        predicted_fvu=float(law.predict(n_features, tokens)),
        fvu_interval=law.interval(n_features, tokens, INTERVAL_LEVEL, fits.seed),
        extrapolation={
            "n_over_max_fitted": n_features / max_n,
            "d_over_max_fitted": tokens / max_d,
        },
        notes=notes,
    )
