"""Several SAEs on one batch stream: the group step against the same SAEs trained separately.

    uv run python bench/group_throughput.py [--groups same mixed] [--repeats 3] [--stacked]

For each group it times, on the same shapes and machine (d_model 640, batch 4096, k 32, float32,
TopK), one :class:`GroupProgram` step (every member on one batch, one jitted program, the batch
transferred once) against the members' own single-SAE steps, each with its own batch transfer,
as N separate runs would do. Tokens/s counts stream tokens: in both cases every member advances
by one batch. The two are timed alternately (best of ``--repeats``), so background load on a
shared machine hits both alike and their ratio stays meaningful.

``--stacked`` also times the same-shape group as one ``jax.vmap`` over stacked member states
(members then differ only in init seed: the learning rate is a constant of the compiled step).
``jax.ffi`` kernels do not batch, so the stacked step runs the XLA TopK path
(``DICTLEARN_CPU_KERNELS=0`` while it is traced); on CPU the side-by-side row with the same path
is printed too, to compare like with like.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.sae import TopKConfig, get_architecture
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.group import GroupProgram
from dictlearn.train.step import TrainProgram
from sharding import MeshConfig, make_mesh
from sharding.host_memory import reuse_freed_host_memory

GROUPS = {
    "same": [4096, 4096, 4096, 4096],
    "mixed": [4096, 8192, 16384],
}


@contextmanager
def _xla_topk_path(on: bool):
    """Trace with the pure-XLA TopK path (the FFI kernels cannot be vmapped)."""
    if not on:
        yield
        return
    previous = os.environ.get("DICTLEARN_CPU_KERNELS")
    os.environ["DICTLEARN_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DICTLEARN_CPU_KERNELS"]
        else:
            os.environ["DICTLEARN_CPU_KERNELS"] = previous


def _programs(widths: list[int], batch: int, d_model: int, k: int) -> list[TrainProgram]:
    mesh = make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
    return [
        TrainProgram(
            get_architecture(TopKConfig(n_features=f, k=k), d_model),
            OptimizerConfig(lr=1e-3 * (i + 1)),
            1000,
            batch,
            mesh,
            1.0,
        )
        for i, f in enumerate(widths)
    ]


def _best(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Best time of each ``fns`` entry; a name ending in ``xla-topk`` runs (and, should the
    first call's outputs retrace it, traces) with the kernels off."""

    def call(name: str) -> float:
        with _xla_topk_path(name.endswith("xla-topk")):
            t = time.perf_counter()
            fns[name]()
            return time.perf_counter() - t

    for name in fns:  # compile and warm up
        call(name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name in fns:
            times[name].append(call(name))
    return {name: min(ts) for name, ts in times.items()}


def measure(widths: list[int], batch: int, d_model: int, k: int, repeats: int, stacked: bool):
    """Seconds per step: separate runs (sum over members), the group step, the stacked step."""
    rows = np.random.default_rng(0).normal(size=(batch, d_model)).astype(np.float32)
    mean = jnp.asarray(rows.mean(0))
    fns = {}
    variants = [("default", False)]
    if stacked and jax.default_backend() == "cpu":
        variants.append(("xla-topk", True))
    for tag, xla_path in variants:
        programs = _programs(widths, batch, d_model, k)
        with _xla_topk_path(xla_path):  # traced and compiled under the chosen TopK path
            singles = {
                "i": [p.init(jax.random.key(i), mean) for i, p in enumerate(programs)],
                "g": tuple(p.init(jax.random.key(i), mean) for i, p in enumerate(programs)),
            }
            group = GroupProgram(programs)
            group_step = group.step_fn([False] * len(programs))
            single_steps = [p.step_fn(False) for p in programs]

            def separate(singles=singles, programs=programs, single_steps=single_steps) -> None:
                for i, (p, step) in enumerate(zip(programs, single_steps, strict=True)):
                    singles["i"][i], m = step(singles["i"][i], p.global_batch_array(rows))
                    jax.block_until_ready(m)

            def together(singles=singles, group=group, group_step=group_step) -> None:
                singles["g"], m = group_step(singles["g"], group.global_batch_array(rows))
                jax.block_until_ready(m)

            separate(), together()
        fns[f"separate/{tag}"] = separate
        fns[f"group/{tag}"] = together
    if stacked and len(set(widths)) == 1:
        program = _programs(widths[:1], batch, d_model, k)[0]
        keys = jax.random.split(jax.random.key(0), len(widths))
        box = {"s": jax.jit(jax.vmap(program._init, in_axes=(0, None)))(keys, mean)}
        vstep = jax.jit(
            jax.vmap(lambda s, x: program._train_step(s, x, any_dead=False), in_axes=(0, None)),
            donate_argnums=(0,),
        )

        def vmapped(box=box) -> None:
            box["s"], m = vstep(box["s"], program.global_batch_array(rows))
            jax.block_until_ready(m)

        with _xla_topk_path(True):
            vmapped()
        fns["stacked/xla-topk"] = vmapped
    return _best(fns, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stacked", action="store_true", help="Also time jax.vmap stacking.")
    args = parser.parse_args()
    allocator = "reuse freed (mallopt)" if reuse_freed_host_memory() else "glibc default"
    b, d = args.batch, args.d_model
    print(
        f"device: {jax.devices()[0].device_kind}, TopK, batch {b}, d_model {d}, k {args.k}, "
        f"float32, best of {args.repeats}, host allocator: {allocator}"
    )
    header = f"{'group':<28} {'how':<22} {'step ms':>9} {'tokens/s':>10} {'vs separate':>11}"
    print(header)
    print("-" * len(header))
    for name in args.groups:
        widths = GROUPS[name]
        label = f"{len(widths)} x " + "/".join(str(w) for w in sorted(set(widths)))
        t = measure(widths, b, d, args.k, args.repeats, args.stacked)
        for how, seconds in t.items():
            path = how.split("/")[1]
            base = t.get(f"separate/{path}", t["separate/default"])
            print(
                f"{label:<28} {how:<22} {seconds * 1e3:>9.1f} {b / seconds:>10.0f} "
                f"{base / seconds:>10.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
