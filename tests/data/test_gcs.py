"""The format and reader on gs:// (fake-gcs-server), plus tensorstore for Orbax's sake."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from dictlearn.data import (
    ActivationDataset,
    BatchStream,
    DatasetError,
    PlantedConfig,
    load_planted_truth,
    read_shard_info,
    write_planted_dataset,
    write_shard,
)

pytest_plugins = ["tests.gcs_emulator"]

CFG = PlantedConfig(
    d_model=16,
    n_features=32,
    n_tokens=5000,
    mean_active=3,
    seed=0,
    shard_tokens=2048,
    dtype="bfloat16",
)


def _batches(ds: ActivationDataset, n: int, **kw: int) -> list[np.ndarray]:
    with BatchStream(ds, global_batch=64, seed=2, block_rows=32, shuffle_blocks=4, **kw) as s:
        return list(itertools.islice(s, n))


def test_gcs_round_trip_and_reader_match_local(gcs_url: str, tmp_path: Path) -> None:
    truth = write_planted_dataset(gcs_url, CFG)
    write_planted_dataset(str(tmp_path), CFG)
    remote, local = ActivationDataset.open(gcs_url), ActivationDataset.open(str(tmp_path))
    remote.validate(deep=True)
    assert remote.manifest == local.manifest
    np.testing.assert_array_equal(remote.read_rows(2, 100, 300), local.read_rows(2, 100, 300))
    np.testing.assert_array_equal(load_planted_truth(gcs_url).directions, truth.directions)
    # Plain fsspec reaches the emulator too (what other modules and Orbax helpers use).
    with fsspec.open(f"{gcs_url}/manifest.json") as f:
        assert json.load(f)["hook"] == "planted"

    n = 20
    for remote_batch, local_batch in zip(_batches(remote, n), _batches(local, n), strict=True):
        np.testing.assert_array_equal(remote_batch, local_batch)
    halves = [_batches(remote, n, process_index=p, process_count=2) for p in range(2)]
    for step, whole in enumerate(_batches(local, n)):
        np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), whole)


def test_gcs_errors_name_the_file(gcs_url: str) -> None:
    info = write_shard(gcs_url, 0, np.ones((64, 4), np.float32), "float32")
    assert read_shard_info(gcs_url, 0) == info
    assert read_shard_info(gcs_url, 1) is None
    with pytest.raises(DatasetError, match=f"no manifest.json at {gcs_url}"):
        ActivationDataset.open(gcs_url)


def test_tensorstore_writes_to_the_emulator(gcs_url: str) -> None:
    """Orbax writes arrays with tensorstore; check that it reaches the same fake bucket."""
    ts = pytest.importorskip("tensorstore")
    bucket, _, prefix = gcs_url.removeprefix("gs://").partition("/")
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/a/"},
    }
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    ts.open(spec, create=True, dtype=ts.float32, shape=[4, 3]).result().write(values).result()
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), values)
    assert fsspec.filesystem("gs").exists(f"{bucket}/{prefix}/a/.zarray")
