"""Train-step throughput per architecture against the machine's own matmul rate.

    uv run python bench/train_throughput.py [--features 16384 65536] [--repeats 5]

For each architecture and width it times the full jitted train step (forward, backward, Adam,
decoder projection, dead-latent statistics) at d_model 640, k 32, batch 4096, and reports it as a
fraction of the *floor* (in wall and in CPU seconds): the time the encoder's forward matmul alone (2 * batch * d_model *
n_features FLOPs) takes at the dense matmul rate measured in the same run on the same shapes.
A TopK step at 100 % of the floor would cost nothing beyond that one unavoidable matmul.

No latent is dead in those rows, so AuxK (TopK's and BatchTopK's dead-latent loss) never runs;
in a real run it runs on nearly every step. ``--dead-latents 300 1000 3000`` adds TopK and
BatchTopK rows with that many latents dead before each step: ``auxk trainer`` is the trainer's
step (AuxK's compact variant while at most ``4 * k_aux`` latents are dead, its sparse one past
that), ``auxk sparse`` the step compiled with the sparse variant.

The inputs are standard normal, so every pre-activation starts as N(0, 1). JumpReLU's threshold
starts where that leaves about ``k`` latents active per token (a trained model's sparsity, not the
half of all latents its default 0.001 gives); the ``l0`` column is the step's measured L0, and
``dense`` says whether a token overflowed the sparse bound so the step ran densely.

ReLU-L1 starts with half its latents active, so it runs densely (``relu_l1``; ``relu_l1_dense``
never tries the sparse path, showing what the failed attempt costs). ``relu_l1_sparse`` and
``relu_l1_sparse_dense`` start from a b_enc that leaves about ``k`` latents active, as training
does eventually, with and without the sparse path.

On a GPU (``docs/gpu.md``), give each width the batch people train it with
(``--features 16384 65536 262144 1048576 --batches 4096 8192 16384 32768``).
``--encoder-dtypes float32 bfloat16`` also runs each step with ``sae.encoder_dtype: bfloat16``;
its floor is then the bf16 matmul (bf16 inputs, float32 accumulation), timed the same way.
float32 matmuls use JAX's default precision (TF32 tensor cores on NVIDIA GPUs from Ampere on),
for the step and the floor alike. ``--parts`` adds, per row, where the step's time goes, each
part timed alone as a jitted program on the same state: the selection (encoder matmul + top-k
or slot selection, chunked as in the step), the loss forward, the loss with its gradient, and
the optimizer update (Adam, decoder renormalisation) alone; ``opt %`` is the optimizer's share
of the whole step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dictlearn.sae import (
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUL1Config,
    TopKConfig,
    get_architecture,
    topk_select,
)
from dictlearn.sae import jumprelu as jumprelu_module
from dictlearn.sae import relu_l1 as relu_l1_module
from dictlearn.sae import topk as topk_module
from dictlearn.sae.base import renormalise_rows
from dictlearn.sae.jumprelu import candidate_rank_bias
from dictlearn.sae.topk import ENCODE_CHUNK_TOKENS, local_top_k_candidates
from dictlearn.sae.variable_l0 import select_slots
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram
from sharding import MeshConfig, make_mesh
from sharding.host_memory import reuse_freed_host_memory


def _time_once(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def _best_of(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall and best CPU seconds of each function, the functions called in turn.

    Alternating them lets background load on a shared machine hit all alike, so their ratios
    stay meaningful even when absolute times do not; CPU seconds are the steadier measure when
    other processes compete for the cores.
    """
    for fn in fns.values():  # compile and warm up
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn))
    return {
        name: (min(t for t, _ in runs), min(c for _, c in runs)) for name, runs in times.items()
    }


