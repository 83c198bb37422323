"""Scaling-law report: do small sweeps predict the next width's held-out FVU?

    uv run --frozen python bench/sweep_report.py --data runs/acts-2m/resid_post.6 --out runs/sweep-report

On one activation dataset (real Gemma 3 270M activations from ``dictlearn generate``), the
report runs, through the same entry points as the CLI:

1. ``dictlearn sweep``: TopK widths ``--widths`` (2^10-2^14) x ``--lrs`` x ``--tokens``, each
   width/lr pair one constant-lr trunk with every token budget's decay branched from it;
2. branched vs from scratch: the smallest width at the middle lr trained from scratch at the
   smallest and largest budgets, held-out FVU compared with the branched trials' (target ≤ 1 %);
3. ``dictlearn fit --holdout-largest``: the loss law L(N, D) = E + A·N^-α + B·D^-β and the lr
   law lr*(N, D), with 80 % bootstrap intervals; the holdout leaves the largest swept width out
   and predicts it;
4. ``dictlearn select n_features=--target-width tokens=max(--tokens)``: the large run's config
   (lr from the lr law) with the predicted FVU and its 80 % interval;
5. ``dictlearn train`` on that config: the real held-out FVU against the prediction.

It prints the tables and writes them (``report.md``, ``report.json``) and the fit's plots under
``--out``. Re-running skips finished trials and runs (the sweep's and the trainer's resume).
Target: the prediction error for the target width ≤ 2 % and inside the 80 % interval.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from dictlearn.config import load_config, validate
from dictlearn.data.format import ActivationDataset
from dictlearn.train.config import TrainConfig
from launch import fit as fit_stage
from launch import select as select_stage
from launch import sweep as sweep_stage
from launch.train import train
from scaling_laws.sweep import SweepConfig


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The report's sweep: TopK on ``args.data``, branched decays, one trial at a time."""
    data = {
        "name": "report",
        "output_dir": str(args.out),
        "base": {
            "data": {"path": args.data, "eval_fraction": args.eval_fraction},
            "sae": {
                "architecture": "topk",
                "n_features": args.widths[0],
                "k": args.k,
                "dead_window_tokens": args.dead_window_tokens,
            },
            "optimizer": {
                "warmup_steps": args.warmup_steps,
                "decay_fraction": args.decay_fraction,
            },
            "train": {
                "batch_size": args.batch_size,
                "log_every": 32,
                "eval_batches": args.eval_batches,
            },
            "checkpoint": {"every_steps": 100_000},
            "tracker": {"wandb_mode": "disabled"},
        },
        "grid": {"n_features": args.widths, "lr": args.lrs, "tokens": args.tokens},
        "branch_decays": True,
        "retries": 1,
        # One trial at a time, on every core: a trial's matmuls already use them all.
        "ray": {"cpus_per_trial": args.cpus_per_trial, "max_concurrent_trials": 1},
    }
    return validate(SweepConfig, data, source="sweep report")


