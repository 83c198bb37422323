"""Scaling-law fits over a sweep's finished trials: pure numpy/scipy.

    results = read_sweep("runs/sweep-1")
    fits = fit_sweep(results, n_boot=200, seed=0)
    fits.loss_law.alpha, fits.lr_law.gamma, fits.frontier.n_exponent

How:

1. Trials are grouped by (N, D). Within a group, held-out FVU against learning rate is fitted
   with a parabola in (log lr, log L); its vertex is the group's lr* and its minimum the group's
   best loss when the vertex lies inside the sampled learning rates (else the best trial's loss).
2. :func:`fit_loss_law` fits ``L(N, D) = E + A·N^-α + B·D^-β`` to the groups' best losses in
   log space with a Huber loss (``scipy.optimize.least_squares``) from a grid of initial guesses,
   so a few bad runs do not drag the exponents.
3. :func:`fit_lr_law` fits ``lr* = c·N^γ·D^δ`` to the interior optima, again Huber in log space.
4. :func:`compute_frontier` minimises the loss law at fixed compute ``C = flops_per_token(N)·D``
   over N and fits power laws to the optimal N and D.
5. Intervals: the whole pipeline (group optima included) is refitted on bootstrap resamples:
   (N, D) groups drawn with replacement, and trials within each drawn group, with a seeded RNG.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize_scalar

from dictlearn.errors import UserError
from scaling_laws.laws import (
    ComputeFrontier,
    ExcludedRecord,
    FitResult,
    HoldoutRow,
    LawPoint,
    LossLaw,
    LrGroup,
    LrLaw,
    Percentiles,
    TrialRecord,
    loss_law,
)
from scaling_laws.results import SweepResults, Trial, flops_per_token

MIN_WIDTHS = 3
MIN_BUDGETS = 3
MIN_POINTS = 6  # the loss law has 5 parameters
MIN_LRS = 3  # distinct learning rates for a parabola
LOSS_PARAMS = ("E", "A", "alpha", "B", "beta")
# On log-FVU residuals. Hoffmann et al. (2022) used 1e-3 for LM loss, whose scatter is far
# smaller; an SAE's held-out FVU scatters ~1 % between seeds, so 0.01 keeps the efficient
# quadratic loss for ordinary runs and turns linear only for outliers.
DEFAULT_HUBER_DELTA = 1e-2
LR_HUBER_DELTA = 0.1  # on log-lr residuals: lr* is read off a grid, so it scatters more


class FitError(UserError):
    """The sweep cannot support a fit; the message says what is missing."""


@dataclass(frozen=True)
class Sample:
    """Arrays of one trial per entry: width N, tokens D, learning rate, held-out FVU."""

    n: np.ndarray
    d: np.ndarray
    lr: np.ndarray
    loss: np.ndarray

    @classmethod
    def of(cls, trials: Sequence[Trial]) -> Sample:
        return cls(
            np.array([t.n_features for t in trials], float),
            np.array([t.tokens for t in trials], float),
            np.array([t.lr for t in trials], float),
            np.array([t.eval_fvu for t in trials], float),
        )

    def take(self, index: np.ndarray) -> Sample:
        return Sample(self.n[index], self.d[index], self.lr[index], self.loss[index])


# --- per-group learning-rate parabolas --------------------------------------------------------


def lr_parabola(lrs: np.ndarray, losses: np.ndarray) -> LrGroup:
    """Fit log L = c2·x² + c1·x + c0 with x = log lr; the vertex is lr* if it is inside the grid.

    Args:
        lrs: learning rates of one (N, D) group's trials.
        losses: their held-out FVU.

    Returns:
        An :class:`LrGroup` with ``n_features``/``tokens`` set to 0 (the caller fills them).
    """
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    base = dict(n_features=0, tokens=0, lrs=lrs.tolist(), losses=losses.tolist())
    if np.unique(lrs).size < MIN_LRS:
        return LrGroup(**base, lr_star=None, curvature=None, coeffs=None, status="too few")
    x, y = np.log(lrs), np.log(losses)
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return LrGroup(
            **base, lr_star=None, curvature=float(c2), coeffs=[c2, c1, c0], status="edge"
        )
    vertex = -c1 / (2 * c2)
    status = "interior" if x.min() <= vertex <= x.max() else "edge"
    return LrGroup(
        **base,
        lr_star=float(np.exp(vertex)),
        curvature=float(c2),
        coeffs=[float(c2), float(c1), float(c0)],
        status=status,
    )


def _group_optima(
    s: Sample, groups: list[np.ndarray]
) -> tuple[np.ndarray, list[LrGroup], list[str]]:
    """Best loss per group (parabola minimum when interior, else min) and the lr fits."""
    best, fits, sources = np.empty(len(groups)), [], []
    for i, idx in enumerate(groups):
        g = lr_parabola(s.lr[idx], s.loss[idx])
        g = g.model_copy(update=dict(n_features=int(s.n[idx[0]]), tokens=int(s.d[idx[0]])))
        if g.status == "interior":
            c2, c1, c0 = g.coeffs  # type: ignore[misc]
            v = np.log(g.lr_star)  # type: ignore[arg-type]
            # The parabola's minimum, not the best trial: the minimum of a few noisy runs is
            # biased low, the parabola averages over all of them.
            best[i] = np.exp(c2 * v * v + c1 * v + c0)
            sources.append("parabola")
        else:
            best[i] = s.loss[idx].min()
            sources.append("min")
        fits.append(g)
    return best, fits, sources


def _groups(s: Sample) -> list[np.ndarray]:
    keys = sorted(set(zip(s.n.tolist(), s.d.tolist(), strict=True)))
    return [np.flatnonzero((s.n == n) & (s.d == d)) for n, d in keys]


# --- the loss law -----------------------------------------------------------------------------


def _require_points(n: np.ndarray, d: np.ndarray, what: str = "the loss law") -> None:
    widths, budgets = np.unique(n).astype(int), np.unique(d).astype(int)
    if widths.size < MIN_WIDTHS:
        raise FitError(
            f"{what} needs ≥ {MIN_WIDTHS} widths with finished trials, found {widths.size}: "
            + (", ".join(map(str, widths)) or "none")
        )
    if budgets.size < MIN_BUDGETS:
        raise FitError(
            f"{what} needs ≥ {MIN_BUDGETS} token budgets with finished trials, found "
            f"{budgets.size}: " + (", ".join(map(str, budgets)) or "none")
        )
    points = len(set(zip(n.tolist(), d.tolist(), strict=True)))
    if points < MIN_POINTS:
        raise FitError(
            f"{what} needs ≥ {MIN_POINTS} (width, tokens) points for its 5 parameters, "
            f"found {points}"
        )


class _LossProblem:
    """Least squares in log space over θ = (log E, log A', α, log B', β), where N and D are
    scaled by their geometric means (N0, D0) so the parameters are of order one."""

    def __init__(self, n: np.ndarray, d: np.ndarray, loss: np.ndarray):
        self.n0, self.d0 = np.exp(np.log(n).mean()), np.exp(np.log(d).mean())
        self.ln, self.ld = np.log(n / self.n0), np.log(d / self.d0)
        self.y = np.log(loss)
        top = float(np.log(loss.max())) + 2.0
        self.lower = np.array([-30.0, -30.0, 0.0, -30.0, 0.0])
        self.upper = np.array([top, top + 5.0, 5.0, top + 5.0, 5.0])

    def residuals(self, th: np.ndarray) -> np.ndarray:
        pred = np.exp(th[0]) + np.exp(th[1] - th[2] * self.ln) + np.exp(th[3] - th[4] * self.ld)
        return np.log(pred) - self.y

    def jacobian(self, th: np.ndarray) -> np.ndarray:
        te = np.exp(th[0]) * np.ones_like(self.ln)
        ta = np.exp(th[1] - th[2] * self.ln)
        tb = np.exp(th[3] - th[4] * self.ld)
        pred = te + ta + tb
        return np.stack([te, ta, -ta * self.ln, tb, -tb * self.ld], axis=1) / pred[:, None]

    def solve(self, starts: list[np.ndarray], delta: float, loss: str = "huber") -> np.ndarray:
        best, best_cost = None, np.inf
        for start in starts:
            x0 = np.clip(start, self.lower + 1e-9, self.upper - 1e-9)
            r = least_squares(
                self.residuals,
                x0,
                jac=self.jacobian,
                bounds=(self.lower, self.upper),
                loss=loss,
                f_scale=delta,
                x_scale="jac",
                max_nfev=2000,
            )
            if r.cost < best_cost:
                best, best_cost = r.x, r.cost
        assert best is not None
        return best

    def grid(self) -> list[np.ndarray]:
        """Initial guesses: E, A', B' as fractions of the typical loss, exponents spread out."""
        typical = float(np.exp(np.median(self.y)))
        out = []
        for fe, fa, alpha, beta in itertools.product(
            (0.05, 0.3), (0.4,), (0.1, 0.4, 1.0), (0.1, 0.4, 1.0)
        ):
            fb = max(1.0 - fe - fa, 0.1)
            out.append(np.log([typical * fe, typical * fa, 1.0, typical * fb, 1.0]))
            out[-1][2], out[-1][4] = alpha, beta
        return out

    def to_params(self, th: np.ndarray) -> np.ndarray:
        """θ → [E, A, α, B, β] in the original units: A = A'·N0^α, B = B'·D0^β."""
        return np.array(
            [
                np.exp(th[0]),
                np.exp(th[1] + th[2] * np.log(self.n0)),
                th[2],
                np.exp(th[3] + th[4] * np.log(self.d0)),
                th[4],
            ]
        )

    def from_params(self, p: np.ndarray) -> np.ndarray:
        return np.array(
            [
                np.log(p[0]),
                np.log(p[1]) - p[2] * np.log(self.n0),
                p[2],
                np.log(p[3]) - p[4] * np.log(self.d0),
                p[4],
            ]
        )


def fit_loss_params(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    *,
    delta: float = DEFAULT_HUBER_DELTA,
    start: np.ndarray | None = None,
    robust: bool = True,
) -> np.ndarray:
    """Fit ``[E, A, α, B, β]`` of ``L = E + A·N^-α + B·D^-β`` to points, in log space.

    Args:
        n, d, loss: widths, token counts and losses of the points.
        delta: Huber threshold on log residuals.
        start: an initial guess ``[E, A, α, B, β]``; without one a grid of 18 guesses is tried.
        robust: False fits plain least squares (to show what the Huber loss buys).

    Returns:
        The parameters with the lowest (robust) cost.
    """
    prob = _LossProblem(np.asarray(n, float), np.asarray(d, float), np.asarray(loss, float))
    if start is None:
        starts = prob.grid()
    else:  # a bootstrap refit: near the point estimate, plus two guesses in case it moved far
        grid = prob.grid()
        starts = [prob.from_params(np.asarray(start, float)), grid[4]]
    th = prob.solve(starts, delta, "huber" if robust else "linear")
    return prob.to_params(th)


# --- the learning-rate law --------------------------------------------------------------------


def fit_lr_params(
    n: np.ndarray, d: np.ndarray, lr_star: np.ndarray, *, with_tokens: bool
) -> np.ndarray:
    """Fit ``log lr* = log c + γ·log N (+ δ·log D)`` with a Huber loss; returns [log c, γ, δ]."""
    cols = [np.ones_like(n), np.log(n)] + ([np.log(d)] if with_tokens else [])
    x, y = np.stack(cols, axis=1), np.log(lr_star)
    start = np.linalg.lstsq(x, y, rcond=None)[0]
    r = least_squares(lambda th: x @ th - y, start, loss="huber", f_scale=LR_HUBER_DELTA)
    return np.append(r.x, 0.0) if not with_tokens else r.x


def _lr_points(groups: list[LrGroup]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ok = [g for g in groups if g.status == "interior"]
    return (
        np.array([g.n_features for g in ok], float),
        np.array([g.tokens for g in ok], float),
        np.array([g.lr_star for g in ok], float),
    )


def _lr_law_problem(groups: list[LrGroup]) -> str | None:
    """Why no lr law can be fitted to these groups (None if one can)."""
    n, _d, _ = _lr_points(groups)
    if n.size < 3 or np.unique(n).size < 2:
        counts = sorted({g.status for g in groups})
        return (
            f"the learning-rate law needs ≥ 3 (width, tokens) groups with lr* inside their lr "
            f"grid (≥ {MIN_LRS} learning rates, a convex parabola) over ≥ 2 widths; found "
            f"{n.size} over {np.unique(n).size} widths (group statuses: {', '.join(counts)})"
        )
    return None


# --- the compute frontier ---------------------------------------------------------------------


def frontier_points(
    params: np.ndarray, flops: np.ndarray, architecture: str, d_model: int, k: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each compute C, the N minimising ``L(N, C / flops_per_token(N))``, its D and loss."""
    n_min = float(max(k or 1, 1)) * 2.0
    n_opt, d_opt, l_opt = [], [], []
    for c in np.asarray(flops, float):

        def objective(u: float, c: float = c) -> float:
            n = np.exp(u)
            return float(loss_law(params, n, c / flops_per_token(architecture, d_model, n, k)))

        r = minimize_scalar(
            objective,
            bounds=(np.log(n_min), np.log(1e13)),
            method="bounded",
            options={"xatol": 1e-6},
        )
        n = float(np.exp(r.x))
        n_opt.append(n)
        d_opt.append(c / flops_per_token(architecture, d_model, n, k))
        l_opt.append(float(r.fun))
    return np.array(n_opt), np.array(d_opt), np.array(l_opt)


