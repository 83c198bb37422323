"""``dictlearn index build ... ray.hosts=2``: two Ray actors, one jax.distributed program.

Each actor loads the SAE export, joins the program with 2 virtual CPU devices, and builds on a
2x2 ``(data, model)`` mesh whose data axis spans the two processes; process 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dictlearn.export import load_sae
from dictlearn.index import IndexConfig, IndexStore, brute_force_knn
from dictlearn.ray_cluster import local_ray_cluster
from launch.index import build
from tests.index.conftest import write_sae


@pytest.mark.slow  # a Ray cluster and two JAX processes: ~1 min on 2 cores, more when shared
def test_two_ray_hosts_build_the_exact_index(tmp_path: Path) -> None:
    sae = write_sae(tmp_path / "sae", 120, 16, seed=0)
    out = tmp_path / "idx"
    config = IndexConfig(
        sae=sae,
        out=str(out),
        k=5,
        block_size=40,
        key_chunk=16,
        mesh={"data": 2, "model": 2},
        ray={"hosts": 2, "devices_per_host": 2},
    )
    with local_ray_cluster(num_cpus=2):
        result = build(config)
    assert result.parts_written == 3
    manifest = IndexStore(str(out)).manifest()
    assert manifest is not None and manifest.digest == load_sae(sae).digest
    table = pq.ParquetDataset([str(out / p) for p in manifest.parts]).read()
    w = load_sae(sae).W_dec
    ref_ids, ref_cos = brute_force_knn(w, w, 5, exclude_self=True)
    np.testing.assert_array_equal(table["neighbor"].to_numpy(), ref_ids.reshape(-1))
    np.testing.assert_allclose(table["cosine"].to_numpy(), ref_cos.reshape(-1), rtol=1e-5)


def test_model_axis_across_hosts_is_refused_up_front(tmp_path: Path) -> None:
    sae = write_sae(tmp_path / "sae", 40, 8, seed=0)
    config = IndexConfig(
        sae=sae,
        out=str(tmp_path / "idx"),
        mesh={"data": 1, "model": 4},
        ray={"hosts": 2, "devices_per_host": 2},
    )
    with pytest.raises(ValueError, match=r"mesh\.model=4 spans hosts"):
        build(config)  # refused before any Ray cluster or actor is started
    assert not (tmp_path / "idx").exists()
