"""The default peak learning rate: a law fitted to a sweep, not a constant.

    lr = default_lr(n_features=16384, tokens=4_000_000, batch_size=4096, d_model=640)

``optimizer.lr`` left unset (null) trains at ``lr*(N, D) = c · N^γ · D^δ`` for the run's width N
(``sae.n_features``) and training tokens D (``train.steps × train.batch_size``) at the fitted
batch size B0 = 1,024 and input width d0 = 640. Elsewhere the law is read in steps, not tokens,
and scaled by ``sqrt(d0 / d_model)``: ``lr(N, D, B, d) = lr*(N, D · B0/B) · sqrt(d0/d)``. The
width factor keeps Adam's per-element step the same fraction of a unit-norm decoder row's
elements (~1/sqrt(d)). Evidence (planted data only, ``bench/planted_quality.py``; all at 1M
tokens): the proxy (4,096 latents, d_model 160, k 8) was best at 2e-3–4e-3 at batch 1,024 (the
rule: 3.9e-3) and at ~8e-3 at batch 4,096 (the rule: 7.6e-3; the law read in tokens: 1.9e-3, FVE
0.48 instead of 0.60); at full size (16,384 latents, d_model 640, k 32, batch 4,096) 3e-3 (the
rule: 3.0e-3) left 0.3 % of the latents dead and 6e-3 left 35 %. The constants
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
sweep`` + ``fit`` + ``select``) is the way to a learning rate with evidence behind it. The sweep
held the batch and d_model fixed; the batch and width rules above rest on the planted benchmark
alone.
"""

from __future__ import annotations

import math

LR_LAW_C = 6.2524
LR_LAW_GAMMA = -0.16564
LR_LAW_DELTA = -0.48314
FITTED_N_FEATURES = (1 << 10, 1 << 14)
FITTED_TOKENS = (131_072, 524_288)
FITTED_BATCH_SIZE = 1024
FITTED_D_MODEL = 640
EXTRAPOLATION_FACTOR = 16
"""How far beyond the fitted widths and token budgets the law is applied without a note."""


def default_lr(
    n_features: int,
    tokens: int,
    batch_size: int = FITTED_BATCH_SIZE,
    d_model: int = FITTED_D_MODEL,
) -> float:
    """The peak learning rate for ``n_features`` latents, ``tokens`` tokens at ``batch_size``
    and input width ``d_model``.

    The fitted law at the tokens the same number of steps takes at the fitted batch size, times
    ``sqrt(FITTED_D_MODEL / d_model)`` (the module docstring gives the evidence). At the fitted
    batch size and width this is the law itself.
    """
    if min(n_features, tokens, batch_size, d_model) <= 0:
        raise ValueError(
            "need n_features, tokens, batch_size and d_model > 0, got "
            f"{n_features}, {tokens}, {batch_size}, {d_model}"
        )
    steps_tokens = tokens * FITTED_BATCH_SIZE / batch_size
    width = (FITTED_D_MODEL / d_model) ** 0.5
    return LR_LAW_C * n_features**LR_LAW_GAMMA * steps_tokens**LR_LAW_DELTA * width


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
