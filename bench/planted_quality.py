"""What an SAE learns at equal tokens, on planted data shaped like real activations.

    uv run --frozen python bench/planted_quality.py [--budgets 262144 1048576 4194304]
        [--variant "lion optimizer.name=lion optimizer.lr=3e-4"] [--no-sparsify]

The data (``dictlearn.data.planted``): twice as many true unit directions as latents, Zipf
firing frequencies, lognormal magnitudes, ``--mean-active`` directions per row, a constant offset
whose norm equals the signal's RMS norm, and small Gaussian noise. It is written once under
``~/.cache/dictlearn/planted-quality/`` and reused. For each token budget this trains our TopK
SAE with the real trainer (``dictlearn train``'s ``main``) at its defaults, plus any
``--variant`` (a name and dotted overrides), and EleutherAI's sparsify with ITS defaults
(sign descent under a schedule-free wrapper, momentum 0.95, lr 5e-3 at 16k latents, no
warm-up, b_dec at the first batch's mean, no AuxK) on the same dataset. Every SAE is then scored
by the same code on fresh held-out rows of the same distribution:

- ``FVE``: 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2;
- ``L0``: active latents per row; ``dead``: fraction of latents active on no held-out row;
- ``learned->true``: mean over decoder rows of the best cosine with a true direction;
- ``true->learned``: mean over true directions of the best cosine with a decoder row
  (``recovery_score``); random unit rows are printed as the floor of both;
- ``tok/s``: training tokens per second after the first log interval (compilation and start-up
  excluded), and training tokens per CPU-second of the whole run (start-up included), since
  this machine is shared.

sparsify runs in a virtual environment of its own (torch must not become our dependency):
``DICTLEARN_SPARSIFY_PYTHON`` names an interpreter with ``sparsify`` installed, otherwise one is
made under ``~/.cache/dictlearn/sparsify-venv`` (a CPU build of torch; a few minutes, once).
By hand: ``python -m venv V && V/bin/pip install torch==2.13.0 eai-sparsify==1.3.3`` with
``--extra-index-url https://download.pytorch.org/whl/cpu`` where no local torch wheel is set up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from peer_venv import peer_python

from dictlearn.config import apply_overrides, validate
from dictlearn.data import ActivationDataset, PlantedConfig, write_planted_dataset
from dictlearn.data.planted import heldout_rows
from dictlearn.export import InferenceSAE, load_sae
from dictlearn.export.model import SAEParams
from dictlearn.sae.base import registered_architectures
from dictlearn.tracking import read_metrics
from dictlearn.train.config import TrainConfig
from dictlearn.train.trainer import main as train_main

SPARSIFY_VERSION = "1.3.3"
CACHE = Path.home() / ".cache" / "dictlearn"
# Rows per pass when scoring, and decoder rows per block of the cosine matrix: bounds memory.
_SCORE_CHUNK = 1024
_COSINE_BLOCK = 2048

# Trains sparsify's SparseCoder the way sparsify's Trainer does with its defaults
# (sparsify/trainer.py: optimizer "signum", lr 5e-3 / sqrt(num_latents / 2**14), b_dec set to
# the first batch's mean, decoder rows renormalised before each forward, the gradient parallel
# to them removed, auxk_alpha 0), on rows read from our shard files. Its Trainer itself needs a
# language model to hook, so this loop is the part of it that applies to stored activations.
_SPARSIFY_SCRIPT = r"""
import json, os, sys, time
import numpy as np, torch
import sparsify
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

spec = json.loads(sys.argv[1])
torch.manual_seed(spec["seed"])
d, batch, steps = spec["d_model"], spec["batch"], spec["steps"]
shards = [np.memmap(p, np.float32, "r").reshape(-1, d) for p in spec["shards"]]
rows = np.concatenate(shards) if len(shards) > 1 else shards[0]
assert rows.shape[0] >= steps * batch, (rows.shape, steps, batch)
sae = SparseCoder(d, SparseCoderConfig(num_latents=spec["n_latents"], k=spec["k"]))
lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5
opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
opt.train()
cpu0 = time.process_time()
for step in range(steps):
    if step == 1:
        t1 = time.perf_counter()
    x = torch.from_numpy(np.array(rows[step * batch:(step + 1) * batch]))
    if step == 0:
        sae.b_dec.data = x.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    out = sae(x)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
steady = (steps - 1) * batch / (time.perf_counter() - t1) if steps > 1 else float("nan")
cpu = time.process_time() - cpu0
opt.eval()  # schedule-free: the averaged parameters are the ones to use, as sparsify saves them
np.savez(spec["out"], W_enc=sae.encoder.weight.detach().T.numpy().copy(),
         b_enc=sae.encoder.bias.detach().numpy(), W_dec=sae.W_dec.detach().numpy(),
         b_dec=sae.b_dec.detach().numpy())
