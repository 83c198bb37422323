"""The default peak learning rate: a law fitted to a sweep, not a constant.

    lr = default_lr(n_features=16384, tokens=4_000_000)   # what optimizer.lr: null trains with

``optimizer.lr`` left unset (null) trains at ``lr*(N, D) = c · N^γ · D^δ`` for the run's width N
(``sae.n_features``) and training tokens D (``train.steps × train.batch_size``). The constants
are the learning-rate law ``dictlearn fit`` fitted to the sweep of ``bench/sweep_report.py``:
TopK, k 32, Adam, batch 1,024, warm-up 16 steps, 20 % linear decay, on 2.1M tokens of Gemma 3
270M's ``resid_post.6`` (d_model 640); widths 2^10-2^14 x lr {2e-3, 5e-3, 1.25e-2} x tokens
{131,072, 262,144, 524,288}; every one of the 15 (N, D) groups had its optimum inside the lr
grid. The law's 80 % bootstrap intervals: γ in [-0.202, -0.142], δ in [-0.521, -0.421]. The
fit without the 2^14 width predicted its held-out FVU within 0.5-2.9 %, and the fit on all
widths predicted a 2^15 run trained at the law's lr within 1.3 %, inside its 80 % interval
(README, "Scaling-law report"; docs/sweep_report.md).

Outside the fitted range (other data, batch sizes, architectures, or N, D far beyond it) the law
is an extrapolation: :func:`extrapolation_note` says so, and a sweep of your own (``dictlearn
sweep`` + ``fit`` + ``select``) is the way to a learning rate with evidence behind it. The law
does not scale with the batch size: the sweep held it fixed, so there is no evidence for a rule.
"""

from __future__ import annotations

import math

LR_LAW_C = 6.2524
LR_LAW_GAMMA = -0.16564
LR_LAW_DELTA = -0.48314
FITTED_N_FEATURES = (1 << 10, 1 << 14)
FITTED_TOKENS = (131_072, 524_288)
FITTED_BATCH_SIZE = 1024
EXTRAPOLATION_FACTOR = 16
"""How far beyond the fitted widths and token budgets the law is applied without a note."""


def default_lr(n_features: int, tokens: int) -> float:
    """The fitted law's peak learning rate for ``n_features`` latents and ``tokens`` tokens."""
    if n_features <= 0 or tokens <= 0:
        raise ValueError(f"need n_features > 0 and tokens > 0, got {n_features}, {tokens}")
    return LR_LAW_C * n_features**LR_LAW_GAMMA * tokens**LR_LAW_DELTA


def extrapolation_note(n_features: int, tokens: int) -> str | None:
    """A sentence when (N, D) lies more than ``EXTRAPOLATION_FACTOR``x outside the fitted range."""
    far = []
    for name, value, (lo, hi) in (
        ("sae.n_features", n_features, FITTED_N_FEATURES),
        ("tokens", tokens, FITTED_TOKENS),
    ):
        if value > hi * EXTRAPOLATION_FACTOR or value < lo / EXTRAPOLATION_FACTOR:
            far.append(f"{name}={value:,} (fitted {lo:,}-{hi:,})")
    if not far:
        return None
    factor = max(
        math.log2(max(v / hi, lo / v, 1.0))
        for v, (lo, hi) in ((n_features, FITTED_N_FEATURES), (tokens, FITTED_TOKENS))
    )
    return (
        f"optimizer.lr is the fitted law's, extrapolated 2^{factor:.0f}x beyond its sweep: "
        + ", ".join(far)
        + "; a sweep of your own (dictlearn sweep, fit, select) gives one with evidence"
    )
