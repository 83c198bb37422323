"""Dashboard pass throughput next to the plain LM forward on the same tokens.

    uv run --frozen python bench/dashboard_throughput.py [--tokens 8192] [--context 128]

Both rows run the same ``--tokens`` tokens of the built-in corpus (Python docs + stdlib,
packed into ``--context``-token contexts, ``--batch`` per step) through Gemma 3 270M to
``--hook``: the first stops there (what ``dictlearn generate`` computes per batch, without
the host transfer); the second is the dashboard step of ``dictlearn dashboard`` (the same
forward, then the SAE's encoder over every latent, then the collector's update: per-feature
top-N contexts with their windows, the hashed quantile sample, the histogram and the firing
counts), one jitted call per batch with the state donated. The SAE is random TopK with
``--d-sae`` latents (the pipeline's default SAE is 4096 x k=32), unless ``--sae`` names one.
Compilation is excluded (one warm-up batch each); the two passes alternate ``--reps`` times and
the medians are printed, wall-clock and per process-CPU-second (machines are shared). Target:
the dashboard pass within 1.3x the forward's time.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import jax
import numpy as np

from dictlearn import lm
from dictlearn.corpus import (
    PYTHON_DOCS,
    PYTHON_STDLIB,
    CorpusConfig,
    iter_documents,
    pack_documents,
    plan_corpus_shards,
)
from dictlearn.export import InferenceSAE, load_sae
from dictlearn.inspect.dashboard import DashboardConfig, DashboardWorker, collector
from dictlearn.inspect.dashboard.run import collector_spec, worker_spec
from dictlearn.inspect.text import resolve_source_model


def random_sae(d_sae: int, k: int, hook: str, d_in: int = 640) -> InferenceSAE:
    """A random unit-norm TopK SAE on Gemma 3 270M's ``hook`` (speed does not depend on values)."""
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return InferenceSAE(
        architecture="topk",
        W_enc=w_dec.T.copy(),
        b_enc=np.zeros(d_sae, np.float32),
        W_dec=w_dec,
        b_dec=np.zeros(d_in, np.float32),
        k=k,
        metadata={"model_name": "gemma3-270m", "hook_name": hook},
    )


def main() -> None:
    """Run the benchmark and print its table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hook", default="resid_post.6")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sae", default=None, help="An SAE URL instead of the random one.")
    p.add_argument("--top-n", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    sae = load_sae(args.sae) if args.sae else random_sae(args.d_sae, args.k, args.hook)
    config = DashboardConfig(
        sae=args.sae or "random",
        out="unused",
        context_length=args.context,
        batch_size=args.batch,
        top_n=args.top_n,
    )
    model, hook = resolve_source_model(sae)
    features = np.arange(sae.d_sae)
    cspec = collector_spec(config, sae.d_sae)
    worker = DashboardWorker(worker_spec(config, model, hook.name), sae, features, cspec)

    (shard,) = plan_corpus_shards(CorpusConfig(paths=[PYTHON_DOCS, PYTHON_STDLIB], n_shards=1))
    contexts = itertools.islice(
        pack_documents(iter_documents(shard), worker.tokenizer, args.context),
        args.tokens // args.context,
    )
    tokens = np.stack(list(contexts))
    n_batches = len(tokens) // args.batch
    batches = [tokens[i * args.batch : (i + 1) * args.batch] for i in range(n_batches)]
    n_tokens = n_batches * args.batch * args.context

    forward = jax.jit(
        lambda params, t: lm.forward(params, model.config, t, hooks=(hook.name,))[hook.name]
    )

    def lm_pass() -> None:
        for batch in batches:
            forward(worker.params, batch).block_until_ready()

    def dashboard_pass() -> None:
        state = collector.init_state(cspec)
        for i, batch in enumerate(batches):
            ids = np.arange(i * args.batch, (i + 1) * args.batch)
            state = worker.dashboard_step(state, batch, ids)
            # Same synchronisation as the LM row: one batch at a time.
            jax.block_until_ready(state)

    # Warm-up (compilation) on one batch each.
    forward(worker.params, batches[0]).block_until_ready()
    jax.block_until_ready(
        worker.dashboard_step(collector.init_state(cspec), batches[0], np.arange(args.batch))
    )
    rows: dict[str, list[tuple[float, float]]] = {"lm": [], "dash": []}
    for _ in range(args.reps):
        for name, fn in (("lm", lm_pass), ("dash", dashboard_pass)):
            w, c = time.perf_counter(), time.process_time()
            fn()
            rows[name].append((time.perf_counter() - w, time.process_time() - c))
    wall = {k: statistics.median(w for w, _ in v) for k, v in rows.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}, "
        f"{len(jax.devices())} devices), python {platform.python_version()}"
    )
    print(
        f"{n_tokens} tokens ({n_batches} batches of {args.batch} x {args.context}) of the "
        f"built-in corpus, gemma3-270m to {hook.name}; SAE {sae.architecture} "
        f"d_sae={sae.d_sae}{f' k={sae.k}' if sae.k else ''}; top_n={args.top_n}, "
        f"n_samples={cspec.n_samples}, window={cspec.window_length}, "
        f"{cspec.hist_bins} histogram bins; median of {args.reps}"
    )
    print()
    print(f"| {'pass':<44} | {'tokens/s':>9} | {'tokens/CPU-s':>12} | {'time vs LM':>10} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 14}|{'-' * 12}|")
    for key, label in (
        ("lm", f"LM forward to {hook.name}"),
        ("dash", "dashboard pass (LM + SAE encode + collector)"),
    ):
        print(
            f"| {label:<44} | {n_tokens / wall[key]:>9,.0f} | {n_tokens / cpu[key]:>12,.0f} | "
            f"{wall[key] / wall['lm']:>9.2f}x |"
        )
    verdict = "meets" if wall["dash"] / wall["lm"] <= 1.3 else "misses"
    print(f"\ndashboard / LM time: {wall['dash'] / wall['lm']:.2f}x ({verdict} the 1.3x target)")


if __name__ == "__main__":
    main()
