"""PNG plots of a sweep's data with the fitted laws and their bootstrap intervals.

    paths = write_plots(fits, "runs/sweep-1/fits")   # {name: local path}

- ``loss_vs_n.png``: best held-out FVU against N, one colour per token budget, fitted curves
  with 80 % bands;
- ``loss_vs_lr.png``: held-out FVU against learning rate per (N, D) group with its parabola;
- ``lr_vs_n.png``: lr* against N with the lr law and its band;
- ``compute_frontier.png``: N_opt and D_opt against compute with the fitted power laws.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from scaling_laws.laws import FitResult, loss_law


def _band(rows: np.ndarray, fn, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    preds = np.array([fn(r, xs) for r in rows])
    return np.percentile(preds, 10, axis=0), np.percentile(preds, 90, axis=0)


def plot_loss_vs_n(fits: FitResult, path: str) -> None:
    law = fits.loss_law
    boot = np.asarray(law.bootstrap)
    budgets = sorted({p.tokens for p in law.points})
    ns = np.array([p.n_features for p in law.points])
    grid = np.geomspace(ns.min() / 1.5, ns.max() * 4, 100)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    fig, ax = plt.subplots(figsize=(7, 5))
    for colour, d in zip(colours, budgets, strict=True):
        pts = [p for p in law.points if p.tokens == d]
        ax.scatter([p.n_features for p in pts], [p.loss for p in pts], color=colour, zorder=3)
        ax.plot(grid, law.predict(grid, d), color=colour, label=f"D = {d:.3g}")
        lo, hi = _band(boot, lambda r, x, d=d: loss_law(r, x, d), grid)
        ax.fill_between(grid, lo, hi, color=colour, alpha=0.2)
    ax.set(xscale="log", yscale="log", xlabel="latents N", ylabel="held-out FVU (best lr)")
    ax.set_title(
        f"L = {law.E:.3g} + {law.A:.3g}·N^-{law.alpha:.3f} + {law.B:.3g}·D^-{law.beta:.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_vs_lr(fits: FitResult, path: str) -> None:
    """One panel per width; one colour per token budget; parabola and vertex where fitted."""
    groups = fits.lr_law.groups if fits.lr_law else []
    if not groups:  # no lr law: still show the raw points
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.scatter([t.lr for t in fits.trials], [t.eval_fvu for t in fits.trials], s=10)
        ax.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="held-out FVU")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    widths = sorted({g.n_features for g in groups})
    budgets = sorted({g.tokens for g in groups})
    colour_of = dict(zip(budgets, plt.cm.viridis(np.linspace(0, 0.9, len(budgets))), strict=True))
    cols = min(3, len(widths))
    rows = -(-len(widths) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, n in zip(axes.flat, widths, strict=False):
        for g in (g for g in groups if g.n_features == n):
            colour = colour_of[g.tokens]
            ax.scatter(g.lrs, g.losses, color=colour, s=10)
            if g.coeffs is not None:
                x = np.linspace(np.log(min(g.lrs)), np.log(max(g.lrs)), 50)
                c2, c1, c0 = g.coeffs
                ax.plot(
                    np.exp(x),
                    np.exp(c2 * x * x + c1 * x + c0),
                    color=colour,
                    lw=1,
                    ls="-" if g.status == "interior" else ":",
                    label=f"D = {g.tokens:.2g}",
                )
            if g.status == "interior":
                c2, c1, c0 = g.coeffs  # type: ignore[misc]
                v = np.log(g.lr_star)  # type: ignore[arg-type]
                ax.plot(g.lr_star, np.exp(c2 * v * v + c1 * v + c0), "k|", ms=8)
        ax.set(xscale="log", yscale="log", title=f"N = {n}")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        ax.title.set_fontsize(9)
    for ax in axes.flat[len(widths) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("peak learning rate (| = lr*, dotted: lr* outside the grid)", fontsize=9)
    fig.supylabel("held-out FVU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_vs_n(fits: FitResult, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    law = fits.lr_law
    if law is None:
        ax.text(
            0.5,
            0.5,
            f"no lr law:\n{fits.lr_law_missing}",
            ha="center",
            va="center",
            wrap=True,
            transform=ax.transAxes,
            fontsize=8,
        )
    else:
        pts = [g for g in law.groups if g.status == "interior"]
        budgets = sorted({g.tokens for g in pts})
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
        ns = np.array([g.n_features for g in pts], float)
        grid = np.geomspace(ns.min() / 1.5, ns.max() * 4, 50)
        boot = np.asarray(law.bootstrap)
        for colour, d in zip(colours, budgets, strict=True):
            sel = [g for g in pts if g.tokens == d]
            ax.scatter([g.n_features for g in sel], [g.lr_star for g in sel], color=colour)
            ax.plot(grid, [law.predict(n, d) for n in grid], color=colour, label=f"D = {d:.3g}")
            lo, hi = _band(
                boot, lambda r, x, d=d: np.exp(r[0] + r[1] * np.log(x) + r[2] * np.log(d)), grid
            )
            ax.fill_between(grid, lo, hi, color=colour, alpha=0.2)
        ax.set_title(
            f"lr* = {law.c:.3g}·N^{law.gamma:.3f}"
            + (f"·D^{law.delta:.3f}" if law.delta is not None else ""),
            fontsize=9,
        )
        ax.legend(fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="latents N", ylabel="optimal learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(fits: FitResult, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    fr = fits.frontier
    if fr is None:
        ax.text(
            0.5,
            0.5,
            f"no compute frontier:\n{fits.frontier_missing}",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=8,
        )
    else:
        c = np.asarray(fr.flops)
        ax.plot(c, fr.n_opt, "o", ms=3, color="C0", label="N_opt (from L(N, D))")
        ax.plot(
            c,
            fr.n_coef * c**fr.n_exponent,
            color="C0",
            label=f"N_opt = {fr.n_coef:.3g}·C^{fr.n_exponent:.3f}",
        )
        ax.plot(c, fr.d_opt, "s", ms=3, color="C1", label="D_opt")
        ax.plot(
            c,
            fr.d_coef * c**fr.d_exponent,
            color="C1",
            label=f"D_opt = {fr.d_coef:.3g}·C^{fr.d_exponent:.3f}",
        )
        used = [(t.flops, t.n_features) for t in fits.trials if t.flops]
        if used:
            ax.scatter(*zip(*used, strict=True), s=8, color="grey", label="trials (C, N)")
        ax.legend(fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N or D")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {
    "loss_vs_n.png": plot_loss_vs_n,
    "loss_vs_lr.png": plot_loss_vs_lr,
    "lr_vs_n.png": plot_lr_vs_n,
    "compute_frontier.png": plot_frontier,
}


def write_plots(fits: FitResult, out_dir: str) -> dict[str, str]:
    """Write every plot as a PNG into a local directory; returns {file name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, plot in PLOTS.items():
        paths[name] = os.path.join(out_dir, name)
        plot(fits, paths[name])
    return paths
