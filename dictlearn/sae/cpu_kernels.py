"""Native CPU kernels for the sparse SAE steps: TopK's top-k and sparse backward, and the slot
selection, decoder and estimator dot products of the variable-L0 SAEs (XLA FFI).

On CPU, XLA runs the two sparse parts of a TopK step poorly: its TopK custom call is
single-threaded and pays ~4 µs per row, and the sparse backward has to be written as gathers
and scatter-adds that materialise every ``[pairs, d_model]`` update in memory. At 16k latents
those two took ~180 ms of a ~800 ms step, next to ~500 ms for the encoder matmul that sets the
floor. ``cpu_kernels.cc`` does both in C++ on XLA's intra-op thread pool:

* ``top_k``: exact ``lax.top_k`` of ``x (+ bias)`` (same values, indices and tie order), the bias
  add folded in. Two passes per row: the smallest of ``k`` chunk maxima bounds the winners from
  below, then the few elements at or above it are collected and partially sorted.
* ``select_above``, ``sparse_decode``, ``pair_dots``: the slot selection, decoder and threshold
  estimator of the SAEs whose L0 varies per token (``dictlearn.sae.variable_l0``), each costing
  what the active pairs cost rather than what the per-token bound would.
* ``sparse_backward``: a counting sort of the active (token, latent) pairs by latent, then each
  latent's ``W_dec``, ``W_enc`` and ``b_enc`` gradient rows accumulated in registers and cache
  and written once (the ``W_enc`` one transposed, straight into its ``[d_model, F]`` layout).

Each output element is computed by one thread in a fixed order, so results are the same for
any thread count: exact resume still holds.

The source is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``)
against the XLA FFI headers that ship with jaxlib, and cached under
``$DICTLEARN_KERNEL_CACHE`` (default ``~/.cache/dictlearn/kernels``), keyed by the source, the
compiler, jaxlib and the CPU. Where that fails (no compiler, say), a warning says why and the
pure-XLA implementations run instead: same results for ``top_k``, equal up to float rounding
for the backward. ``DICTLEARN_CPU_KERNELS=0`` selects the XLA path on purpose. Other platforms
(GPU, TPU) always lower the XLA path; the choice is made per platform at lowering time.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sharding.varying import vary_over, varying_axes

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
DISABLE_ENV = "DICTLEARN_CPU_KERNELS"
CACHE_ENV = "DICTLEARN_KERNEL_CACHE"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {
    "dictlearn_top_k": "DictlearnTopK",
    "dictlearn_sparse_backward": "DictlearnSparseBackward",
    "dictlearn_select_above": "DictlearnSelectAbove",
    "dictlearn_sparse_decode": "DictlearnSparseDecode",
    "dictlearn_pair_dots": "DictlearnPairDots",
}


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded."""


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU model sharing the cache (e.g. over NFS).
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dictlearn" / "kernels")


def build(compiler: str | None = None, cache_dir: Path | None = None) -> Path:
    """Compile ``cpu_kernels.cc`` into the cache (if not there yet); returns the library path.

    Raises:
        KernelBuildError: no compiler, or it failed (the message has its output).
    """
    compiler = compiler or os.environ.get("CXX") or "c++"
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH (set $CXX to one)")
    try:
        version = subprocess.run(
            [compiler_path, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run {compiler_path} --version: {e}") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                version.encode(),
                importlib.metadata.version("jaxlib").encode(),
                _cpu_signature().encode(),
                " ".join(_FLAGS).encode(),
            ]
        )
    ).hexdigest()[:20]
    directory = cache_dir or _cache_dir()
    library = directory / f"libdictlearn_cpu_{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes (Ray workers, pytest
    # workers) each build and the last rename wins, never a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=library.stem, suffix=".tmp.so", dir=directory)
    os.close(fd)
    command = [
        compiler_path,
        *_FLAGS,
        "-isystem",
        jax.ffi.include_dir(),
        str(SOURCE),
        "-o",
        tmp,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise KernelBuildError(
                f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-4000:]}"
            )
        os.replace(tmp, library)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"compiling {SOURCE.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built CPU kernels: %s", library)
    return library