def _power_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(coef, exponent) of y = coef·x^exponent by least squares in log space."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(intercept)), float(slope)


def compute_frontier(
    law: LossLaw,
    architecture: str,
    d_model: int,
    k: int | None,
    flops_range: tuple[float, float],
    points: int = 25,
) -> ComputeFrontier:
    """The compute-optimal frontier of a loss law, with bootstrap intervals on its exponents.

    Args:
        law: the fitted loss law (its bootstrap rows give the intervals).
        architecture, d_model, k: what ``flops_per_token`` needs.
        flops_range: (low, high) training FLOPs of the grid (log-spaced).
        points: grid size.
    """
    flops = np.geomspace(flops_range[0], flops_range[1], points)
    n_opt, d_opt, l_opt = frontier_points(law.params(), flops, architecture, d_model, k)
    g, a = _power_fit(flops, n_opt)
    h, b = _power_fit(flops, d_opt)
    # The exponents' spread needs far fewer laws than the bootstrap holds, on a coarser grid.
    coarse = np.geomspace(flops_range[0], flops_range[1], 7)
    a_s, b_s = [], []
    for row in np.asarray(law.bootstrap)[:50]:
        bn, bd, _ = frontier_points(row, coarse, architecture, d_model, k)
        a_s.append(_power_fit(coarse, bn)[1])
        b_s.append(_power_fit(coarse, bd)[1])
    return ComputeFrontier(
        architecture=architecture,
        d_model=d_model,
        k=k,
        flops=flops.tolist(),
        n_opt=n_opt.tolist(),
        d_opt=d_opt.tolist(),
        loss_opt=l_opt.tolist(),
        n_coef=g,
        n_exponent=a,
        d_coef=h,
        d_exponent=b,
        percentiles={"n_exponent": Percentiles.of(a_s), "d_exponent": Percentiles.of(b_s)},
    )


