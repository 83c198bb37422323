"""Train-step throughput per architecture against the machine's own matmul rate.

    uv run python bench/train_throughput.py [--features 16384 65536] [--repeats 5]

For each architecture and width it times the full jitted train step (forward, backward, Adam,
decoder projection, dead-latent statistics) at d_model 640, k 32, batch 4096, and reports it as a
fraction of the *floor* (in wall and in CPU seconds): the time the encoder's forward matmul alone (2 * batch * d_model *
n_features FLOPs) takes at the dense matmul rate measured in the same run on the same shapes.
A TopK step at 100 % of the floor would cost nothing beyond that one unavoidable matmul.

The inputs are standard normal, so every pre-activation starts as N(0, 1). JumpReLU's threshold
starts where that leaves about ``k`` latents active per token (a trained model's sparsity, not the
half of all latents its default 0.001 gives); the ``l0`` column is the step's measured L0, and
``dense`` says whether a token overflowed the sparse bound so the step ran densely.

ReLU-L1 starts with half its latents active, so it runs densely (``relu_l1``; ``relu_l1_dense``
never tries the sparse path, showing what the failed attempt costs). ``relu_l1_sparse`` and
``relu_l1_sparse_dense`` start from a b_enc that leaves about ``k`` latents active, as training
does eventually, with and without the sparse path.
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


def _time_once(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def step_and_matmul_seconds(
    cfg, batch: int, d_model: int, repeats: int, b_enc: float | None = None
) -> tuple[tuple[float, float], tuple[float, float], dict[str, float]]:
    """Best train-step and best encoder-matmul (wall, CPU) seconds, and the last metrics.

    The two are timed alternately, so background load on a shared machine hits both alike
    and their ratio stays meaningful even when absolute times do not; CPU seconds are the
    steadier measure when other processes compete for the cores.
    """
    mesh = make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
    arch = get_architecture(cfg, d_model)
    program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 1000, batch, mesh, 1.0)
    init = program.init(jax.random.key(0), jnp.zeros(d_model))
    if b_enc is not None:  # a trained model's sparsity (see the module docstring)
        params = init.params | {"b_enc": jnp.full_like(init.params["b_enc"], b_enc)}
        init = init._replace(params=jax.device_put(params, program.param_shardings))
    state = {"s": init}
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
    return (
        (min(t for t, _ in steps), min(c for _, c in steps)),
        (min(t for t, _ in matmuls), min(c for _, c in matmuls)),
        last,
    )


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
        "relu_l1_dense": lambda f: ReLUL1Config(n_features=f, sparse_l0_bound=0),
        "relu_l1_sparse": lambda f: ReLUL1Config(n_features=f),
        "relu_l1_sparse_dense": lambda f: ReLUL1Config(n_features=f, sparse_l0_bound=0),
    }

    def b_enc(name: str, f: int) -> float | None:
        # ReLU-L1's pre-activations start as N(0, decoder_init_norm^2): this leaves ~k active.
        if not name.startswith("relu_l1_sparse"):
            return None
        return -ReLUL1Config(n_features=f).decoder_init_norm * NormalDist().inv_cdf(1 - args.k / f)

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {b}, "
        f"d_model {d}, k {args.k}, float32, best of {args.repeats}, host allocator: {allocator}"
    )
    header = (
        f"{'arch':<20} {'features':>9} {'step ms':>9} {'tokens/s':>10} "
        f"{'matmul ms':>9} {'GFLOP/s':>8} {'% of floor':>10} {'(CPU s)':>8} {'l0':>7} {'dense':>5}"
    )
    print(header)
    print("-" * len(header))
    for f in args.features:
        for name in args.archs:
            (t, t_cpu), (mm, mm_cpu), metrics = step_and_matmul_seconds(
                configs[name](f), b, d, args.repeats, b_enc(name, f)
            )
            gflops = 2 * b * d * f / mm / 1e9
            print(
                f"{name:<20} {f:>9} {t * 1e3:>9.2f} {b / t:>10.0f} {mm * 1e3:>9.2f} {gflops:>8.1f} "
                f"{100 * mm / t:>9.1f}% {100 * mm_cpu / t_cpu:>7.1f}% {float(metrics['l0']):>7.1f} "
                f"{'yes' if metrics.get('dense_fallback', 0) else 'no':>5}",
                flush=True,
            )


if __name__ == "__main__":
    main()
