"""A BatchTopK run's held-out dead latents under three inference rules.

    uv run --frozen python bench/batchtopk_rules.py RUN_DIR --data DATASET
        [--skip-batches 256] [--calibration-batches 8]

BatchTopK trains with a batch-wide selection (the ``k * batch`` largest pre-activations of a
batch) and exports as a JumpReLU with one threshold for every latent, the mean batch cut-off.
A rare latent that is selected only in batches whose cut-off happens to be low could then be
silent under the export although it is alive in training. This scores the run (``dictlearn
train``'s directory) on the held-out rows of ``bench/real_quality.py`` under:

- ``export``: the exported JumpReLU with its one threshold (what ``real_quality.py`` scores);
- ``batch rule``: the training rule itself, on held-out batches of ``--batch`` rows;
- ``per latent``: one threshold per latent, set so that on ``--calibration-batches`` batches of
  the training stream (after the ``--skip-batches`` the run trained on) each latent fires
  exactly as often as the batch rule selected it there (a latent never selected: never fires);
- ``per latent, capped``: the same, but never above the export's threshold.

Scores as in ``real_quality.py`` (``reconstruction_scores``): FVU, L0, dead, rare.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from planted_quality import reconstruction_scores, scores_from_chunks
from real_quality import heldout_rows, training_stream

from dictlearn.data import ActivationDataset
from dictlearn.export.loading import load_sae
from dictlearn.export.model import InferenceSAE
from dictlearn.sae.topk_select import batch_threshold


def batch_rule(sae: InferenceSAE, k: int) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``rows -> (pre-activations, selected mask)`` under BatchTopK's training rule: the
    ``k * len(rows)`` largest ReLU'd pre-activations of the batch, cut off by the trainer's own
    ``batch_threshold`` (one device, so no mesh axes)."""
    w_enc, b_enc, b_dec = (jnp.asarray(a, jnp.float32) for a in (sae.W_enc, sae.b_enc, sae.b_dec))

    @jax.jit
    def select(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        pre = (rows - b_dec) @ w_enc + b_enc
        relu = jnp.maximum(pre, 0.0)
        cutoff = batch_threshold(relu, rows.shape[0] * k, 4 * k, axes=())
        return pre, relu >= cutoff

    return select


def batch_rule_scores(sae: InferenceSAE, x: np.ndarray, batch: int, k: int) -> dict[str, float]:
    """FVE, L0, dead and rare under BatchTopK's training selection, batch by batch of ``x``."""
    select = batch_rule(sae, k)
    w_dec, b_dec = jnp.asarray(sae.W_dec, jnp.float32), jnp.asarray(sae.b_dec, jnp.float32)

    @jax.jit
    def stats(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        pre, mask = select(rows)
        x_hat = jnp.where(mask, pre, 0.0) @ w_dec + b_dec
        return jnp.sum((rows - x_hat) ** 2), jnp.sum(mask), jnp.sum(mask, axis=0)

    return scores_from_chunks(stats, x, batch, whole_chunks_only=True)


def per_latent_thresholds(sae: InferenceSAE, batches: list[np.ndarray], k: int) -> np.ndarray:
    """Each latent's threshold at which it fires on ``batches`` as often as the batch rule
    selected it there; ``inf`` for a latent the rule never selected."""
    select = batch_rule(sae, k)
    pres, selected = [], np.zeros(sae.d_sae, np.int64)
    for rows in batches:
        pre, mask = select(jnp.asarray(rows))
        pres.append(np.asarray(pre).T)
        selected += np.asarray(jnp.sum(mask, axis=0))
    descending = -np.sort(-np.concatenate(pres, axis=1), axis=1)  # [d_sae, rows]
    nth = descending[np.arange(sae.d_sae), np.maximum(selected - 1, 0)]
    # Fire on the selected-th largest value itself (the export fires where pre > threshold).
    return np.where(selected > 0, np.nextafter(nth, np.float32(-np.inf)), np.inf).astype(np.float32)


def _row(name: str, m: dict[str, float]) -> str:
    return (
        f"{name:<22} {1 - m['fve']:>7.4f} {m['l0']:>6.2f} {100 * m['dead']:>6.2f}% "
        f"{100 * m['rare']:>6.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a BatchTopK `dictlearn train` run directory")
    parser.add_argument("--data", required=True, help="the dataset it trained on")
    parser.add_argument("--eval-fraction", type=float, default=1 / 32)
    parser.add_argument("--heldout", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="the run's train.seed")
    parser.add_argument("--skip-batches", type=int, default=256, help="batches the run read")
    parser.add_argument("--calibration-batches", type=int, default=8)
    args = parser.parse_args()

    sae = load_sae(args.run)
    trained = sae.metadata.get("trained_architecture")
    if trained != "batchtopk":
        parser.error(f"{args.run}: not a BatchTopK run (its export says it trained {trained!r})")
    dataset = ActivationDataset.open(args.data)
    x = heldout_rows(dataset, args.eval_fraction, args.heldout)
    with training_stream(dataset, args, position=args.skip_batches) as stream:
        calibration = [next(stream) for _ in range(args.calibration_batches)]
    per_latent = per_latent_thresholds(sae, calibration, args.k)
    export_threshold = float(np.asarray(sae.threshold)[0])
    print(
        f"{args.run}: {sae.d_sae} latents, export threshold {export_threshold:.5g}; "
        f"{x.shape[0]} held-out rows; per-latent thresholds from {len(calibration)} batches "
        f"({int(np.sum(~np.isfinite(per_latent)))} latents never selected there)"
    )
    print(f"{'rule':<22} {'FVU':>7} {'L0':>6} {'dead':>7} {'rare':>7}")
    print(_row("export", reconstruction_scores(sae, x)))
    print(_row("batch rule", batch_rule_scores(sae, x, args.batch, args.k)))
    for name, threshold in [
        ("per latent", per_latent),
        ("per latent, capped", np.minimum(per_latent, export_threshold)),
    ]:
        print(_row(name, reconstruction_scores(dataclasses.replace(sae, threshold=threshold), x)))


if __name__ == "__main__":
    main()
