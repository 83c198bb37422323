"""The exact build as a two-process JAX program (2 processes x 2 CPU devices, gloo).

Each process loads the same directions, joins ``jax.distributed``, and runs
``build_from_directions`` on a 2x2 ``(data, model)`` mesh whose ``data`` axis spans the two
processes; only process 0 writes. The index must equal the numpy brute force.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dictlearn.index import IndexStore, brute_force_knn
from sharding.distributed import free_port

WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from sharding.distributed import Coordinator, initialize

    address, rank, out, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    initialize(Coordinator(address, 2, rank), cpu_devices=2)
    import jax

    from dictlearn.index import Directions, IndexConfig, build_from_directions

    x = np.load(data)
    config = IndexConfig(
        sae="mem://two", out=out, k=4, block_size=48, key_chunk=16,
        mesh={"data": 2, "model": 2},
    )
    result = build_from_directions(config, Directions.from_weights(x, "mem://two", "d"))
    print(f"rank {jax.process_index()} wrote {result.parts_written} parts", flush=True)
    """
)


def test_two_process_build_matches_brute_force(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((150, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "idx"
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, address, str(rank), str(out), str(tmp_path / "x.npy")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    manifest = IndexStore(str(out)).manifest()
    assert manifest is not None and len(manifest.parts) == 4
    table = pq.ParquetDataset([str(out / p) for p in manifest.parts]).read()
    ref_ids, ref_cos = brute_force_knn(x, x, 4, exclude_self=True)
    np.testing.assert_array_equal(table["neighbor"].to_numpy(), ref_ids.reshape(-1))
    np.testing.assert_allclose(table["cosine"].to_numpy(), ref_cos.reshape(-1), rtol=1e-5)