# --- the whole sweep --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fitted:
    law: LossLaw
    lr_law: LrLaw | None
    lr_missing: str | None


def _fit_all(s: Sample, n_boot: int, seed: int, delta: float) -> _Fitted:
    """Point fits of the loss and lr laws on one sample of trials, with bootstrap refits."""
    _require_points(s.n, s.d)
    groups = _groups(s)
    best, lr_groups, sources = _group_optima(s, groups)
    gn = np.array([s.n[g[0]] for g in groups])
    gd = np.array([s.d[g[0]] for g in groups])
    params = fit_loss_params(gn, gd, best, delta=delta)
    resid = np.log(best) - np.log(loss_law(params, gn, gd))

    lr_missing = _lr_law_problem(lr_groups)
    lr_n, lr_d, lr_star = _lr_points(lr_groups)
    with_tokens = np.unique(lr_d).size >= 2
    lr_params = None if lr_missing else fit_lr_params(lr_n, lr_d, lr_star, with_tokens=with_tokens)

    rng = np.random.default_rng(seed)
    boot, lr_boot = [], []
    tries = 0
    while len(boot) < n_boot and tries < 20 * n_boot:
        tries += 1
        pick = rng.integers(0, len(groups), len(groups))
        idx = [_resample_group(rng, groups[i], s.lr) for i in pick]
        bn, bd = gn[pick], gd[pick]
        if (
            np.unique(bn).size < MIN_WIDTHS
            or np.unique(bd).size < MIN_BUDGETS
            or len(set(zip(bn.tolist(), bd.tolist(), strict=True))) < MIN_POINTS
        ):
            continue  # a resample that cannot pin the law down says nothing about it
        b_best, b_groups, _ = _group_optima(s, idx)
        boot.append(fit_loss_params(bn, bd, b_best, delta=delta, start=params))
        if lr_params is not None and _lr_law_problem(b_groups) is None:
            n_, d_, l_ = _lr_points(b_groups)
            lr_boot.append(fit_lr_params(n_, d_, l_, with_tokens=with_tokens))
    if len(boot) < n_boot:
        warnings.warn(
            f"only {len(boot)} of {n_boot} bootstrap resamples could be fitted", stacklevel=3
        )
    boot_arr = np.array(boot) if boot else params[None, :]
    law = LossLaw(
        E=params[0],
        A=params[1],
        alpha=params[2],
        B=params[3],
        beta=params[4],
        huber_delta=delta,
        points=[
            LawPoint(n_features=int(n), tokens=int(d), loss=float(v), source=src, trials=g.size)
            for n, d, v, src, g in zip(gn, gd, best, sources, groups, strict=True)
        ],
        residuals=resid.tolist(),
        bootstrap=boot_arr.tolist(),
        percentiles={p: Percentiles.of(boot_arr[:, i]) for i, p in enumerate(LOSS_PARAMS)},
    )
    lr_law = None
    if lr_params is not None:
        lb = np.array(lr_boot) if lr_boot else lr_params[None, :]
        lr_law = LrLaw(
            c=float(np.exp(lr_params[0])),
            gamma=float(lr_params[1]),
            delta=float(lr_params[2]) if with_tokens else None,
            groups=lr_groups,
            bootstrap=lb.tolist(),
            percentiles={
                "log_c": Percentiles.of(lb[:, 0]),
                "gamma": Percentiles.of(lb[:, 1]),
                **({"delta": Percentiles.of(lb[:, 2])} if with_tokens else {}),
            },
            residuals=(
                np.log(lr_star)
                - (lr_params[0] + lr_params[1] * np.log(lr_n) + lr_params[2] * np.log(lr_d))
            ).tolist(),
        )
    return _Fitted(law, lr_law, lr_missing)


