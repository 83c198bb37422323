"""Forward throughput to layer L against its FLOP floor: our JAX Gemma 3 270M and transformers.

    uv run --frozen python bench/generate_throughput.py --torch-python /tmp/refenv/bin/python \
        --generate-tokens 65536

Both sides run the same batch (``--batch`` x ``--seq`` real-text tokens, BOS first) in float32 up
to and including block ``--layer`` and stop there: ours by hooking ``resid_post.L`` (the forward
computes no later block), transformers by a forward hook on block L that raises. transformers
is not a project dependency, so its half runs in ``--torch-python`` (a Python with ``torch``,
``transformers``, ``accelerate`` and ``gguf``, e.g. the reference venv of
tools/make_gemma_goldens.py) as a subprocess of this script; it needs neither jax nor dictlearn.
Without ``--torch-python`` only the JAX row is printed.

The *floor* is the time the model's matmuls to layer L take at the machine's dense matmul rate:
the projections (q, k, v, o), the three MLP matmuls and the causal attention products (scores
and values over the keys each query may see), ``forward_flops`` below, divided by the best fp32
rate measured in this run on the model's largest matmul shape (``[batch*seq, d_model] x
[d_model, ffn]``), by each library in its own process and timed alternately with its forward so
that load on a shared machine hits both alike. ``x floor`` is time / floor (1.00 = nothing but
the matmuls at the dense rate); ``x own floor`` uses the rate of the row's own library, timed
alternately with it, which is the steadier ratio when load changes between the two processes.
Norms, RoPE, softmax and the embedding gather are not counted.
Times are the best of ``--reps``; tokens per CPU-second (the median) shows what machine sharing
does not skew.

``--generate-tokens N`` adds end-to-end ``dictlearn generate`` rows: the same config (N tokens
of ``builtin:python-stdlib``, ``--seq``-token contexts, ``--batch`` per forward, to
``resid_post.L``, bfloat16 output) with 1 and with 2 Ray workers, each into a fresh output
directory, on one local Ray cluster started beforehand (its start-up is printed, not counted).
Their seconds include starting the workers and loading the model in each, corpus reading,
tokenization, the forward passes, writing the shards and committing the manifest; ``start s``
is the part until every worker had loaded the model (dequantized GGUF tensors are cached
on disk, see ``dictlearn.lm.weights``: the first run on a machine pays the dequantization,
later ones read the cache), ``after start`` is the run's tokens/s from then on, and ``vs
forward`` divides the run's tokens/s (and tokens per worker CPU-second) by the bare JAX
forward's above, ``vs sustained`` the after-start rate by the forward's sustained rate
(``--sustained`` forwards back to back, each dispatched before the previous one is waited for, as
a worker runs them; a best-of figure is a few per cent above what a machine sustains).

On an accelerator host without the weights package (``docs/gpu.md``): ``--weights random
--model 1b --dtype bfloat16`` runs a preset's real shapes with random weights on random token
ids (time does not depend on the values), the floor's matmul rate in that dtype; ``--mfu``
adds the model FLOP utilisation: achieved matmul FLOP/s over the dense rate of an
8192 x 8192 x 8192 matmul in the same dtype measured in this run, and over ``--peak-tflops``
(the chip's data-sheet rate) when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _best_alternating(fns: dict[str, object], reps: int) -> dict[str, tuple[float, float]]:
    """Best wall seconds and median process CPU seconds of each ``fn()``, run in turn ``reps`` times.

    Alternating the functions (rather than timing one ``reps`` times, then the next) lets load on
    a shared machine hit them alike, so their ratio holds even when absolute times do not.
    """
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
    return {name: (min(walls[name]), statistics.median(cpus[name])) for name in fns}


def forward_flops(config, layer: int, batch: int, seq: int) -> float:
    """Matmul FLOPs of a Gemma 3 forward through blocks ``0..layer`` (2 per multiply-add).

    Per block and token: the q/k/v/o projections and the GeGLU MLP's gate, up and down matmuls;
    per block: the attention scores and the value mix over the keys each query may see (causal;
    a local layer's query sees at most ``sliding_window`` of them).
    """
    d, hd, ffn = config.d_model, config.head_dim, config.ffn_dim
    q_heads, kv_heads = config.n_heads, config.n_kv_heads
    per_token = 2 * d * (q_heads + 2 * kv_heads) * hd + 2 * q_heads * hd * d + 3 * 2 * d * ffn
    total = 0.0
    for i in range(layer + 1):
        window = seq if config.is_global(i) else config.sliding_window
        keys = sum(min(q + 1, window) for q in range(seq))
        total += seq * per_token + 2 * 2 * q_heads * hd * keys
    return batch * total


def _threads() -> int:
    """CPU cores this process may run on (what XLA sizes its CPU thread pool to)."""
    return len(os.sched_getaffinity(0))


def bench_torch(gguf: Path, tokens: np.ndarray, layer: int, reps: int) -> dict:
    """transformers' Gemma3ForCausalLM from the same GGUF, fp32, stopped after block ``layer``,
    alternating with torch's own matmul on the model's largest matmul shape."""
    import torch
    import transformers
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()

    class Stop(Exception):
        pass

    def stop(_module, _inputs, _output):
        raise Stop

    model.model.layers[layer].register_forward_hook(stop)
    batch = torch.from_numpy(tokens.astype(np.int64))
    hf = model.config
    a = torch.randn(tokens.size, hf.hidden_size)
    b = torch.randn(hf.hidden_size, hf.intermediate_size)

    def run():
        with torch.inference_mode(), contextlib.suppress(Stop):
            model.model(input_ids=batch)

    def matmul():
        with torch.inference_mode():
            torch.matmul(a, b)

    run(), matmul()  # warm-up
    times = _best_alternating({"forward": run, "matmul": matmul}, reps)
    return {
        "wall_s": times["forward"][0],
        "cpu_s": times["forward"][1],
        "matmul_s": times["matmul"][0],
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} "
        "inter-op",
    }


def bench_jax(
    gguf: Path | None,
    tokens: np.ndarray,
    layer: int,
    reps: int,
    model: str = "270m",
    dtype: str = "float32",
    sustained: int = 0,
) -> dict:
    """Our jitted forward to ``resid_post.layer`` in ``dtype``, alternating with a jitted matmul
    on the model's largest matmul shape; ``gguf`` None: random weights of preset ``model``.
    ``sustained`` > 0 also times that many forwards back to back, each dispatched before the
    previous one is waited for (as a generate worker runs them): ``sustained_s`` per batch."""
    import jax
    import jax.numpy as jnp

    from dictlearn import lm

    jdtype = jnp.dtype(dtype)
    if gguf is None:
        config = lm.get_config(model)
        # Drawn on the host's CPU backend and then moved: XLA's GPU compile of the one jitted
        # draw-and-slice program took over 200 s for the 1B preset on an H200. Under
        # JAX_PLATFORMS=cuda there is no CPU backend; then they are drawn where they run.
        try:
            draw_on = jax.devices("cpu")[0]
        except RuntimeError:
            draw_on = jax.devices()[0]
        with jax.default_device(draw_on):
            params = lm.init_params(jax.random.key(0), config, jdtype)
        params = jax.device_put(params, jax.devices()[0])
    else:
        params, config = lm.load_gguf(gguf, max_layer=layer, dtype=jdtype)
    fwd = jax.jit(lm.forward, static_argnames=("config", "hooks"))
    batch = jnp.asarray(tokens)
    hooks = (f"resid_post.{layer}",)
    key = jax.random.key(0)
    a = jax.random.normal(key, (tokens.size, config.d_model), jdtype)
    b = jax.random.normal(key, (config.d_model, config.ffn_dim), jdtype)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))

    def run():
        jax.block_until_ready(fwd(params, config, batch, hooks=hooks))

    def matmul():
        mm(a, b).block_until_ready()

    run(), matmul()  # compile
    times = _best_alternating({"forward": run, "matmul": matmul}, reps)
    sustained_s = float("nan")
    if sustained:
        start = time.perf_counter()
        previous = fwd(params, config, batch, hooks=hooks)
        for _ in range(sustained - 1):
            current = fwd(params, config, batch, hooks=hooks)
            jax.block_until_ready(previous)
            previous = current
        jax.block_until_ready(previous)
        sustained_s = (time.perf_counter() - start) / sustained
    return {
        "sustained_s": sustained_s,
        "wall_s": times["forward"][0],
        "cpu_s": times["forward"][1],
        "matmul_s": times["matmul"][0],
        "versions": f"jax {jax.__version__}, {jax.devices()[0].platform} x{jax.device_count()}",
        "threads": f"{_threads()} (XLA CPU pool = cores)",
        "config": config,
    }


def dense_peak_flops(dtype: str, size: int = 8192, reps: int = 5) -> float:
    """Best FLOP/s of a jitted ``size``-cubed matmul in ``dtype`` (float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(2)
    a = jax.random.normal(key, (size, size), jnp.dtype(dtype))
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    mm(a, a).block_until_ready()
    best, _ = _best_alternating({"matmul": lambda: mm(a, a).block_until_ready()}, reps)["matmul"]
    return 2 * size**3 / best


def random_tokens(batch: int, seq: int, vocab_size: int, bos_id: int) -> np.ndarray:
    """``[batch, seq]`` uniform random token ids, BOS first (for random weights)."""
    tokens = np.random.default_rng(0).integers(3, vocab_size, (batch, seq), dtype=np.int32)
    tokens[:, 0] = bos_id
    return tokens


def make_tokens(batch: int, seq: int) -> np.ndarray:
    """``[batch, seq]`` tokens of the Python language reference, BOS first, rows disjoint."""
    import pydoc_data.topics

    from dictlearn import lm

    tok = lm.Tokenizer.from_gguf()
    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tok.encode(text, add_bos=False)
    step = seq - 1
    if len(ids) < batch * step:
        raise ValueError(f"need {batch * step} tokens of text, have {len(ids)}")
    rows = [[tok.bos_id, *ids[i * step : (i + 1) * step]] for i in range(batch)]
    return np.asarray(rows, dtype=np.int32)


def bench_generate(tokens: int, layer: int, batch: int, seq: int) -> dict[str, dict]:
    """End-to-end ``dictlearn.activations.main`` with 1 and 2 workers on one local Ray cluster."""
    from dictlearn.activations import GenerateConfig
    from dictlearn.activations import main as generate
    from dictlearn.config import validate
    from dictlearn.ray_cluster import local_ray_cluster

    rows: dict[str, dict] = {}
    t = time.perf_counter()
    with local_ray_cluster(num_cpus=2), tempfile.TemporaryDirectory() as tmp:
        ray_start = time.perf_counter() - t
        for workers in (1, 2):
            config = validate(
                GenerateConfig,
                {
                    "hooks": [f"resid_post.{layer}"],
                    "corpus": {"paths": ["builtin:python-stdlib"], "n_shards": 8},
                    "context_length": seq,
                    "batch_size": batch,
                    "max_tokens": tokens,
                    "output": {"path": f"{tmp}/w{workers}", "dtype": "bfloat16"},
                    "ray": {"num_workers": workers, "max_in_flight": 2},
                },
            )
            result = generate(config)
            rows[f"generate, {workers} worker{'s' if workers > 1 else ''}"] = {
                "wall_s": result.seconds,
                "start_s": result.worker_start_s,
                "tokens": result.lm_tokens,
                "worker_cpu_s": result.worker_cpu_s,
            }
    print(f"(local Ray cluster start-up: {ray_start:.1f} s, not counted below)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=6, help="last block run (0-based)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--torch-python", help="a Python with torch + transformers")
    parser.add_argument("--gguf", type=Path, help="default: the Gemma 3 270M package's file")
    parser.add_argument("--weights", choices=("package", "random"), default="package")
    parser.add_argument("--model", default="270m", help="preset for --weights random")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mfu", action="store_true", help="also report MFU (docstring)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's data-sheet dense rate")
    parser.add_argument(
        "--generate-tokens",
        type=int,
        default=0,
        help="also time end-to-end `dictlearn generate` on this many tokens (1 and 2 workers)",
    )
    parser.add_argument(
        "--sustained",
        type=int,
        default=60,
        help="forwards timed back to back for the sustained rate (with --generate-tokens)",
    )
    # Internal: the transformers half, run in --torch-python.
    parser.add_argument("--torch-only", nargs=2, metavar=("TOKENS_NPY", "OUT_JSON"))
    args = parser.parse_args()

    if args.torch_only:
        tokens = np.load(args.torch_only[0])
        result = bench_torch(args.gguf, tokens, args.layer, args.reps)
        Path(args.torch_only[1]).write_text(json.dumps(result))
        return

    from dictlearn import lm

    if args.weights == "random":
        if args.torch_python or args.generate_tokens:
            parser.error("--weights random times our forward alone (no transformers, no generate)")
        gguf = None
        preset = lm.get_config(args.model)
        tokens = random_tokens(args.batch, args.seq, preset.vocab_size, preset.bos_id)
    else:
        gguf = args.gguf or lm.default_gguf_path()
        tokens = make_tokens(args.batch, args.seq)
    jax_row = bench_jax(
        gguf,
        tokens,
        args.layer,
        args.reps,
        args.model,
        args.dtype,
        sustained=args.sustained if args.generate_tokens else 0,
    )
    rows = {"jax (dictlearn)": jax_row}
    if args.torch_python:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "tokens.npy", tokens)
            out = Path(tmp) / "torch.json"
            cmd = [args.torch_python, __file__, "--torch-only", str(Path(tmp) / "tokens.npy")]
            cmd += [str(out), "--gguf", str(gguf), "--layer", str(args.layer)]
            cmd += ["--reps", str(args.reps)]
            subprocess.run(cmd, check=True)
            rows["torch (transformers)"] = json.loads(out.read_text())

    n = tokens.size
    config = jax_row["config"]
    flops = forward_flops(config, args.layer, args.batch, args.seq)
    mm_flops = 2 * n * config.d_model * config.ffn_dim
    rates = {name: mm_flops / r["matmul_s"] for name, r in rows.items()}
    best = max(rates, key=rates.get)
    floor_s = flops / rates[best]
    print(
        f"{config.name} ({args.weights} weights) forward to resid_post.{args.layer}, batch "
        f"{args.batch} x {args.seq} tokens, {args.dtype}, best of {args.reps}; "
        f"{flops / n / 1e6:.1f} MFLOP/token of matmuls"
    )
    for name, r in rows.items():
        print(f"  {name}: {r['versions']}; threads {r['threads']}")
    print(
        f"dense {args.dtype} matmul [{n}x{config.d_model}]x[{config.d_model}x{config.ffn_dim}]: "
        + ", ".join(f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in rates.items())
        + f"; floor = {flops / 1e9:.1f} GFLOP at {rates[best] / 1e9:.0f} GFLOP/s "
        f"({best}) = {floor_s * 1e3:.1f} ms"
    )
    header = (
        f"{'implementation':<22} {'ms/batch':>9} {'tokens/s':>10} {'tokens/CPU-s':>13} "
        f"{'GFLOP/s':>8} {'x floor':>8} {'x own floor':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<22} {r['wall_s'] * 1e3:>9.1f} {n / r['wall_s']:>10.0f} "
            f"{n / r['cpu_s']:>13.0f} {flops / r['wall_s'] / 1e9:>8.1f} "
            f"{r['wall_s'] / floor_s:>7.2f}x {r['wall_s'] * rates[name] / flops:>11.2f}x"
        )
    print(f"{'floor':<22} {floor_s * 1e3:>9.1f} {n / floor_s:>10.0f}")
    sustained_s = jax_row["sustained_s"]
    if sustained_s == sustained_s:  # not NaN
        print(
            f"{'jax, sustained':<22} {sustained_s * 1e3:>9.1f} {n / sustained_s:>10.0f} "
            f"{'':>13} {flops / sustained_s / 1e9:>8.1f} {sustained_s / floor_s:>7.2f}x  "
            f"({args.sustained} forwards back to back, pipelined as a generate worker runs them)"
        )
    if args.mfu:
        peak = dense_peak_flops(args.dtype)
        achieved = flops / jax_row["wall_s"]
        line = (
            f"MFU: {achieved / 1e12:.1f} TFLOP/s of model matmuls = {100 * achieved / peak:.1f} % "
            f"of this run's dense {args.dtype} 8192^3 matmul ({peak / 1e12:.1f} TFLOP/s)"
        )
        if args.peak_tflops:
            line += f", {100 * achieved / (args.peak_tflops * 1e12):.1f} % of {args.peak_tflops:g}"
            line += " TFLOP/s (data sheet)"
        print(line)
    if len(rows) == 2:
        jax_r, torch_r = rows.values()
        print(f"transformers / ours (wall): {torch_r['wall_s'] / jax_r['wall_s']:.2f}x")
    if args.generate_tokens:
        gen = bench_generate(args.generate_tokens, args.layer, args.batch, args.seq)
        fwd_tps, fwd_cpu_tps = n / jax_row["wall_s"], n / jax_row["cpu_s"]
        sustained_tps = n / sustained_s
        print(f"end-to-end generate, {args.generate_tokens} tokens, bf16 shards")
        header = (
            f"{'run':<22} {'seconds':>8} {'start s':>8} {'tokens/s':>9} {'vs forward':>10} "
            f"{'after start':>11} {'vs forward':>10} {'vs sustained':>12} {'tokens/CPU-s':>13} "
            f"{'vs forward':>10}"
        )
        print(header)
        print("-" * len(header))
        for name, r in gen.items():
            tps, cpu_tps = r["tokens"] / r["wall_s"], r["tokens"] / r["worker_cpu_s"]
            after_tps = r["tokens"] / (r["wall_s"] - r["start_s"])
            print(
                f"{name:<22} {r['wall_s']:>8.1f} {r['start_s']:>8.1f} {tps:>9.0f} "
                f"{tps / fwd_tps:>9.2f}x {after_tps:>11.0f} {after_tps / fwd_tps:>9.2f}x "
                f"{after_tps / sustained_tps:>11.2f}x {cpu_tps:>13.0f} "
                f"{cpu_tps / fwd_cpu_tps:>9.2f}x"
            )
        print(
            "(vs forward: / the bare JAX forward's best of --reps above; vs sustained: / its "
            "sustained rate; after start: tokens/s once every worker had loaded the model; "
            "tokens/CPU-s: the workers' CPU time on shards, model loading excluded)"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