def _selection_fn(arch, program: TrainProgram) -> Callable:
    """The step's no-gradient selection pass alone (one device): chunked encoder matmul +
    top-k (TopK, BatchTopK) or slot selection (JumpReLU, ReLU-L1), as the loss runs it."""
    cfg = arch.config
    if isinstance(cfg, TopKConfig | BatchTopKConfig):
        k = cfg.k if isinstance(cfg, TopKConfig) else arch._candidates(cfg.n_features)
        return jax.jit(
            lambda p, x: local_top_k_candidates(
                p, x, [(k, p["b_enc"])], encoder_dtype=cfg.encoder_dtype
            )
        )
    bound = cfg.l0_bound if isinstance(cfg, JumpReLUConfig) else cfg.sparse_l0_bound
    bound = min(bound, cfg.n_features)
    if isinstance(cfg, JumpReLUConfig):

        def rank_bias(p):
            threshold = jnp.exp(p["log_threshold"])
            return candidate_rank_bias(p["b_enc"], threshold, cfg.bandwidth)

    else:

        def rank_bias(p):
            return p["b_enc"]

    return jax.jit(
        lambda p, x: select_slots(
            p, x, bound, rank_bias(p), jumprelu_module.ENCODE_CHUNK_TOKENS, cfg.encoder_dtype
        )
    )


def step_and_matmul_seconds(
    cfg,
    batch: int,
    d_model: int,
    repeats: int,
    b_enc: float | None = None,
    parts: bool = False,
    dead: int = 0,
    auxk: str = "trainer",
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Best (wall, CPU) seconds of the train step (``"step"``) and of the encoder's matmul at
    the step's dtype (``"matmul"``), and with ``parts`` of each part alone (module docstring),
    all timed alternately; and the step's last metrics.

    ``dead`` latents (random ones) count as dead before every step; with ``auxk`` "trainer"
    the step is the trainer's (its AuxK variant picked on the device), with "sparse" the one
    compiled with AuxK's sparse variant."""
    mesh = make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
    arch = get_architecture(cfg, d_model)
    program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 1000, batch, mesh, 1.0)
    init = program.init(jax.random.key(0), jnp.zeros(d_model))
    if b_enc is not None:  # a trained model's sparsity (see the module docstring)
        params = init.params | {"b_enc": jnp.full_like(init.params["b_enc"], b_enc)}
        init = init._replace(params=jax.device_put(params, program.param_shardings))
    state = {"s": init}
    x = program.global_batch_array(np.random.default_rng(0).normal(size=(batch, d_model)))
    if dead:
        since = np.zeros(cfg.n_features, np.int32)
        since[np.random.default_rng(1).permutation(cfg.n_features)[:dead]] = program.dead_window
        step = program.step_fn() if auxk == "trainer" else program.step_fn(any_dead=True)
    else:
        step = program.step_fn(any_dead=False)

    last: dict[str, float] = {}

    def run_step() -> None:
        if dead:  # the same latents dead before every step (a step may revive some)
            sharding = state["s"].tokens_since_fired.sharding
            state["s"] = state["s"]._replace(tokens_since_fired=jax.device_put(since, sharding))
        state["s"], metrics = step(state["s"], x)
        last.update(jax.device_get(metrics))

    key = jax.random.key(1)
    dtype = jnp.dtype(cfg.encoder_dtype)
    # The floor's matmul on a slice of the batch when the whole [batch, F] product would not
    # fit (128 GiB at 1M latents and 32,768 tokens); its time is scaled by batch / rows below.
    rows = floor_rows(batch, cfg.n_features)
    xm = jax.random.normal(key, (rows, d_model), jnp.float32).astype(dtype)
    wm = jax.random.normal(key, (d_model, cfg.n_features), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))

    def run_matmul() -> None:
        matmul(xm, wm).block_until_ready()

    fns: dict[str, Callable[[], None]] = {"matmul": run_matmul, "step": run_step}
    if parts:
        fns |= _part_fns(arch, program, state, x)
    times = _best_of(fns, repeats)
    times["matmul"] = tuple(t * batch / rows for t in times["matmul"])
    return times, last