@functools.cache
def _load() -> ctypes.CDLL | None:
    """Build (once per process), load and register the kernels; None (with a warning) if not."""
    try:
        library = ctypes.CDLL(str(build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
    except (KernelBuildError, OSError, AttributeError) as e:
        warnings.warn(
            f"dictlearn's CPU kernels are unavailable, using the slower pure-XLA TopK path: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return library


def enabled() -> bool:
    """Whether traced code should use the kernels on CPU (read at trace time)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _load() is not None


def on_cpu(kernel: Callable, fallback: Callable, *args):
    """``kernel(*args)`` when lowering for CPU with the kernels enabled, else ``fallback(*args)``.

    Both return a tuple of arrays.
    """
    if not enabled():
        return fallback(*args)

    def typed_kernel(*args):
        # Inside shard_map an FFI call's results carry no mesh-axis type; they are per-device
        # values, varying over every axis any input varies over (as the fallback's are).
        axes = varying_axes(*args)
        return tuple(vary_over(out, axes) for out in kernel(*args))

    return jax.lax.platform_dependent(*args, cpu=typed_kernel, default=fallback)


def top_k(x: jax.Array, k: int, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k(x + bias, k)`` for 2-D float32 ``x`` (kernel call; CPU only)."""
    rows = x.shape[0]
    has_bias = bias is not None
    call = jax.ffi.ffi_call(
        "dictlearn_top_k",
        (
            jax.ShapeDtypeStruct((rows, k), jnp.float32),
            jax.ShapeDtypeStruct((rows, k), jnp.int32),
        ),
    )
    bias = bias if has_bias else jnp.zeros((1,), jnp.float32)
    values, indices = call(x, bias, k=np.int64(k), has_bias=has_bias)
    return values, indices


def sparse_backward(
    g_partial: jax.Array,
    centered: jax.Array,
    w_dec: jax.Array,
    values: jax.Array,
    g_values: jax.Array,
    indices: jax.Array,
    active: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``dictlearn.sae.sparse.walk_pairs_by_latent`` as one kernel call (CPU only): the same
    gradients, summed per latent in token order instead of in chunks."""
    n_features, d_model = w_dec.shape
    call = jax.ffi.ffi_call(
        "dictlearn_sparse_backward",
        (
            jax.ShapeDtypeStruct((n_features, d_model), jnp.float32),
            jax.ShapeDtypeStruct((d_model, n_features), jnp.float32),
            jax.ShapeDtypeStruct((n_features,), jnp.float32),
        ),
    )
    grad_w_dec, grad_w_enc, grad_b_enc = call(
        g_partial, centered, w_dec, values, g_values, indices.astype(jnp.int32), active
    )
    return grad_w_dec, grad_w_enc, grad_b_enc


def select_above(
    x: jax.Array, b_enc: jax.Array, rank_bias: jax.Array, bound: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row of ``x``, the columns with ``x + rank_bias > 0`` in index order, up to ``bound``.

    Returns ``pre`` ``[rows, bound]`` (``x + b_enc`` at those columns; ``-inf`` in unused slots),
    their int32 ``indices`` (0 in unused slots) and each row's int32 ``count`` of such columns,
    which exceeds ``bound`` when some did not fit. Kernel call; CPU only.
    """
    rows = x.shape[0]
    call = jax.ffi.ffi_call(
        "dictlearn_select_above",
        (
            jax.ShapeDtypeStruct((rows, bound), jnp.float32),
            jax.ShapeDtypeStruct((rows, bound), jnp.int32),
            jax.ShapeDtypeStruct((rows,), jnp.int32),
        ),
    )
    pre, indices, count = call(x, b_enc, rank_bias, bound=np.int64(bound))
    return pre, indices, count


def sparse_decode(values: jax.Array, indices: jax.Array, w_dec: jax.Array) -> tuple[jax.Array]:
    """``[batch, d]``: ``sum_j values[b, j] * w_dec[indices[b, j]]`` over nonzero values only
    (kernel call; CPU only). A 1-tuple, as ``on_cpu`` wants."""
    call = jax.ffi.ffi_call(
        "dictlearn_sparse_decode",
        jax.ShapeDtypeStruct((values.shape[0], w_dec.shape[1]), jnp.float32),
    )
    return (call(values, indices.astype(jnp.int32), w_dec),)


def pair_dots(
    g: jax.Array, w_dec: jax.Array, indices: jax.Array, mask: jax.Array
) -> tuple[jax.Array]:
    """``[batch, k]``: ``g[b] . w_dec[indices[b, j]]`` where ``mask``, else 0 (kernel call; CPU
    only). A 1-tuple, as ``on_cpu`` wants."""
    call = jax.ffi.ffi_call("dictlearn_pair_dots", jax.ShapeDtypeStruct(indices.shape, jnp.float32))
    return (call(g, w_dec, indices.astype(jnp.int32), mask),)