def _resample_group(rng: np.random.Generator, group: np.ndarray, lrs: np.ndarray) -> np.ndarray:
    """Trials of one group drawn with replacement, redrawn (a few times) until they keep enough
    distinct learning rates for a parabola: a draw with two would fall back to the best trial
    and bias the group's optimum upwards, which is not uncertainty in the data."""
    need = min(MIN_LRS, np.unique(lrs[group]).size)
    for _ in range(20):
        draw = group[rng.integers(0, group.size, group.size)]
        if np.unique(lrs[draw]).size >= need:
            return draw
    return group


def _single(values: set, what: str) -> object:
    if len(values) != 1:
        shown = ", ".join(sorted(map(str, values)))
        raise FitError(f"fit one sweep at a time: the finished trials mix {what} ({shown})")
    return next(iter(values))


def fit_sweep(
    results: SweepResults,
    *,
    n_boot: int = 200,
    seed: int = 0,
    huber_delta: float = DEFAULT_HUBER_DELTA,
    holdout_largest: bool = False,
) -> FitResult:
    """Fit the loss law, the lr law and the compute frontier to a sweep's finished trials.

    Args:
        results: what :func:`scaling_laws.results.read_sweep` read.
        n_boot: bootstrap resamples for the intervals.
        seed: seeds the bootstrap.
        huber_delta: Huber threshold on log-loss residuals.
        holdout_largest: also fit without the largest width and report how well that fit
            predicts it (the largest width's trials stay in the main fit).

    Returns:
        The :class:`FitResult` written as ``fits.json``.

    Raises:
        FitError: no finished trials, trials of different architectures/k/data, or too few
            widths, token budgets or points for the loss law (the message names them).
    """
    if n_boot < 1:
        raise FitError(f"n_boot must be at least 1 (intervals need resamples), got {n_boot}")
    trials = results.finished
    if not trials:
        left = ", ".join(f"{e.name} ({e.status})" for e in results.excluded) or "none"
        raise FitError(f"no finished trials in {results.sweep_dir} (left out: {left})")
    architecture = str(_single({t.architecture for t in trials}, "architectures"))
    k = _single({t.k for t in trials}, "k values")
    data_path = str(_single({t.data_path for t in trials}, "data paths"))
    s = Sample.of(trials)
    fitted = _fit_all(s, n_boot, seed, huber_delta)

    d_models = {t.d_model for t in trials}
    frontier, frontier_missing = None, None
    if None in d_models or len(d_models) != 1:
        frontier_missing = (
            "d_model unknown: set sae.d_model, make the dataset manifest readable or pass --d-model"
        )
        d_model = None
    else:
        d_model = int(next(iter(d_models)))  # type: ignore[arg-type]
        flops = np.array(
            [flops_per_token(architecture, d_model, t.n_features, k) * t.tokens for t in trials]  # type: ignore[arg-type]
        )
        frontier = compute_frontier(
            fitted.law,
            architecture,
            d_model,
            k,
            (flops.min(), flops.max() * 1e3),  # type: ignore[arg-type]
        )

    holdout = None
    if holdout_largest:
        holdout = _holdout(s, n_boot, seed, huber_delta)

    largest = max(trials, key=lambda t: (t.n_features, t.tokens))
    return FitResult(
        sweep_dir=results.sweep_dir,
        digest=results.digest,
        data_path=data_path,
        architecture=architecture,
        k=k,  # type: ignore[arg-type]
        d_model=d_model,
        batch_size=largest.batch_size,
        n_boot=n_boot,
        seed=seed,
        loss_law=fitted.law,
        lr_law=fitted.lr_law,
        lr_law_missing=fitted.lr_missing,
        frontier=frontier,
        frontier_missing=frontier_missing,
        holdout=holdout,
        trials=[
            TrialRecord(
                name=t.name,
                n_features=t.n_features,
                tokens=t.tokens,
                lr=t.lr,
                eval_fvu=t.eval_fvu,
                train_fvu=t.train_fvu,
                l0=t.l0,
                dead_fraction=t.dead_fraction,
                flops=t.flops,
            )
            for t in trials
        ],
        excluded=[
            ExcludedRecord(name=e.name, status=e.status, reason=e.reason) for e in results.excluded
        ],
        template_config=largest.config,
    )


