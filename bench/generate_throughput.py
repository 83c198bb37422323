"""Forward throughput to layer L: our JAX Gemma 3 270M next to transformers (torch CPU).

    .venv/bin/python bench/generate_throughput.py --torch-python /tmp/refenv/bin/python

Both sides run the same batch (``--batch`` x ``--seq`` real-text tokens, BOS first) in float32 up
to and including block ``--layer`` and stop there: ours by hooking ``resid_post.L`` (the forward
computes no later block), transformers by a forward hook on block L that raises. transformers
is not a project dependency, so its half runs in ``--torch-python`` (a Python with ``torch`` and
``transformers``, e.g. the reference venv of tools/make_gemma_goldens.py) as a subprocess of this
script; it needs neither jax nor dictlearn. Without ``--torch-python`` only the JAX row is
printed. Machines are shared, so the table reports tokens per CPU-second next to wall-clock
tokens/s; the ratio uses wall-clock.

``--generate-tokens N`` adds end-to-end ``dictlearn generate`` rows: the same config (N tokens
of ``builtin:python-stdlib``, ``--seq``-token contexts, ``--batch`` per forward, to
``resid_post.L``, bfloat16 output) with 1 and with 2 Ray workers, each into a fresh output
directory, on one local Ray cluster started beforehand (its start-up is printed, not counted).
Their seconds include starting the workers and loading the model in each, corpus reading,
tokenization, the forward passes, writing the shards and committing the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _time(fn, reps: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of ``fn()`` over ``reps`` runs."""
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def bench_torch(gguf: Path, tokens: np.ndarray, layer: int, reps: int) -> dict[str, float]:
    """transformers' Gemma3ForCausalLM from the same GGUF, fp32, stopped after block ``layer``."""
    import torch
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

    def run():
        with torch.inference_mode(), contextlib.suppress(Stop):
            model.model(input_ids=batch)

    run()  # warm-up
    wall, cpu = _time(run, reps)
    return {"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads()}


def bench_jax(gguf: Path, tokens: np.ndarray, layer: int, reps: int) -> dict[str, float]:
    """Our jitted forward to ``resid_post.layer``, fp32."""
    import jax
    import jax.numpy as jnp

    from dictlearn import lm

    params, config = lm.load_gguf(gguf, max_layer=layer)
    fwd = jax.jit(lm.forward, static_argnames=("config", "hooks"))
    batch = jnp.asarray(tokens)
    hooks = (f"resid_post.{layer}",)

    def run():
        jax.block_until_ready(fwd(params, config, batch, hooks=hooks))

    run()  # compile
    wall, cpu = _time(run, reps)
    return {"wall_s": wall, "cpu_s": cpu, "devices": jax.device_count()}


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
    parser.add_argument(
        "--generate-tokens",
        type=int,
        default=0,
        help="also time end-to-end `dictlearn generate` on this many tokens (1 and 2 workers)",
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

    gguf = args.gguf or lm.default_gguf_path()
    tokens = make_tokens(args.batch, args.seq)
    rows = {"jax (dictlearn)": bench_jax(gguf, tokens, args.layer, args.reps)}
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
    print(f"forward to resid_post.{args.layer}, batch {args.batch} x {args.seq} tokens, fp32")
    print(f"{'implementation':<22} {'ms/batch':>9} {'tokens/s':>10} {'tokens/CPU-s':>13}")
    for name, r in rows.items():
        print(
            f"{name:<22} {r['wall_s'] * 1e3:>9.1f} {n / r['wall_s']:>10.0f} {n / r['cpu_s']:>13.0f}"
        )
    if len(rows) == 2:
        jax_row, torch_row = rows.values()
        print(f"speed-up (wall): {torch_row['wall_s'] / jax_row['wall_s']:.2f}x")
    if args.generate_tokens:
        gen = bench_generate(args.generate_tokens, args.layer, args.batch, args.seq)
        print(f"end-to-end generate, {args.generate_tokens} tokens, bf16 shards")
        print(f"{'run':<22} {'seconds':>9} {'tokens/s':>10} {'tokens/CPU-s':>13}")
        for name, r in gen.items():
            print(
                f"{name:<22} {r['wall_s']:>9.1f} {r['tokens'] / r['wall_s']:>10.0f} "
                f"{r['tokens'] / r['worker_cpu_s']:>13.0f}"
            )
        print("(tokens/CPU-s: the workers' CPU time on shards, model loading excluded)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
