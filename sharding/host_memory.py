"""Host-memory reuse for JAX's CPU backend.

XLA on CPU allocates each program's buffers (outputs and one temp block) with ``malloc`` on
every execution, and glibc serves any block over 32 MiB with a fresh ``mmap`` that it unmaps
again on ``free``. So every train step of a CPU run page-faults its whole working set back in:
at 16k latents that was ~100k faults, ~0.25 CPU-s of kernel time per ~0.8 s step, and the
encoder matmul alone faulted its 268 MB output on every call. Serving large blocks from the
heap instead, and keeping freed memory there, makes the second and later steps fault nothing.

The cost is that the process keeps its peak heap (it is not returned to the OS), and all
threads share one malloc arena, which is fine for a process that does its work in a few large
XLA buffers, not in many small mallocs on many threads.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _accelerator_plugin_installed() -> bool:
    """Whether JAX will find a GPU/TPU here (then host buffers are not the hot path)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    import jax_plugins

    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def reuse_freed_host_memory() -> bool:
    """Make glibc malloc keep and reuse large freed blocks (Linux, CPU-only JAX).

    Call it before JAX starts its CPU backend (before the first array or device query): the
    backend's threads pick their malloc arena when they first allocate. Does nothing, and
    returns False, off glibc, where an accelerator plugin is installed, or when
    ``DICTLEARN_KEEP_MALLOC`` is set (to compare with the default allocator).
    """
    if not sys.platform.startswith("linux") or os.environ.get("DICTLEARN_KEEP_MALLOC"):
        return False
    if _accelerator_plugin_installed():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(
        mallopt(_M_ARENA_MAX, 1)  # every thread in the main arena, which grows by brk ...
        and mallopt(_M_MMAP_MAX, 0)  # ... so no block is served by its own mmap ...
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ... and freed memory stays for reuse.
    )
