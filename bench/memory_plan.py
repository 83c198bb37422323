"""Per-device memory of the compiled train step at 1M-16M latents, without allocating anything.

    uv run python bench/memory_plan.py [--latents 20 22 24] [--models 8 16 32 64 128 256]
                                       [--pod 256] [--batch-per-replica 4096] [--no-aux]

For each width (2^20, 2^22, 2^24 latents of a TopK SAE at d_model 2304, k 32, float32, Adam) and
each model-axis size it compiles the real ``TrainProgram`` step against abstract inputs
(``program.abstract_state()`` is an ``eval_shape``) and reads ``compiled.memory_analysis()``, the
per-device buffer assignment: nothing the size of the model is ever allocated.

Meshes. The main table uses ``data=1`` and ``model`` from 8 to 256, so the mesh grows from 8 to
256 devices and every row has the same per-device batch (``--batch-per-replica`` tokens). A second
table (``--pod``, default 256) puts the same widths on a full 256-device pod,
``(256 / model) x model``, with the same per-device batch: the data axis replicates the parameters
and splits the batch, so per-device bytes should match the ``data=1`` row of the same ``model``.

Columns:

* ``args``: argument bytes per device (params + Adam moments + dead-latent counters + the local
  batch). Parameters are sharded on ``model`` only, so this is ~ 3 x 2 x d_model x F / model x 4 B.
* ``temp``: XLA's temporary buffers (activations, gradients, top-k scratch).
* ``total``: args + temp + (output - alias), the step's per-device peak as XLA plans it. The state
  is donated, so the new state aliases the old one and output - alias is only the metrics.
* ``scale``: ``total(model) * model / (total(model0) * model0)`` with ``model0`` the smallest
  model-axis size of the table: 1.00 is perfect 1/model scaling; above 1 means a part that does
  not shrink with the model axis (the replicated ``b_dec``/batch, the per-token top-k candidates).
* ``args sc``: the same ratio for ``args`` alone.
* ``largest AG``: the largest array any ``all-gather`` in the compiled HLO produces.
* ``full AG``: ``yes`` if some all-gather produces a matrix with a full ``n_features`` dimension
  (the ``[batch, n_features]`` gather a plain ``lax.top_k`` over the sharded feature axis causes,
  as its compiled HLO shows). It must read ``no``. A control row compiles exactly that plain
  ``lax.top_k`` and must read ``yes``, which shows the scan would catch it.

``aux`` rows compile the ``any_dead=True`` variant (AuxK loss over dead latents: a second, masked
``[batch, F_local]`` top-k of ``k_aux`` = 256 candidates and their sparse decode).

Virtual devices: the script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=256`` (the
largest mesh) *before* importing JAX, only if ``XLA_FLAGS`` is not already set; if you set it
yourself, give at least as many devices as the largest mesh. The numbers are the CPU backend's
buffer assignment; a TPU/GPU compile plans layouts and fusions differently, so treat them as the
sharding arithmetic being right (the 1/model trend), not as an exact HBM figure.

What it shows (default run): ``args`` falls as 1/model (``args sc`` <= 1.16, the rest being the
replicated batch and ``b_dec``) and so does everything of shape ``[batch, F / model]``; no full
all-gather anywhere. ``total`` stops falling at a per-device floor that does not depend on the
mesh: the sparse decode/encode backward materialises two ``[batch * k, d_model]`` float32 buffers
(gathered weight rows per selected slot, every shard keeps all ``k`` slots per token, masked),
2 x 4096 x 32 x 2304 x 4 B = 2.25 GiB per device; the AuxK variant does the same with
``k_aux`` = 256. The top-k candidates are all-gathered (``[batch, k * model]``) only up to 1,024
per token; past that the merge is a threshold search (``threshold_merge``) whose largest exchange
is ``[model, batch]`` int32, so AuxK at model 256 no longer gathers 1 GiB per device: at 1M
latents its temp went from 2.17 to 0.27 GiB (scale 6.24 -> 1.32), the base step's from 0.29 to
0.14 GiB (1.68 -> 1.22).

Cost: one compile is ~2-5 s and ~0.5 GB RSS even at 16M latents on 256 devices; the default run
(3 widths x 6 meshes x 2 variants + the 18-row pod table) took ~3 min on 2 cores; nothing cut.
"""

from __future__ import annotations

import os

if "XLA_FLAGS" not in os.environ:
    # Must happen before JAX starts its CPU backend: 256 virtual devices for the largest mesh.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=256"

import argparse
import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dictlearn.sae import TopKConfig, get_architecture
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram
from sharding import BATCH, FEATURES, MeshConfig, make_mesh, named_sharding

D_MODEL = 2304
K = 32
GIB = 2**30

_AG_LINE = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


@dataclass(frozen=True)
class Gathers:
    """What the all-gathers of one compiled program produce."""

    largest_bytes: int
    largest_shape: str
    full: bool


