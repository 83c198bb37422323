"""Activation datasets: the on-disk shard format, deterministic batch streams, planted data.

- :mod:`dictlearn.data.format`: the files; write shards, commit manifests.
- :mod:`dictlearn.data.dataset`: open, read (block checksums checked) and validate datasets.
- :mod:`dictlearn.data.storage`: the fsspec operations they use, retrying storage faults.
- :mod:`dictlearn.data.reader`: seeded, resumable global batches, sliced per process.
- :mod:`dictlearn.data.planted`: synthetic datasets with a known dictionary, and how well an
  SAE recovered it.

The format is specified in ``docs/activation_format.md``.
"""

from dictlearn.data.dataset import ActivationDataset, check_compatible
from dictlearn.data.format import (
    DatasetError,
    DatasetManifest,
    DatasetStats,
    DatasetWarning,
    ManifestShard,
    ShardInfo,
    commit_manifest,
    read_shard_info,
    read_shard_infos,
    write_shard,
)
from dictlearn.data.planted import (
    PlantedConfig,
    PlantedTruth,
    load_planted_truth,
    recovery_score,
    write_planted_dataset,
)
from dictlearn.data.reader import BatchStream
from dictlearn.data.storage import StorageError

__all__ = [
    "ActivationDataset",
    "BatchStream",
    "DatasetError",
    "DatasetManifest",
    "DatasetStats",
    "DatasetWarning",
    "ManifestShard",
    "PlantedConfig",
    "PlantedTruth",
    "ShardInfo",
    "StorageError",
    "check_compatible",
    "commit_manifest",
    "load_planted_truth",
    "read_shard_info",
    "read_shard_infos",
    "recovery_score",
    "write_planted_dataset",
    "write_shard",
]