def scratch_checks(args: argparse.Namespace, cfg: SweepConfig, trials: dict[str, Any]) -> list:
    """Train the smallest width at the middle lr from scratch at the smallest and largest
    budgets; compare held-out FVU with the branched trials of the same point."""
    width, lr = min(args.widths), sorted(args.lrs)[len(args.lrs) // 2]
    rows = []
    for tokens in (min(args.tokens), max(args.tokens)):
        branched = [
            t
            for t in trials.values()
            if t["n_features"] == width and t["lr"] == lr and t["tokens"] == tokens
        ]
        if not branched:
            continue
        base = cfg.base.model_dump(mode="json")
        base["sae"]["n_features"] = width
        base["optimizer"]["lr"] = lr
        base["train"]["steps"] = tokens // args.batch_size
        base["run"] = {"output_dir": str(args.out / "scratch"), "name": f"n{width}-t{tokens}"}
        result = train(validate(TrainConfig, base, source="from-scratch check"))
        scratch = float(result.eval_metrics["fvu"])
        b = branched[0]["eval_fvu"]
        rows.append(
            {
                "n_features": width,
                "lr": lr,
                "tokens": tokens,
                "branched_fvu": b,
                "scratch_fvu": scratch,
                "rel_diff": (b - scratch) / scratch,
            }
        )
    return rows


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="activation dataset URL")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep-report"))
    parser.add_argument("--widths", type=_ints, default=[1 << p for p in range(10, 15)])
    parser.add_argument("--lrs", type=_floats, default=[2e-3, 5e-3, 1.25e-2])
    parser.add_argument("--tokens", type=_ints, default=[262_144, 524_288, 1_048_576])
    parser.add_argument("--target-width", type=int, default=1 << 15)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--warmup-steps", type=int, default=16)
    parser.add_argument("--decay-fraction", type=float, default=0.2)
    parser.add_argument("--dead-window-tokens", type=int, default=200_000)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--cpus-per-trial", type=float, default=float(os.cpu_count() or 1))
    args = parser.parse_args()
    args.out = args.out.absolute()

    dataset = ActivationDataset.open(args.data)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)), "
        f"python {platform.python_version()}; dataset {args.data}: {dataset.manifest.n_tokens:,} "
        f"tokens of {dataset.manifest.source_model} {dataset.manifest.hook}, d_model "
        f"{dataset.d_model}",
        flush=True,
    )
    started = time.perf_counter()
    cfg = sweep_config(args)
    sweep = sweep_stage.main(cfg)
    failed = [o.name for o in sweep.trials if o.status == "failed"]
    print(f"sweep: {len(sweep.trials)} trials, {len(failed)} failed {failed or ''}", flush=True)

    fits_out = fit_stage.main(cfg.root, holdout_largest=True, n_boot=args.n_boot)
    fits = fits_out.fits
    print(fits_out.table, flush=True)
    trials = {t.name: t.model_dump() for t in fits.trials}

    scratch = scratch_checks(args, cfg, trials)

    target_tokens = max(args.tokens)
    overrides = ["tracker.wandb_mode=disabled", f"run.output_dir={args.out / 'target'}"]
    lr_note = "from the lr law"
    if fits.lr_law is None:
        # No lr law (too few interior optima): the best swept lr of the largest width at the
        # largest budget stands in, and the report says so.
        top = max(t["n_features"] for t in trials.values())
        best = min(
            (t for t in trials.values() if t["n_features"] == top and t["tokens"] == target_tokens),
            key=lambda t: t["eval_fvu"],
        )
        overrides.append(f"optimizer.lr={best['lr']}")
        lr_note = f"NO lr law ({fits.lr_law_missing}); best swept lr of N={top}"
    selected = select_stage.main(
        f"{fits_out.out_dir}/fits.json",
        args.target_width,
        tokens=target_tokens,
        out=str(args.out / f"select-{args.target_width}.yaml"),
        overrides=overrides,
    )
    sel = selected.selection
    target_cfg = load_config(TrainConfig, selected.config_path)
    target = train(target_cfg)
    actual = float(target.eval_metrics["fvu"])
    lo, hi = sel.fvu_interval
    error = (sel.predicted_fvu - actual) / actual
    inside = lo <= actual <= hi

    holdout_rows = [
        [
            h.n_features,
            f"{h.tokens:,}",
            f"{h.predicted:.4f}",
            f"[{h.p10:.4f}, {h.p90:.4f}]",
            f"{h.actual:.4f}",
            f"{h.rel_error:+.2%}",
            "yes" if h.inside else "no",
        ]
        for h in fits.holdout or []
    ]
    target_row = [
        args.target_width,
        f"{target_tokens:,}",
        f"{sel.predicted_fvu:.4f}",
        f"[{lo:.4f}, {hi:.4f}]",
        f"{actual:.4f}",
        f"{error:+.2%}",
        "yes" if inside else "no",
    ]
    header = ["N", "tokens", "predicted FVU", "80% interval", "actual FVU", "error", "inside"]
    law = fits.loss_law
    sections = [
        "# Scaling-law report",
        f"dataset `{args.data}` ({dataset.manifest.n_tokens:,} tokens, "
        f"{dataset.manifest.source_model} {dataset.manifest.hook}, d_model {dataset.d_model}); "
        f"TopK k={args.k}, batch {args.batch_size}; widths {args.widths} x lrs {args.lrs} x "
        f"tokens {args.tokens}; {len(fits.trials)} trials fitted, {len(fits.excluded)} left out.",
        "## Loss law L(N, D) = E + A·N^-α + B·D^-β (fitted on all swept widths)",
        f"E={law.E:.4g} A={law.A:.4g} α={law.alpha:.4f} B={law.B:.4g} β={law.beta:.4f}",
        "## Trials (held-out FVU)",
        _md_table(
            ["N", "lr", "tokens", "eval FVU", "L0", "dead"],
            [
                [
                    t["n_features"],
                    f"{t['lr']:g}",
                    f"{t['tokens']:,}",
                    f"{t['eval_fvu']:.4f}",
                    f"{t['l0']:.1f}" if t["l0"] is not None else "",
                    f"{t['dead_fraction']:.3f}" if t["dead_fraction"] is not None else "",
                ]
                for t in sorted(
                    trials.values(), key=lambda t: (t["n_features"], t["lr"], t["tokens"])
                )
            ],
        ),
        "## Branched decays vs from scratch (target |diff| ≤ 1 %)",
        _md_table(
            ["N", "lr", "tokens", "branched FVU", "scratch FVU", "diff"],
            [
                [
                    r["n_features"],
                    f"{r['lr']:g}",
                    f"{r['tokens']:,}",
                    f"{r['branched_fvu']:.5f}",
                    f"{r['scratch_fvu']:.5f}",
                    f"{r['rel_diff']:+.3%}",
                ]
                for r in scratch
            ],
        ),
        "## Predictions (holdout: fit without the largest swept width; target: fit on all, "
        f"trained for real at the selected lr {sel.lr:.3g} ({lr_note}), 80 % interval "
        f"[{sel.lr_interval[0]:.3g}, {sel.lr_interval[1]:.3g}])",
        _md_table(header, [*holdout_rows, target_row]),
        f"Target: error ≤ 2 % and inside the 80 % interval: "
        f"{'met' if abs(error) <= 0.02 and inside else 'MISSED'}. "
        f"Total {time.perf_counter() - started:.0f} s.",
        "Plots: " + ", ".join(Path(f).name for f in fits_out.files if f.endswith(".png")),
    ]
    report = "\n\n".join(sections) + "\n"
    print(report, flush=True)
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "loss_law": law.model_dump(exclude={"bootstrap", "residuals"}),
                "holdout": [h.model_dump() for h in fits.holdout or []],
                "scratch_checks": scratch,
                "target": {
                    "n_features": args.target_width,
                    "tokens": target_tokens,
                    "lr": sel.lr,
                    "predicted_fvu": sel.predicted_fvu,
                    "interval_80": [lo, hi],
                    "actual_fvu": actual,
                    "rel_error": error,
                    "inside": inside,
                    "config": yaml.safe_load(Path(selected.config_path).read_text()),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
