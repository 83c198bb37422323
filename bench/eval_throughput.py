"""Spliced evaluation throughput next to the plain LM forward on the same tokens.

    uv run --frozen python bench/eval_throughput.py                       # Gemma 3 270M, CPU
    python bench/eval_throughput.py --weights random --contexts 64 --context-length 1024  # a GPU

Three jitted programs over the same ``[B, T]`` token batches of Gemma 3 270M:

1. **plain**: the full model and the next-token cross-entropy (the reference; what any loss
   evaluation of the LM costs);
2. **spliced**: the same with the SAE's reconstruction spliced in at its hook (the SAE's
   encode + decode on every position): the issue's target is <= 1.3x the plain time;
3. **eval**: what ``dictlearn eval`` runs per batch: clean, spliced, zero- and mean-ablated
   passes, KL and the SAE statistics (four forwards, so ~4x plain by construction).

``--weights random`` uses random weights of the real shapes (no GGUF needed; time does not
depend on the values), for accelerator hosts without the weights package. The SAE is a random
TopK of ``--features`` latents. Each time is the best of ``--repeats`` after a compile run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import lm
from dictlearn.export.model import InferenceSAE
from dictlearn.inspect.edits import _splice
from dictlearn.inspect.evaluate import _ce_and_kl, _eval_batch


def _plain(params, config, tokens):
    hidden = lm.final_hidden(params, config, tokens)
    return _ce(params, config, hidden, tokens)


def _spliced(params, config, hook, sae, tokens):
    keep = tokens != config.bos_id
    edit = jax.tree_util.Partial(_splice, sae, keep)
    hidden = lm.final_hidden(params, config, tokens, edits={hook: edit})
    return _ce(params, config, hidden, tokens)


def _ce(params, config, hidden, tokens):
    targets = tokens[:, 1:]
    return _ce_and_kl(params, {"clean": hidden[:, :-1]}, targets, targets != config.bos_id)


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", choices=("package", "random"), default="package")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--hook", default="resid_post.6")
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=4, help="Contexts per batch.")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    config = lm.get_config("gemma3-270m")
    if args.weights == "package":
        params, config = lm.load_gguf(dtype=dtype)
    else:
        params = lm.init_params(jax.random.key(0), config, dtype)
    rng = np.random.default_rng(0)
    d, f = config.d_model, args.features
    w_dec = rng.standard_normal((f, d)).astype(np.float32) / np.sqrt(d)
    sae = InferenceSAE(
        "topk", w_dec.T.copy(), np.zeros(f, np.float32), w_dec, np.zeros(d, np.float32), k=args.k
    ).params()
    tokens = rng.integers(3, config.vocab_size, (args.contexts, args.context_length))
    tokens[:, 0] = config.bos_id
    tokens = jnp.asarray(tokens, jnp.int32)
    n = tokens.size

    plain = jax.jit(_plain, static_argnames=("config",))
    spliced = jax.jit(_spliced, static_argnames=("config", "hook"))
    t_plain = _best(lambda: plain(params, config, tokens), args.repeats)
    t_spliced = _best(lambda: spliced(params, config, args.hook, sae, tokens), args.repeats)
    t_eval = _best(lambda: _eval_batch(params, config, args.hook, sae, tokens), args.repeats)

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s); Gemma 3 270M ({args.weights} weights, {args.dtype}), "
        f"hook {args.hook}, TopK SAE {f} latents k {args.k}; batch {args.contexts} x "
        f"{args.context_length} = {n} tokens; best of {args.repeats}"
    )
    print("| program | ms / batch | tokens/s | x plain |")
    print("|---|---|---|---|")
    for name, t in (
        ("plain LM + CE", t_plain),
        ("spliced LM + CE", t_spliced),
        ("dictlearn eval batch (4 passes)", t_eval),
    ):
        print(f"| {name} | {t * 1e3:,.1f} | {n / t:,.0f} | {t / t_plain:.2f}x |")


if __name__ == "__main__":
    main()
