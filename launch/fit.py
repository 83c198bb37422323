"""The fit stage: scaling laws from a finished (or partly finished) sweep.

    dictlearn fit SWEEP_DIR [--out DIR] [--holdout-largest] [--n-boot 200] [--d-model D]

Reads ``SWEEP_DIR/trials/*`` (:mod:`scaling_laws.results`), fits the loss law, the optimal
learning rate and the compute frontier (:mod:`scaling_laws.fit`), and writes to ``--out``
(default ``SWEEP_DIR/fits``): ``fits.json``, ``table.txt`` (what it prints) and PNG plots.
Trials that failed or are unfinished are listed and left out with a warning.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass

import fsspec

from scaling_laws.fit import fit_sweep
from scaling_laws.laws import FitResult
from scaling_laws.plots import write_plots
from scaling_laws.results import read_sweep


@dataclass(frozen=True)
class FitOutput:
    """What ``dictlearn fit`` wrote.

    Attributes:
        fits: the fitted laws (also in ``fits.json``).
        out_dir: where everything went.
        table: the printed table.
        files: every file written.
        warnings: the warnings raised while reading and fitting (excluded trials, ...).
    """

    fits: FitResult
    out_dir: str
    table: str
    files: list[str]
    warnings: list[str]


def _pct(p, fmt: str = ".3f") -> str:
    return f"[{p.p10:{fmt}}, {p.p90:{fmt}}]"


def fits_table(fits: FitResult) -> str:
    """A plain-text summary: the laws with 80 % intervals, the holdout check, left-out trials."""
    law, q = fits.loss_law, fits.loss_law.percentiles
    lines = [
        f"sweep {fits.sweep_dir}  ({fits.architecture}, k={fits.k}, d_model={fits.d_model}, "
        f"{len(fits.trials)} trials used, {len(fits.excluded)} left out, {fits.n_boot} bootstrap)",
        "",
        "held-out FVU  L(N, D) = E + A·N^-alpha + B·D^-beta     value      80 % interval",
        f"  E       {law.E:>12.4g}  {_pct(q['E'], '.4g')}",
        f"  A       {law.A:>12.4g}  {_pct(q['A'], '.4g')}",
        f"  alpha   {law.alpha:>12.4f}  {_pct(q['alpha'], '.4f')}",
        f"  B       {law.B:>12.4g}  {_pct(q['B'], '.4g')}",
        f"  beta    {law.beta:>12.4f}  {_pct(q['beta'], '.4f')}",
        "",
    ]
    if fits.lr_law is not None:
        lr = fits.lr_law
        lines += [
            "optimal lr   lr*(N, D) = c·N^gamma·D^delta",
            f"  c       {lr.c:>12.4g}",
            f"  gamma   {lr.gamma:>12.4f}  {_pct(lr.percentiles['gamma'], '.4f')}",
        ]
        if lr.delta is not None:
            lines.append(f"  delta   {lr.delta:>12.4f}  {_pct(lr.percentiles['delta'], '.4f')}")
        used = sum(g.status == "interior" for g in lr.groups)
        lines.append(f"  ({used} of {len(lr.groups)} (N, D) groups had lr* inside their grid)")
    else:
        lines.append(f"optimal lr   not fitted: {fits.lr_law_missing}")
    lines.append("")
    if fits.frontier is not None:
        fr = fits.frontier
        lines += [
            "compute-optimal (C = training FLOPs)",
            f"  N_opt = {fr.n_coef:.4g}·C^{fr.n_exponent:.4f}  exponent 80 % "
            f"{_pct(fr.percentiles['n_exponent'], '.4f')}",
            f"  D_opt = {fr.d_coef:.4g}·C^{fr.d_exponent:.4f}  exponent 80 % "
            f"{_pct(fr.percentiles['d_exponent'], '.4f')}",
        ]
    else:
        lines.append(f"compute-optimal: not fitted: {fits.frontier_missing}")
    if fits.holdout is not None:
        lines += ["", "holdout: largest width left out, predicted from the rest"]
        lines.append(
            f"  {'N':>9} {'tokens':>12} {'actual':>9} {'predicted':>9} {'error':>8}  80 % interval"
        )
        for r in fits.holdout:
            lines.append(
                f"  {r.n_features:>9} {r.tokens:>12} {r.actual:>9.4f} {r.predicted:>9.4f} "
                f"{r.rel_error:>+8.2%}  [{r.p10:.4f}, {r.p90:.4f}]"
                + ("" if r.inside else "  (outside)")
            )
    if fits.excluded:
        lines += ["", "left out:"]
        lines += [f"  {e.name}: {e.status}: {e.reason}" for e in fits.excluded]
    return "\n".join(lines)


def main(
    sweep_dir: str,
    out: str | None = None,
    *,
    holdout_largest: bool = False,
    n_boot: int = 200,
    seed: int = 0,
    d_model: int | None = None,
) -> FitOutput:
    """Fit a sweep and write ``fits.json``, ``table.txt`` and the plots.

    Args:
        sweep_dir: the sweep directory (local path or URL).
        out: output directory (default ``<sweep_dir>/fits``).
        holdout_largest: also fit without the largest width and report its prediction error.
        n_boot: bootstrap resamples.
        seed: seeds the bootstrap.
        d_model: input width for FLOP counts when configs and manifests do not give it.

    Raises:
        scaling_laws.fit.FitError: too few finished trials for a law (the message says what).
        FileNotFoundError: ``sweep_dir`` is not a sweep directory.
    """
    out = (out or f"{sweep_dir.rstrip('/')}/fits").rstrip("/")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = read_sweep(sweep_dir, d_model=d_model)
        fits = fit_sweep(results, n_boot=n_boot, seed=seed, holdout_largest=holdout_largest)
    messages = [str(w.message) for w in caught]
    for w in caught:  # hand them on to the caller's filters (the CLI prints them)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    table = fits_table(fits)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    files = [f"{out}/fits.json", f"{out}/table.txt"]
    with fsspec.open(files[0], "w") as f:
        f.write(fits.model_dump_json(indent=1))
    with fsspec.open(files[1], "w") as f:
        f.write(table + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in write_plots(fits, tmp).items():
            fs.put_file(path, f"{root}/{name}")
            files.append(f"{out}/{name}")
    return FitOutput(fits, out, table, files, messages)
