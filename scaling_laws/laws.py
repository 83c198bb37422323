"""The fitted laws as typed, serialisable records, and the functions that evaluate them.

Three laws come out of a sweep (see :mod:`scaling_laws.fit` for how they are fitted):

- :class:`LossLaw`: held-out FVU ``L(N, D) = E + A·N^-α + B·D^-β`` for N latents trained on D
  tokens at the best learning rate;
- :class:`LrLaw`: the optimal peak learning rate ``lr*(N, D) = c·N^γ·D^δ`` (δ = 0 when the sweep
  used one token budget);
- :class:`ComputeFrontier`: the compute-optimal ``N_opt(C) = G·C^a`` and ``D_opt(C) = H·C^b``
  for training compute C, derived from the loss law and the architecture's FLOP count.

Each carries its bootstrap samples, so intervals for any prediction can be computed later
(``dictlearn select`` does) without the sweep. :class:`FitResult` is ``fits.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """Base of every fits.json record: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Percentiles(Record):
    """Bootstrap percentiles of one quantity (80 % interval: p10–p90; 90 %: p5–p95)."""

    p5: float
    p10: float
    p50: float
    p90: float
    p95: float

    @classmethod
    def of(cls, samples: np.ndarray) -> Percentiles:
        p = np.percentile(np.asarray(samples, float), [5, 10, 50, 90, 95])
        return cls(p5=p[0], p10=p[1], p50=p[2], p90=p[3], p95=p[4])


class LawPoint(Record):
    """One (N, D) point of the loss law: the best held-out FVU over the group's learning rates."""

    n_features: int
    tokens: int
    loss: float = Field(description="Best held-out FVU of the group (parabola minimum or min).")
    source: str = Field(description="'parabola' (vertex inside the lr grid) or 'min' (best trial).")
    trials: int = Field(description="Trials in the group.")