print(json.dumps({"tokens_per_s": steady, "cpu_s": cpu, "lr": lr,
                  "versions": f"sparsify {sparsify.__version__}, torch {torch.__version__}, "
                              f"{torch.get_num_threads()} threads"}))
"""


@dataclass
class Trained:
    """A trained SAE and how fast it trained."""

    sae: InferenceSAE
    tokens_per_s: float
    cpu_s: float


def planted_config(args: argparse.Namespace, n_tokens: int) -> PlantedConfig:
    """Real-activation-like planted data for ``args.features`` latents."""
    # Offset norm = the signal's RMS norm: E||sum_i a_i d_i||^2 = mean_active * E[a^2], with
    # lognormal(0, 0.75) magnitudes (planted.py's heavy tail) E[a^2] = exp(2 * 0.75^2).
    signal_norm = math.sqrt(args.mean_active * math.exp(2 * 0.75**2))
    return PlantedConfig(
        d_model=args.d_model,
        n_features=2 * args.features,
        n_tokens=n_tokens,
        mean_active=args.mean_active,
        offset_scale=round(signal_norm, 3),
        frequency_exponent=args.frequency_exponent,
        heavy_tail=True,
        noise_std=args.noise,
        seed=args.seed,
    )


def ensure_dataset(cfg: PlantedConfig) -> str:
    """The planted dataset of ``cfg`` under the cache (written on first use)."""
    digest = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]
    url = str(CACHE / "planted-quality" / digest)
    t = time.perf_counter()
    write_planted_dataset(url, cfg)  # idempotent: returns at once when already written
    if time.perf_counter() - t > 5:
        print(f"wrote {cfg.n_tokens} planted rows to {url} in {time.perf_counter() - t:.0f} s")
    return url


def train_ours(data_url: str, args, budget: int, overrides: list[str], out_dir: str) -> Trained:
    """Our trainer at its defaults (plus ``overrides``) for ``budget`` tokens."""
    base = {
        "data": {"path": data_url},
        "sae": {"architecture": "topk", "n_features": args.features, "k": args.k},
        "train": {"batch_size": args.batch, "steps": budget // args.batch, "log_every": 8},
        "mesh": {"data": 1, "model": 1},
        "checkpoint": {"every_steps": 1 << 30, "async_save": False},
        "tracker": {"wandb_mode": "disabled"},
        "run": {"output_dir": out_dir, "name": "ours"},
    }
    data = apply_overrides(base, overrides)
    architecture = registered_architectures().get(data["sae"]["architecture"])
    if architecture is not None and "k" not in architecture.config_cls.model_fields:
        # An override to an architecture without k (JumpReLU, ReLU-L1) drops the bench's k.
        data["sae"].pop("k")
    config = validate(TrainConfig, data, "bench config")
    cpu0 = time.process_time()
    result = train_main(config)
    cpu = time.process_time() - cpu0
    if result.preempted:
        # A SIGTERM/SIGINT checkpoints and stops the run early: scoring it would report a
        # partly trained SAE under the full budget.
        raise SystemExit(f"{result.run_dir}: stopped at step {result.steps} (preempted); no row")
    # Each metrics row covers log_every steps; skip the first (it includes compilation).
    rows = [r for r in read_metrics(result.run_dir) if "tokens_per_s" in r][1:]
    tokens = sum(args.batch * config.train.log_every for _ in rows)
    seconds = sum(args.batch * config.train.log_every / r["tokens_per_s"] for r in rows)
    return Trained(load_sae(result.run_dir), tokens / seconds if rows else math.nan, cpu)


def sparsify_python() -> str:
    """An interpreter with sparsify (``DICTLEARN_SPARSIFY_PYTHON``, or a venv made on first use)."""
    return peer_python(
        "sparsify", "sparsify", "eai-sparsify", SPARSIFY_VERSION, "DICTLEARN_SPARSIFY_PYTHON"
    )


def train_sparsify(data_url: str, args, budget: int, out_dir: str) -> tuple[Trained, str]:
    """sparsify's defaults on the first ``budget`` rows of the dataset; also its versions."""
    dataset = ActivationDataset.open(data_url)
    shards, rows = [], 0
    for i in range(dataset.num_shards):
        if rows >= budget:
            break
        shards.append(dataset.shard_url(i))
        rows += dataset.shard_n_tokens(i)
    return run_sparsify(shards, dataset.d_model, args, budget, out_dir)