def _holdout(s: Sample, n_boot: int, seed: int, delta: float) -> list[HoldoutRow]:
    """Fit without the largest width; predict its groups' best losses."""
    top = s.n.max()
    keep = s.n < top
    widths = np.unique(s.n).astype(int)
    if np.unique(s.n[keep]).size < MIN_WIDTHS:
        raise FitError(
            f"--holdout-largest needs ≥ {MIN_WIDTHS + 1} widths with finished trials, found "
            f"{widths.size}: " + ", ".join(map(str, widths))
        )
    fitted = _fit_all(s.take(np.flatnonzero(keep)), n_boot, seed, delta)
    held = s.take(np.flatnonzero(~keep))
    groups = _groups(held)
    best, _, _ = _group_optima(held, groups)
    rows = []
    for g, actual in zip(groups, best, strict=True):
        n, d = float(held.n[g[0]]), float(held.d[g[0]])
        pred = float(fitted.law.predict(n, d))
        lo, hi = fitted.law.interval(n, d, 0.8, seed)
        rows.append(
            HoldoutRow(
                n_features=int(n),
                tokens=int(d),
                actual=float(actual),
                predicted=pred,
                p10=lo,
                p90=hi,
                rel_error=(pred - actual) / actual,
                inside=bool(lo <= actual <= hi),
            )
        )
    return rows