FLOOR_MAX_ELEMENTS = 1 << 30
"""Largest ``[rows, F]`` float32 output the floor's matmul makes at once (4 GiB)."""


def floor_rows(batch: int, n_features: int) -> int:
    """Rows of the floor's matmul: the batch, or a slice of it whose output fits."""
    return min(batch, max(1, FLOOR_MAX_ELEMENTS // n_features))


def _part_fns(arch, program: TrainProgram, state: dict, x: jax.Array) -> dict[str, Callable]:
    """The step's parts, each a jitted program of its own on the step's current state."""
    dead = jnp.zeros(arch.config.n_features, bool)

    def loss(p, arch_state):
        return program._loss(p, arch_state, dead, x, 1.0)

    forward = jax.jit(loss)
    gradient = jax.jit(jax.value_and_grad(loss, has_aux=True))
    select = _selection_fn(arch, program)

    def optimizer_step(grads, opt_state, params):
        updates, opt_state = program.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params | {"W_dec": renormalise_rows(params["W_dec"])}, opt_state

    optimizer = jax.jit(optimizer_step, donate_argnums=(1, 2))
    s = state["s"]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), s.params)
    # The optimizer part updates copies, so the step's own state is never donated away.
    opt = {"state": jax.tree.map(jnp.copy, s.opt_state), "params": jax.tree.map(jnp.copy, s.params)}

    def run_optimizer() -> None:
        opt["params"], opt["state"] = optimizer(grads, opt["state"], opt["params"])
        jax.block_until_ready(opt["params"])

    return {
        "select": lambda: jax.block_until_ready(select(state["s"].params, x)),
        "forward": lambda: jax.block_until_ready(forward(state["s"].params, state["s"].arch_state)),
        "gradient": lambda: jax.block_until_ready(
            gradient(state["s"].params, state["s"].arch_state)
        ),
        "optimizer": run_optimizer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "jumprelu", "relu_l1"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument(
        "--batches", type=int, nargs="+", help="one batch per --features width (default --batch)"
    )
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--encoder-dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"]
    )
    parser.add_argument("--parts", action="store_true", help="also time the step's parts")
    parser.add_argument(
        "--accelerator-block",
        type=int,
        help="GPU/TPU only: blockwise top-k block width instead of accelerator_block's choice",
    )
    parser.add_argument(
        "--encode-chunk-tokens",
        type=int,
        help=f"tokens per encoder matmul + selection pass (default {ENCODE_CHUNK_TOKENS})",
    )
    parser.add_argument(
        "--sparse-l0-bound",
        type=int,
        help="JumpReLU and ReLU-L1: sparse_l0_bound instead of the config's default",
    )
    parser.add_argument(
        "--dead-latents",
        type=int,
        nargs="+",
        default=[0],
        help=(
            "TopK and BatchTopK: also time steps with this many latents dead, so AuxK runs "
            "(a row for the trainer's step and one for AuxK's sparse variant; 0: none dead)"
        ),
    )
    args = parser.parse_args()
    if args.parts and any(args.dead_latents):
        # The parts are timed as separate programs on the step's state, without AuxK.
        parser.error("--parts times the step's parts without AuxK: use it without --dead-latents")
    if args.accelerator_block:
        topk_select.accelerator_block = lambda n, k: args.accelerator_block
    if args.encode_chunk_tokens:
        for module in (topk_module, jumprelu_module, relu_l1_module):
            module.ENCODE_CHUNK_TOKENS = args.encode_chunk_tokens
    batches = args.batches or [args.batch] * len(args.features)
    if len(batches) != len(args.features):
        parser.error(f"--batches needs one batch per --features width ({len(args.features)})")
    # As every dictlearn process does (launch/cli.py); it serves the step and the reference
    # matmul alike. DICTLEARN_KEEP_MALLOC=1 measures with glibc's default instead.
    allocator = "reuse freed (mallopt)" if reuse_freed_host_memory() else "glibc default"
    d = args.d_model
    bound = {} if args.sparse_l0_bound is None else {"sparse_l0_bound": args.sparse_l0_bound}

    def jumprelu(f: int, **fields) -> JumpReLUConfig:
        # Unit decoder rows (JumpReLU's default is 0.1) keep the pre-activations N(0, 1).
        return JumpReLUConfig(
            n_features=f,
            init_threshold=NormalDist().inv_cdf(1 - args.k / f),
            decoder_init_norm=1.0,
            **bound,
            **fields,
        )

    configs = {
        "topk": lambda f: TopKConfig(n_features=f, k=args.k),
        "batchtopk": lambda f: BatchTopKConfig(n_features=f, k=args.k),
        "jumprelu": jumprelu,
        # The same, held at L0 k by target_l0: its sparse bound is then 128, not 256.
        "jumprelu_target": lambda f: jumprelu(f, target_l0=args.k),
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

    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} x{jax.device_count()} ({device.platform}), jax "
        f"{jax.__version__}, matmul precision {jax.config.jax_default_matmul_precision or 'default'}"
        f", d_model {d}, k {args.k}, best of {args.repeats}, host allocator: {allocator}"
    )
    header = (
        f"{'arch':<20} {'enc':>4} {'features':>9} {'batch':>6} {'dead':>6} {'auxk':>7} "
        f"{'step ms':>9} {'tokens/s':>10} "
        f"{'matmul ms':>9} {'TFLOP/s':>8} {'% of floor':>10} {'(CPU s)':>8} {'l0':>7} {'dense':>5}"
    )
    if args.parts:
        header += f" {'select':>7} {'fwd':>7} {'fwd+bwd':>7} {'opt':>7} {'opt %':>6}"
    print(header)
    print("-" * len(header))
    for f, b in zip(args.features, batches, strict=True):
        for name in args.archs:
            for encoder_dtype, dead, auxk in [
                (dtype, n_dead, auxk)
                for dtype in args.encoder_dtypes
                for n_dead in args.dead_latents
                for auxk in (["-"] if n_dead == 0 else ["trainer", "sparse"])
                if n_dead == 0 or name in ("topk", "batchtopk")
            ]:
                cfg = configs[name](f).model_copy(update={"encoder_dtype": encoder_dtype})
                try:
                    times, metrics = step_and_matmul_seconds(
                        cfg, b, d, args.repeats, b_enc(name, f), args.parts, dead, auxk
                    )
                except Exception as e:  # e.g. out of device memory: report it, go on
                    reason = str(e).strip().splitlines()[0][:150]
                    print(f"{name:<20} {encoder_dtype:>4} {f:>9} {b:>6} failed: {reason}")
                    continue
                (t, t_cpu), (mm, mm_cpu) = times["step"], times["matmul"]
                tflops = 2 * b * d * f / mm / 1e12
                line = (
                    f"{name:<20} {'bf16' if encoder_dtype == 'bfloat16' else 'f32':>4} {f:>9} "
                    f"{b:>6} {dead:>6} {auxk:>7} {t * 1e3:>9.2f} {b / t:>10.0f} {mm * 1e3:>9.2f} "
                    f"{tflops:>8.1f} "
                    f"{100 * mm / t:>9.1f}% {100 * mm_cpu / t_cpu:>7.1f}% "
                    f"{float(metrics['l0']):>7.1f} "
                    f"{'yes' if metrics.get('dense_fallback', 0) else 'no':>5}"
                )
                if args.parts:
                    line += "".join(
                        f" {times[part][0] * 1e3:>7.2f}"
                        for part in ("select", "forward", "gradient", "optimizer")
                    )
                    line += f" {100 * times['optimizer'][0] / t:>5.1f}%"
                print(line, flush=True)


if __name__ == "__main__":
    main()