def run_sparsify(
    shards: list[str], d_model: int, args, budget: int, out_dir: str
) -> tuple[Trained, str]:
    """sparsify's defaults on the first ``budget`` rows of ``shards`` (raw float32 row files,
    read in order) at ``args.features`` latents, ``args.k``, ``args.batch``; also its versions."""
    out = f"{out_dir}/sparsify.npz"
    spec = {
        "shards": shards,
        "d_model": d_model,
        "batch": args.batch,
        "steps": budget // args.batch,
        "n_latents": args.features,
        "k": args.k,
        "seed": args.seed,
        "out": out,
    }
    done = subprocess.run(
        [sparsify_python(), "-c", _SPARSIFY_SCRIPT, json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"sparsify failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    w = np.load(out)
    sae = InferenceSAE("topk", w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k=args.k)
    return Trained(sae, report["tokens_per_s"], report["cpu_s"]), report["versions"]


@partial(jax.jit, static_argnames="k")
def _chunk_stats(w_enc, b_enc, w_dec, b_dec, x, k: int):
    """Squared error, active count and per-latent firing counts of a TopK SAE on rows ``x``."""
    values, indices = jax.lax.top_k((x - b_dec) @ w_enc + b_enc, k)
    values = jax.nn.relu(values)
    x_hat = jnp.einsum("nk,nkd->nd", values, w_dec[indices]) + b_dec
    fires = jnp.zeros(w_enc.shape[1], jnp.int32).at[indices].add((values > 0).astype(jnp.int32))
    return jnp.sum((x - x_hat) ** 2), jnp.sum(values > 0), fires


@jax.jit
def _cosine_block(rows, truth):
    """Best cosine of each row with ``truth``, and of each truth with these rows."""
    cos = rows @ truth.T
    return cos.max(axis=1), cos.max(axis=0)


def alignment(decoder: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean best cosine of decoder rows with the truth, of true directions with the rows)."""

    def unit(a):
        a = jnp.asarray(a, jnp.float32)
        return a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    rows, true = unit(decoder), unit(truth)
    learned_best, true_best = [], jnp.full(true.shape[0], -jnp.inf)
    for i in range(0, rows.shape[0], _COSINE_BLOCK):
        row_max, col_max = _cosine_block(rows[i : i + _COSINE_BLOCK], true)
        learned_best.append(row_max)
        true_best = jnp.maximum(true_best, col_max)
    return float(jnp.concatenate(learned_best).mean()), float(true_best.mean())


@jax.jit
def _chunk_stats_dense(sae: SAEParams, x):
    """``_chunk_stats`` for any activation rule, through the export's own encode and decode."""
    latents = sae.encode(x)
    x_hat = sae.decode(latents)
    return jnp.sum((x - x_hat) ** 2), jnp.sum(latents > 0), jnp.sum(latents > 0, axis=0)


RARE_FREQUENCY = 1e-4
"""A live latent active on fewer than this fraction of the held-out rows counts as rare."""


def reconstruction_scores(sae: InferenceSAE, x: np.ndarray) -> dict[str, float]:
    """Held-out FVE, L0, dead fraction (active on no row of ``x``) and rare fraction (active,
    but on fewer than ``RARE_FREQUENCY`` of the rows) of an exported SAE (TopK, or a JumpReLU /
    ReLU rule such as a BatchTopK run's export).

    Rare latents are what a dead count misses: on Gemma 3 270M at 1M tokens a JumpReLU run
    with 28 % of its latents dead had 46 % rare, TopK 0.6 % and 10 % (docs/real_quality.md).
    """
    weights = [jnp.asarray(a, jnp.float32) for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]

    def stats(rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if sae.architecture == "topk":
            return _chunk_stats(*weights, rows, k=sae.k)
        return _chunk_stats_dense(sae.params(), rows)

    return scores_from_chunks(stats, x, _SCORE_CHUNK)


def scores_from_chunks(
    stats: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]],
    x: np.ndarray,
    chunk: int,
    whole_chunks_only: bool = False,
) -> dict[str, float]:
    """FVE, L0, dead and rare fractions over ``x`` in chunks of ``chunk`` rows, from
    ``stats(rows)``: a chunk's squared error, active (row, latent) count and per-latent firing
    counts. ``whole_chunks_only`` leaves out a last, shorter chunk (a rule defined on whole
    batches).

    Shared by every inference rule scored on held-out rows (``reconstruction_scores``, and
    ``bench/batchtopk_rules.py``'s batch rule, whose chunks are training batches), so that
    they all count dead and rare latents the same way.
    """
    n = x.shape[0] // chunk * chunk if whole_chunks_only else x.shape[0]
    sq, active, fires = 0.0, 0, None
    for i in range(0, n, chunk):
        s, a, f = stats(jnp.asarray(x[i : i + chunk]))
        f = np.asarray(f, np.int64)
        sq, active, fires = sq + float(s), active + int(a), f if fires is None else fires + f
    total = float(np.sum((x[:n] - x[:n].mean(axis=0)) ** 2))
    rare = (fires > 0) & (fires < RARE_FREQUENCY * n)
    return {
        "fve": 1 - sq / total,
        "l0": active / n,
        "dead": float(np.mean(fires == 0)),
        "rare": float(np.mean(rare)),
    }


def score(sae: InferenceSAE, x: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Held-out FVE, L0, dead fraction and both alignments of a TopK SAE."""
    to_true, from_true = alignment(sae.W_dec, truth)
    return reconstruction_scores(sae, x) | {
        "learned_to_true": to_true,
        "true_to_learned": from_true,
    }


def _row(name: str, budget: int, m: dict[str, float]) -> str:
    return (
        f"{name:<22} {budget:>9} {m.get('fve', math.nan):>7.4f} {m.get('l0', math.nan):>6.1f} "
        f"{100 * m.get('dead', math.nan):>6.2f}% {m['learned_to_true']:>8.4f} "
        f"{m['true_to_learned']:>8.4f} {m.get('tokens_per_s', math.nan):>8.0f} "
        f"{m.get('tokens_per_cpu_s', math.nan):>8.0f}"
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both quality benchmarks share: which runs to make, where rows go."""
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='"NAME key=value ...": also train ours with these dotted overrides',
    )
    parser.add_argument("--no-defaults", action="store_true", help="skip ours at defaults")
    parser.add_argument("--no-sparsify", action="store_true")
    parser.add_argument("--results", help="append every row as JSON to this file")


def requested_runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(name, dotted overrides)`` of each of our runs the options of ``add_run_arguments``
    ask for: the defaults (unless ``--no-defaults``), then each ``--variant``."""
    runs = [] if args.no_defaults else [("ours (defaults)", [])]
    return runs + [(v.split()[0], v.split()[1:]) for v in args.variant]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[262_144, 1_048_576, 4_194_304])
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=640, help="Gemma 3 270M's width")
    parser.add_argument("--mean-active", type=float, default=32)
    parser.add_argument("--frequency-exponent", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--heldout", type=int, default=32768, help="held-out rows scored")
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # one table line per run, not progress bars

    cfg = planted_config(args, max(args.budgets))
    data_url = ensure_dataset(cfg)
    truth = np.load(f"{data_url}/truth.npy")
    x = heldout_rows(cfg, args.heldout)
    runs = requested_runs(args)

    print(
        f"planted: d_model {cfg.d_model}, {cfg.n_features} true directions, mean active "
        f"{cfg.mean_active:g}, Zipf {cfg.frequency_exponent:g}, offset norm {cfg.offset_scale:g}, "
        f"noise {cfg.noise_std:g}; SAE: {args.features} latents, k {args.k}, batch {args.batch}; "
        f"{args.heldout} held-out rows; jax {jax.__version__} on {jax.devices()[0].device_kind}"
    )
    header = (
        f"{'run':<22} {'tokens':>9} {'FVE':>7} {'L0':>6} {'dead':>7} {'lrn->tru':>8} "
        f"{'tru->lrn':>8} {'tok/s':>8} {'tok/cpu-s':>8}"
    )
    print(header + "\n" + "-" * len(header))
    rng = np.random.default_rng(args.seed)
    floor = alignment(rng.standard_normal((args.features, args.d_model)), truth)
    print(_row("random unit rows", 0, {"learned_to_true": floor[0], "true_to_learned": floor[1]}))
    results = []
    for budget in args.budgets:
        for name, overrides in runs:
            with tempfile.TemporaryDirectory() as tmp:
                trained = train_ours(data_url, args, budget, overrides, tmp)
            results.append((name, budget, trained, " ".join(overrides)))
            _report(results[-1], x, truth, args)
        if not args.no_sparsify:
            with tempfile.TemporaryDirectory() as tmp:
                trained, versions = train_sparsify(data_url, args, budget, tmp)
            results.append(("sparsify (defaults)", budget, trained, versions))
            _report(results[-1], x, truth, args)


def _report(entry, x: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> None:
    name, budget, trained, note = entry
    metrics = score(trained.sae, x, truth) | {
        "tokens_per_s": trained.tokens_per_s,
        "tokens_per_cpu_s": budget / trained.cpu_s,
    }
    print(_row(name, budget, metrics) + (f"  [{note}]" if note else ""), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps({"run": name, "tokens": budget, "note": note} | metrics) + "\n")


if __name__ == "__main__":
    main()