def scan_all_gathers(hlo_text: str, n_features: int) -> Gathers:
    """Output shapes of every all-gather in ``hlo_text``; ``full`` if one has an n_features dim."""
    largest_bytes, largest_shape, full = 0, "-", False
    for line in hlo_text.splitlines():
        match = _AG_LINE.search(line)
        if match is None:
            continue
        for dtype, dims_text in _ARRAY.findall(match.group(1)):
            dims = [int(d) for d in dims_text.split(",") if d]
            numel = 1
            for d in dims:
                numel *= d
            nbytes = numel * _BYTES.get(dtype, int(dtype[1:]) // 8)
            if nbytes > largest_bytes:
                largest_bytes, largest_shape = nbytes, f"{dtype}[{dims_text}]"
            if n_features in dims and numel > n_features:
                full = True
    return Gathers(largest_bytes, largest_shape, full)


@dataclass(frozen=True)
class Row:
    n_features: int
    variant: str
    data: int
    model: int
    args: int
    temp: int
    total: int
    gathers: Gathers
    compile_s: float


def measure(n_features: int, data: int, model: int, batch_per_replica: int, aux: bool) -> Row:
    t0 = time.perf_counter()
    arch = get_architecture(TopKConfig(n_features=n_features, k=K), d_model=D_MODEL)
    mesh = make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])
    program = TrainProgram(
        arch,
        OptimizerConfig(lr=4e-4),
        total_steps=1000,
        global_batch=batch_per_replica * data,
        mesh=mesh,
        norm_scale=1.0,
    )
    compiled = (
        program.step_fn(any_dead=aux)
        .lower(program.abstract_state(), program.abstract_batch())
        .compile()
    )
    mem = compiled.memory_analysis()
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    total = args + temp + mem.output_size_in_bytes - mem.alias_size_in_bytes
    gathers = scan_all_gathers(compiled.as_text(), n_features)
    return Row(
        n_features,
        "aux" if aux else "base",
        data,
        model,
        args,
        temp,
        total,
        gathers,
        time.perf_counter() - t0,
    )


def control_plain_top_k(n_features: int, model: int, batch: int) -> Gathers:
    """The scan on the known trap: ``lax.top_k`` over a model-sharded feature axis."""
    mesh = make_mesh(MeshConfig(data=1, model=model), jax.devices()[:model])
    sharding = named_sharding(mesh, (BATCH, FEATURES))
    pre = jax.ShapeDtypeStruct((batch, n_features), jnp.float32, sharding=sharding)
    compiled = jax.jit(lambda p: jax.lax.top_k(p, K)).lower(pre).compile()
    return scan_all_gathers(compiled.as_text(), n_features)


def _latents_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else str(n)


HEADER = (
    f"{'latents':>7} {'variant':>7} {'mesh':>9} {'args GiB':>9} {'temp GiB':>9} "
    f"{'total GiB':>9} {'args sc':>7} {'scale':>6} {'largest AG':>20} {'full AG':>7} {'compile s':>9}"
)


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(HEADER)
    print("-" * len(HEADER))
    base: dict[tuple[int, str], Row] = {}
    for r in rows:
        ref = base.setdefault((r.n_features, r.variant), r)
        scale = r.total * r.model / (ref.total * ref.model)
        args_scale = r.args * r.model / (ref.args * ref.model)
        ag = f"{r.gathers.largest_shape} {r.gathers.largest_bytes / 2**20:.1f}M"
        print(
            f"{_latents_label(r.n_features):>7} {r.variant:>7} {f'{r.data}x{r.model}':>9} "
            f"{r.args / GIB:9.3f} {r.temp / GIB:9.3f} {r.total / GIB:9.3f} {args_scale:7.2f} {scale:6.2f} "
            f"{ag:>20} {'yes' if r.gathers.full else 'no':>7} {r.compile_s:9.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[20, 22, 24], help="log2 F")
    parser.add_argument("--models", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--pod", type=int, default=256, help="devices of the pod table (0: skip)")
    parser.add_argument("--batch-per-replica", type=int, default=4096)
    parser.add_argument("--no-aux", action="store_true", help="skip the any_dead=True variant")
    args = parser.parse_args()

    needed = max([*args.models, args.pod])
    if jax.device_count() < needed:
        raise SystemExit(
            f"{jax.device_count()} devices but the largest mesh needs {needed}: "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
        )
    start = time.perf_counter()
    models = sorted(args.models)
    widths = [2**e for e in args.latents]
    variants = [False] if args.no_aux else [False, True]
    print(
        f"TopK SAE, d_model {D_MODEL}, k {K}, float32 + Adam; "
        f"{args.batch_per_replica} tokens per data replica; {jax.device_count()} virtual devices"
    )

    ctrl = control_plain_top_k(widths[0], models[0], args.batch_per_replica)
    print(
        f"control: plain lax.top_k on [{args.batch_per_replica}, {widths[0]}] sharded on model="
        f"{models[0]} -> largest all-gather {ctrl.largest_shape}, "
        f"full AG {'yes' if ctrl.full else 'no'} (must be yes)"
    )

    rows = [
        measure(f, 1, m, args.batch_per_replica, aux)
        for f in widths
        for aux in variants
        for m in models
    ]
    print_table("data=1, model axis 8..256 (mesh = model devices)", rows)

    if args.pod:
        pod_rows = [
            measure(f, args.pod // m, m, args.batch_per_replica, False)
            for f in widths
            for m in models
            if args.pod % m == 0
        ]
        print_table(f"full {args.pod}-device pod, data = {args.pod} / model", pod_rows)

    print(f"\ntotal runtime {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