class LossLaw(Record):
    """``L(N, D) = E + A·N^-α + B·D^-β``, fitted in log space with a Huber loss."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    huber_delta: float = Field(description="Huber threshold on log-loss residuals.")
    points: list[LawPoint]
    residuals: list[float] = Field(description="log(observed) - log(fitted) at each point.")
    bootstrap: list[list[float]] = Field(description="Bootstrap [E, A, alpha, B, beta] rows.")
    percentiles: dict[str, Percentiles] = Field(description="Per parameter, over the bootstrap.")

    def params(self) -> np.ndarray:
        return np.array([self.E, self.A, self.alpha, self.B, self.beta])

    def predict(self, n_features: Any, tokens: Any) -> np.ndarray:
        """Point prediction of held-out FVU (broadcasts over arrays)."""
        return loss_law(self.params(), n_features, tokens)

    def interval(
        self, n_features: float, tokens: float, level: float = 0.8, seed: int = 0
    ) -> tuple[float, float]:
        """Prediction interval for one new run at (N, D).

        Each bootstrap law's prediction is multiplied by a resampled residual of the point fit,
        so the interval holds both the uncertainty of the law and the run-to-run scatter.
        """
        preds = loss_law(np.asarray(self.bootstrap), n_features, tokens)
        resid = np.asarray(self.residuals)
        rng = np.random.default_rng(seed)
        draws = preds * np.exp(rng.choice(resid, size=preds.shape)) if resid.size else preds
        q = 50 * (1 - level)
        lo, hi = np.percentile(draws, [q, 100 - q])
        return float(lo), float(hi)


class LrGroup(Record):
    """Loss against learning rate for one (N, D) group, and its fitted optimum."""

    n_features: int
    tokens: int
    lrs: list[float]
    losses: list[float]
    lr_star: float | None = Field(description="Vertex of the parabola of log L vs log lr.")
    curvature: float | None = Field(description="Quadratic coefficient of that parabola.")
    coeffs: list[float] | None = Field(description="[c2, c1, c0] of the parabola (log-log).")
    status: str = Field(description="'interior', 'edge' (vertex outside the grid), 'too few'.")


class LrLaw(Record):
    """``lr*(N, D) = c·N^γ·D^δ``, fitted in log space with a Huber loss to interior optima."""

    c: float
    gamma: float
    delta: float | None = Field(description="None when the groups share one token budget.")
    groups: list[LrGroup]
    bootstrap: list[list[float]] = Field(description="Bootstrap [log c, gamma, delta] rows.")
    percentiles: dict[str, Percentiles]
    residuals: list[float]

    def predict(self, n_features: float, tokens: float) -> float:
        return float(self.c * n_features**self.gamma * tokens ** (self.delta or 0.0))

    def interval(self, n_features: float, tokens: float, level: float = 0.8) -> tuple[float, float]:
        """Interval of lr* at (N, D) over the bootstrap laws."""
        b = np.asarray(self.bootstrap)
        preds = np.exp(b[:, 0] + b[:, 1] * np.log(n_features) + b[:, 2] * np.log(tokens))
        q = 50 * (1 - level)
        lo, hi = np.percentile(preds, [q, 100 - q])
        return float(lo), float(hi)


class ComputeFrontier(Record):
    """Compute-optimal width and tokens from the loss law at fixed training FLOPs C."""

    architecture: str
    d_model: int
    k: int | None
    flops: list[float] = Field(description="The compute grid C (training FLOPs).")
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]
    n_coef: float = Field(description="G in N_opt = G·C^a.")
    n_exponent: float = Field(description="a in N_opt = G·C^a.")
    d_coef: float = Field(description="H in D_opt = H·C^b.")
    d_exponent: float = Field(description="b in D_opt = H·C^b.")
    percentiles: dict[str, Percentiles] = Field(description="n_exponent, d_exponent.")


class HoldoutRow(Record):
    """The held-out largest width at one token budget: prediction against the actual loss."""

    n_features: int
    tokens: int
    actual: float
    predicted: float
    p10: float
    p90: float
    rel_error: float = Field(description="(predicted - actual) / actual.")
    inside: bool = Field(description="actual within the 80 % prediction interval.")


class TrialRecord(Record):
    """A trial used by the fits (the quantities fitted)."""

    name: str
    n_features: int
    tokens: int
    lr: float
    eval_fvu: float
    train_fvu: float | None
    l0: float | None
    dead_fraction: float | None
    flops: float | None


class ExcludedRecord(Record):
    """A trial left out, and why."""

    name: str
    status: str
    reason: str


class FitResult(Record):
    """``fits.json``: everything ``dictlearn select`` needs, and the evidence behind it."""

    sweep_dir: str
    digest: str = Field(description="sha256 of sweep.yaml, or of the finished trials' configs.")
    data_path: str
    architecture: str
    k: int | None
    d_model: int | None
    batch_size: int = Field(description="Batch size of the largest finished trial.")
    n_boot: int
    seed: int
    loss_law: LossLaw
    lr_law: LrLaw | None
    lr_law_missing: str | None = Field(description="Why there is no lr law, if there is none.")
    frontier: ComputeFrontier | None
    frontier_missing: str | None = Field(description="Why there is no frontier, if none.")
    holdout: list[HoldoutRow] | None = Field(description="--holdout-largest results.")
    trials: list[TrialRecord]
    excluded: list[ExcludedRecord]
    template_config: dict[str, Any] = Field(
        description="Resolved config of the largest finished trial: the base of `select`."
    )


def loss_law(params: np.ndarray, n_features: Any, tokens: Any) -> np.ndarray:
    """``E + A·N^-α + B·D^-β`` for params ``[E, A, alpha, B, beta]`` (or rows of them)."""
    p = np.asarray(params, float)
    n = np.asarray(n_features, float)
    d = np.asarray(tokens, float)
    if p.ndim == 2:
        e, a, al, b, be = (p[:, i] for i in range(5))
        return e + a * n**-al + b * d**-be
    return p[0] + p[1] * n ** -p[2] + p[3] * d ** -p[4]
