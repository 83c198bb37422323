"""What an SAE learns at equal tokens on real activations, scored on held-out rows.

    uv run --frozen python bench/real_quality.py --data /tmp/sr/acts/resid_post.6
        [--budgets 1048576] [--variant "old optimizer.lr=1.55e-3 ..."] [--no-sparsify]
        [--results rows.jsonl]

The companion of ``bench/planted_quality.py`` (whose trainer runner, sparsify runner and scoring
code this imports) on a ``dictlearn generate`` dataset, e.g. Gemma 3 270M's layer-6 residual
stream. The held-out rows are the project's own eval split: ``data.eval_fraction`` of the
dataset's blocks of ``data.block_rows`` rows (a stateless hash of the block index, independent
of the seed; ``dictlearn.data.reader``), which the trainer's train stream never reads. For each
token budget this trains our TopK SAE with the real trainer (``dictlearn train``'s ``main``) at
its defaults, plus any ``--variant`` (a name and dotted overrides), and EleutherAI's sparsify
with ITS defaults (see ``planted_quality.py``) on exactly the rows, in the order, our run at
``train.seed = --seed`` reads: the first ``budget`` rows of the train split's stream, written
once as float32 to a scratch file. Every SAE is then scored by the same code on the held-out rows:

- ``FVU``: sum ||x - x_hat||^2 / sum ||x - mean x||^2 (1 - FVE), in the data's raw units;
- ``L0``: active latents per row; ``dead``: fraction of latents active on no held-out row;
  ``rare``: fraction active on some, but on fewer than 1 in 10,000 held-out rows;
- ``tok/s``: training tokens per second after the first log interval (compilation excluded),
  and training tokens per CPU-second of the whole run (ours: start-up and compilation included;
  sparsify: its training loop), since the machine is shared.

The lr the defaults train at (``dictlearn.train.lr_law.default_lr``) is printed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile

import jax
import numpy as np
from planted_quality import (
    Trained,
    add_run_arguments,
    reconstruction_scores,
    requested_runs,
    run_sparsify,
    train_ours,
)

from dictlearn.data import ActivationDataset, BatchStream
from dictlearn.data.reader import split_blocks
from dictlearn.export.formats import write_export
from dictlearn.export.model import InferenceSAE
from dictlearn.train.config import DataConfig
from dictlearn.train.lr_law import default_lr

_BLOCK_ROWS = DataConfig.model_fields["block_rows"].default
_SHUFFLE_BLOCKS = DataConfig.model_fields["shuffle_blocks"].default


def heldout_rows(dataset: ActivationDataset, eval_fraction: float, limit: int) -> np.ndarray:
    """The first ``limit`` rows of the eval split's blocks, in global block order."""
    shards, starts = split_blocks(
        dataset, block_rows=_BLOCK_ROWS, eval_fraction=eval_fraction, split_seed=0
    )["eval"]
    n_blocks = min(shards.size, math.ceil(limit / _BLOCK_ROWS))
    blocks = zip(shards[:n_blocks], starts[:n_blocks], strict=True)
    ranges = [(int(s), int(r), int(r) + _BLOCK_ROWS) for s, r in blocks]
    return np.concatenate(dataset.read_row_ranges(ranges))[:limit]


def training_stream(dataset: ActivationDataset, args, position: int = 0) -> BatchStream:
    """The batches our trainer reads (train split, seed ``args.seed``, batch ``args.batch``),
    from global batch ``position`` on."""
    return BatchStream(
        dataset,
        global_batch=args.batch,
        seed=args.seed,
        split="train",
        eval_fraction=args.eval_fraction,
        block_rows=_BLOCK_ROWS,
        shuffle_blocks=_SHUFFLE_BLOCKS,
        position=position,
    )


