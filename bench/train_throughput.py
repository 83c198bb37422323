"""Train-step throughput per architecture against the machine's own matmul rate.

    uv run python bench/train_throughput.py [--features 16384 65536] [--repeats 5]

For each architecture and width it times the full jitted train step (forward, backward, Adam,
decoder projection, dead-latent statistics) at d_model 640, k 32, batch 4096, and reports it as a
fraction of the *floor*: the time the encoder's forward matmul alone (2 * batch * d_model *
n_features FLOPs) takes at the dense matmul rate measured in the same run on the same shapes.
A TopK step at 100 % of the floor would cost nothing beyond that one unavoidable matmul.

The inputs are standard normal, so every pre-activation starts as N(0, 1). JumpReLU's threshold
starts where that leaves about ``k`` latents active per token (a trained model's sparsity, not the
half of all latents its default 0.001 gives); the ``l0`` column is the step's measured L0, and
``dense`` says whether a token overflowed the sparse bound so the step ran densely.
"""

from __future__ import annotations

import argparse
import time
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.sae import (
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUL1Config,
    TopKConfig,
    get_architecture,
)
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram
from sharding import MeshConfig, make_mesh
from sharding.host_memory import reuse_freed_host_memory


def _time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_and_matmul_seconds(
    cfg, batch: int, d_model: int, repeats: int
) -> tuple[float, float, dict[str, float]]:
    """Best train-step time, best encoder-matmul time on the same shapes, the last metrics.

    The two are timed alternately, so background load on a shared machine hits both alike
    and their ratio stays meaningful even when absolute times do not.
    """
    mesh = make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
    arch = get_architecture(cfg, d_model)
    program = TrainProgram(arch, OptimizerConfig(), 1000, batch, mesh, 1.0)
    state = {"s": program.init(jax.random.key(0), jnp.zeros(d_model))}
    x = program.global_batch_array(np.random.default_rng(0).normal(size=(batch, d_model)))
    step = program.step_fn(any_dead=False)

    last: dict[str, float] = {}

    def run_step() -> None:
        state["s"], metrics = step(state["s"], x)
        last.update(jax.device_get(metrics))

    key = jax.random.key(1)
    xm = jax.random.normal(key, (batch, d_model), jnp.float32)
    wm = jax.random.normal(key, (d_model, cfg.n_features), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)

    def run_matmul() -> None:
        matmul(xm, wm).block_until_ready()

    run_step(), run_matmul()  # compile and warm up
    steps, matmuls = [], []
    for _ in range(repeats):
        matmuls.append(_time_once(run_matmul))
        steps.append(_time_once(run_step))
    return min(steps), min(matmuls), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "jumprelu", "relu_l1"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # As every dictlearn process does (launch/cli.py); it serves the step and the reference
    # matmul alike. DICTLEARN_KEEP_MALLOC=1 measures with glibc's default instead.
    allocator = "reuse freed (mallopt)" if reuse_freed_host_memory() else "glibc default"
    b, d = args.batch, args.d_model
    configs = {
        "topk": lambda f: TopKConfig(n_features=f, k=args.k),
        "batchtopk": lambda f: BatchTopKConfig(n_features=f, k=args.k),
        "jumprelu": lambda f: JumpReLUConfig(
            n_features=f, init_threshold=NormalDist().inv_cdf(1 - args.k / f)
        ),
        "relu_l1": lambda f: ReLUL1Config(n_features=f),
    }
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {b}, "
        f"d_model {d}, k {args.k}, float32, best of {args.repeats}, host allocator: {allocator}"
    )
    header = (
        f"{'arch':<10} {'features':>9} {'step ms':>9} {'tokens/s':>10} "
        f"{'matmul ms':>9} {'GFLOP/s':>8} {'% of floor':>10} {'l0':>7} {'dense':>5}"
    )
    print(header)
    print("-" * len(header))
    for f in args.features:
        for name in args.archs:
            t, mm, metrics = step_and_matmul_seconds(configs[name](f), b, d, args.repeats)
            gflops = 2 * b * d * f / mm / 1e9
            print(
                f"{name:<10} {f:>9} {t * 1e3:>9.2f} {b / t:>10.0f} {mm * 1e3:>9.2f} {gflops:>8.1f} "
                f"{100 * mm / t:>9.1f}% {float(metrics['l0']):>7.1f} "
                f"{'yes' if metrics.get('dense_fallback', 0) else 'no':>5}",
                flush=True,
            )


if __name__ == "__main__":
    main()
