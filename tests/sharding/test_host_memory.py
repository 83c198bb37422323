"""sharding.host_memory: XLA:CPU's per-call buffers are reused instead of page-faulted in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, sys
from sharding.host_memory import reuse_freed_host_memory
applied = reuse_freed_host_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
double = jax.jit(lambda a: a * 2.0 + 1.0)  # a 64 MiB output per call: over glibc's 32 MiB mmap cap
for _ in range(20):  # the heap settles after a few calls
    double(x).block_until_ready()
per_call = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: on a loaded machine the heap can still grow once (one call faults its output in,
# seen as a mean of 1638 = 16384 / 10); with the default allocator every call faults.
print(json.dumps({"applied": applied, "faults_per_call": sorted(per_call)[5]}))
"""


def _faults_per_call(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DICTLEARN_KEEP_MALLOC"}
    env["XLA_FLAGS"] = ""  # one plain CPU device, as a training process has
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    default = _faults_per_call("default")
    reuse = _faults_per_call("reuse")
    assert reuse["applied"] and not default["applied"]
    # 64 MiB of 4 KiB pages is 16384 faults per call when every output is a fresh mmap.
    assert default["faults_per_call"] > 12000, default
    assert reuse["faults_per_call"] < 100, reuse