def write_training_rows(dataset: ActivationDataset, args, budget: int, path: str) -> None:
    """The first ``budget`` rows our trainer reads (train split, seed ``args.seed``), as raw
    float32 rows in one file, in the order it reads them."""
    rows = np.memmap(path, np.float32, "w+", shape=(budget, dataset.d_model))
    with training_stream(dataset, args) as stream:
        for i in range(budget // args.batch):
            rows[i * args.batch : (i + 1) * args.batch] = next(stream)
    rows.flush()


def _row(name: str, budget: int, m: dict[str, float]) -> str:
    return (
        f"{name:<22} {budget:>9} {1 - m['fve']:>7.4f} {m['l0']:>6.1f} {100 * m['dead']:>6.2f}% "
        f"{100 * m['rare']:>6.2f}% {m['tokens_per_s']:>8.0f} {m['tokens_per_cpu_s']:>9.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dictlearn generate dataset URL")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1_048_576])
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument(
        "--eval-fraction", type=float, default=1 / 32, help="data.eval_fraction: blocks held out"
    )
    parser.add_argument("--heldout", type=int, default=65536, help="held-out rows scored (max)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    add_run_arguments(parser)
    parser.add_argument(
        "--keep",
        help="keep our runs under KEEP/<name>-<tokens> and sparsify's SAE as a SAELens export "
        "under KEEP/sparsify-<tokens> (for `dictlearn eval`)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    dataset = ActivationDataset.open(args.data)
    x = heldout_rows(dataset, args.eval_fraction, args.heldout)
    # Every run reads only the train split; no evaluation inside the trainer (scored here).
    split = [f"data.eval_fraction={args.eval_fraction}", "train.eval_batches=0"]
    split += [f"train.seed={args.seed}"]
    runs = requested_runs(args)
    print(
        f"{args.data}: d_model {dataset.d_model}, {dataset.n_tokens} rows, {dataset.num_shards} "
        f"shards; {x.shape[0]} held-out rows (eval_fraction {args.eval_fraction:g}); SAE: "
        f"{args.features} latents, k {args.k}, batch {args.batch}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}"
    )
    for budget in args.budgets:
        lr = default_lr(args.features, budget, args.batch, dataset.d_model)
        print(f"default lr at {budget} tokens (lr rule): {lr:.3e}")
    header = (
        f"{'run':<22} {'tokens':>9} {'FVU':>7} {'L0':>6} {'dead':>7} {'rare':>7} {'tok/s':>8} "
        f"{'tok/cpu-s':>9}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    for budget in args.budgets:
        for name, overrides in runs:
            with tempfile.TemporaryDirectory() as tmp:
                out = f"{args.keep}/{name}-{budget}" if args.keep else tmp
                trained = train_ours(args.data, args, budget, split + overrides, out)
            _report(name, budget, trained, " ".join(overrides), x, args)
        if not args.no_sparsify:
            with tempfile.TemporaryDirectory() as tmp:
                write_training_rows(dataset, args, budget, f"{tmp}/rows.f32")
                rows = [f"{tmp}/rows.f32"]
                trained, versions = run_sparsify(rows, dataset.d_model, args, budget, tmp)
            if args.keep:
                _keep_as_saelens(trained.sae, dataset, f"{args.keep}/sparsify-{budget}")
            _report("sparsify (defaults)", budget, trained, versions, x, args)


def _keep_as_saelens(sae: InferenceSAE, dataset: ActivationDataset, out: str) -> None:
    """sparsify's SAE as a SAELens export that names the dataset's model and hook, so that
    ``dictlearn eval`` splices it in exactly as it does ours."""
    manifest = dataset.manifest
    metadata = {
        "model_name": manifest.source_model,
        "hook_name": manifest.hook,
        "hook_layer": manifest.layer,
        "trained_architecture": "topk (sparsify)",
    }
    write_export(dataclasses.replace(sae, metadata=metadata), out, "saelens")


def _report(name: str, budget: int, trained: Trained, note: str, x: np.ndarray, args) -> None:
    metrics = reconstruction_scores(trained.sae, x) | {
        "tokens_per_s": trained.tokens_per_s,
        "tokens_per_cpu_s": budget / trained.cpu_s,
    }
    print(_row(name, budget, metrics) + (f"  [{note}]" if note else ""), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            row = {"run": name, "tokens": budget, "note": note, "fvu": 1 - metrics["fve"]}
            f.write(json.dumps(row | metrics) + "\n")


if __name__ == "__main__":
    main()
