"""Synthetic sweeps drawn from known laws, written as real sweep directories.

Held-out FVU of a trial at (N, D, lr):
    L = L(N, D) · exp(KAPPA · log(lr / lr*(N, D))²) · exp(noise),
    L(N, D) = E + A·N^-α + B·D^-β,   lr*(N, D) = C_LR · N^γ · D^δ.
The lr grid of each width is centred on a deliberately wrong guess (as a real sweep's would be),
so lr* sits at different places inside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dictlearn.config import to_yaml
from dictlearn.sae import TopKConfig
from dictlearn.train.config import DataConfig, LoopConfig, OptimizerConfig, RunConfig, TrainConfig

TRUE_LOSS = {"E": 0.05, "A": 3.0, "alpha": 0.4, "B": 6.0, "beta": 0.3}
TRUE_LR = {"c": 0.07, "gamma": -0.5, "delta": -0.1}
KAPPA = 0.05
D_MODEL = 256
K = 32
BATCH = 4096
WIDTHS = (512, 1024, 2048, 4096, 8192, 16384)
BUDGETS = tuple(BATCH * s for s in (64, 256, 1024, 4096, 16384, 65536))  # 2^18 .. 2^28 tokens
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def true_loss(n, d):
    t = TRUE_LOSS
    return (
        t["E"]
        + t["A"] * np.asarray(n, float) ** -t["alpha"]
        + t["B"] * np.asarray(d, float) ** -t["beta"]
    )


def true_lr(n, d):
    t = TRUE_LR
    return t["c"] * np.asarray(n, float) ** t["gamma"] * np.asarray(d, float) ** t["delta"]


@dataclass(frozen=True)
class TrialSpec:
    name: str
    n_features: int
    tokens: int
    lr: float
    eval_fvu: float


def draw_trials(
    widths=WIDTHS,
    budgets=BUDGETS,
    lr_factors=LR_FACTORS,
    noise: float = 0.0,
    outliers: int = 0,
    seed: int = 0,
) -> list[TrialSpec]:
    """Trials on the full (N, D, lr) grid; ``outliers`` of them get +40 % loss (bad runs)."""
    rng = np.random.default_rng(seed)
    specs = []
    for n in widths:
        guess = 3e-4 * (n / 2048) ** -0.3  # the sweep's (wrong) guess of lr*(N)
        for d in budgets:
            for f in lr_factors:
                lr = guess * f
                loss = true_loss(n, d) * np.exp(KAPPA * np.log(lr / true_lr(n, d)) ** 2)
                loss *= np.exp(rng.normal(0.0, noise)) if noise else 1.0
                specs.append(TrialSpec(f"n{n}-d{d}-lr{lr:.3g}", n, d, float(lr), float(loss)))
    for i in rng.choice(len(specs), size=outliers, replace=False):
        s = specs[i]
        specs[i] = TrialSpec(s.name, s.n_features, s.tokens, s.lr, s.eval_fvu * 1.4)
    return specs


def train_config(spec: TrialSpec, root: Path, data_path: str = "/data/acts") -> TrainConfig:
    return TrainConfig(
        data=DataConfig(path=data_path, eval_fraction=0.05),
        sae=TopKConfig(n_features=spec.n_features, k=K, d_model=D_MODEL),
        optimizer=OptimizerConfig(lr=spec.lr, warmup_steps=50, decay_fraction=0.2),
        train=LoopConfig(batch_size=BATCH, steps=spec.tokens // BATCH, log_every=50),
        run=RunConfig(output_dir=str(root / "trials"), name=spec.name),
    )


def write_trial(
    root: Path,
    spec: TrialSpec,
    *,
    status: str | None = "finished",
    final_eval: bool = True,
    error: str | None = None,
) -> Path:
    """One `dictlearn train` run directory as the trainer and the sweep runner leave it."""
    run = root / "trials" / spec.name
    run.mkdir(parents=True, exist_ok=True)
    config = train_config(spec, root)
    (run / "config.yaml").write_text(to_yaml(config))
    steps = config.train.steps
    rows = []
    for step in (steps // 2, steps):
        fvu = spec.eval_fvu * (1.3 if step < steps else 0.98)
        rows.append(
            {
                "step": step,
                "time": 0.0,
                "loss": fvu,
                "fvu": fvu,
                "l0": float(K),
                "dead_fraction": 0.01,
                "tokens": step * BATCH,
            }
        )
    if final_eval:
        rows.append({"step": steps, "time": 0.0, "eval/fvu": spec.eval_fvu, "eval/l0": float(K)})
    else:
        rows = rows[:1]  # cut short: died half-way
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        record = {"status": status, "error": error, "attempts": 1 if status != "failed" else 3}
        (run / "trial.json").write_text(json.dumps(record))
    return run


def write_sweep(root: Path, specs: list[TrialSpec]) -> Path:
    for spec in specs:
        write_trial(root, spec)
    return root
