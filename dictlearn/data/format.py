"""The on-disk activation-shard format: the files, the shard writer and the manifest.

A dataset is a directory URL (local path or ``gs://bucket/prefix``)::

    shards/shard-00000.bin    raw little-endian row-major [n_tokens, d_model] float32 | bfloat16
    shards/shard-00000.json   sidecar (ShardInfo), written after the .bin: its presence commits it
                              (version 2: also a CRC32 per block of checksum_rows rows)
    ...
    manifest.json             DatasetManifest, written last: its presence commits the dataset

Writing is idempotent and crash-safe: a worker calls :func:`write_shard` per shard (re-running
overwrites), a coordinator collects the :class:`ShardInfo` sidecars and calls
:func:`commit_manifest`. Readers open the dataset with :meth:`ActivationDataset.open`
(:mod:`dictlearn.data.dataset`), which checks
every shard's size against the manifest in one listing, and read rows by byte range; every read
checks the CRC32 of each block of rows it touches, so a corrupted shard of the right size fails
with an error naming the shard and block instead of training on garbage. Version-1 datasets (no
block checksums) are still read, with a one-time warning. The full specification is
``docs/activation_format.md``.

    write_shard("gs://b/acts", 0, rows, "bfloat16")
    commit_manifest("gs://b/acts", [read_shard_info("gs://b/acts", 0)], source_model="gemma3-270m",
                    hook="resid_post.6", layer=6)
    ds = ActivationDataset.open("gs://b/acts")
    x = ds.read_rows(0, 0, 256) * ds.norm_scale
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import ml_dtypes
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from zlib_ng import zlib_ng as _zlib_ng

from dictlearn.data import storage
from dictlearn.errors import UserError

FORMAT_NAME = "dictlearn.activations"
FORMAT_VERSION = 2
"""Version written. 2 added per-block CRC32s to the sidecars; version 1 is still read."""
READABLE_VERSIONS = (1, 2)
DEFAULT_CHECKSUM_ROWS = 64
"""Rows per checksummed block. Small enough that a reader whose blocks are not a multiple of it
reads few extra rows; large enough (64 x 640 bfloat16 = 80 KiB) that one CRC-32 call per block
costs nothing beside the read. The reader's default block_rows (256) is a multiple, so its reads
are aligned and fetch no extra byte."""
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"

DType = Literal["float32", "bfloat16"]
"""Storage dtypes. Rows are always returned as float32."""

# Explicit little-endian float32; bfloat16 has no byte-order variants in ml_dtypes and is stored
# in host order, which is little-endian on every machine this runs on (x86, ARM, TPU hosts).
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

# Rows per chunk when computing statistics or validating a whole shard: bounds the float64 copy
# and the bytes held at once, whatever the shard size.
_STAT_CHUNK_ROWS = 65536
_VALIDATE_CHUNK_BYTES = 64 << 20


class DatasetError(UserError):
    """An activation dataset or shard is missing, malformed or inconsistent.

    The message names the offending file and says how to fix it.
    """


class DatasetWarning(UserWarning):
    """A dataset is usable but weaker than the current format (e.g. no block checksums)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Strict):
    """The sidecar ``shards/shard-NNNNN.json``: what a shard holds, written after its ``.bin``.

    Statistics are sums, not means, so a coordinator can combine shards written by different
    workers exactly.
    """

    index: int = Field(ge=0, description="Shard number; the file is shards/shard-{index:05d}.bin.")
    n_tokens: int = Field(gt=0, description="Rows in the shard.")
    d_model: int = Field(gt=0, description="Row width.")
    dtype: DType = Field(description="Storage dtype of the .bin.")
    nbytes: int = Field(gt=0, description="Size of the .bin: n_tokens * d_model * itemsize.")
    crc32: int = Field(ge=0, description="zlib.crc32 of the .bin bytes.")
    sum: list[float] = Field(description="Float64 sum of the rows, d_model entries.")
    sum_sq_norm: float = Field(ge=0, description="Sum over rows of ||row||^2.")
    checksum_rows: int | None = Field(
        default=None,
        gt=0,
        description="Rows per checksummed block (format version 2); null in version-1 shards.",
    )
    block_crc32: list[int] | None = Field(
        default=None,
        description="zlib.crc32 of each block of checksum_rows rows, in order (the last block "
        "may be shorter); null in version-1 shards.",
    )

    @model_validator(mode="after")
    def _check_consistent(self) -> ShardInfo:
        if len(self.sum) != self.d_model:
            raise ValueError(f"sum has {len(self.sum)} entries, d_model is {self.d_model}")
        if (self.checksum_rows is None) != (self.block_crc32 is None):
            raise ValueError("checksum_rows and block_crc32 must be given together")
        if self.checksum_rows is not None and self.block_crc32 is not None:
            blocks = -(-self.n_tokens // self.checksum_rows)
            if len(self.block_crc32) != blocks:
                raise ValueError(
                    f"block_crc32 has {len(self.block_crc32)} entries, expected {blocks} "
                    f"(n_tokens {self.n_tokens} / checksum_rows {self.checksum_rows})"
                )
        expected = self.n_tokens * self.d_model * _NUMPY_DTYPES[self.dtype].itemsize
        if self.nbytes != expected:
            raise ValueError(f"nbytes {self.nbytes} != n_tokens * d_model * itemsize = {expected}")
        return self


class ManifestShard(_Strict):
    """One shard as listed in the manifest."""

    index: int = Field(ge=0, description="Shard number, equal to its position in the list.")
    path: str = Field(description="Path of the .bin relative to the dataset root.")
    n_tokens: int = Field(gt=0, description="Rows in the shard.")
    nbytes: int = Field(gt=0, description="Size of the .bin in bytes.")
    crc32: int = Field(ge=0, description="zlib.crc32 of the .bin bytes.")


class DatasetStats(_Strict):
    """Whole-dataset statistics, combined from the shard sidecars."""

    mean: list[float] = Field(description="Mean row, d_model entries.")
    mean_sq_norm: float = Field(gt=0, description="Mean over rows of ||row||^2.")


class DatasetManifest(_Strict):
    """``manifest.json``: written last; its existence means the dataset is complete."""

    format: Literal["dictlearn.activations"] = Field(description="Always dictlearn.activations.")
    version: Literal[1, 2] = Field(
        description="Format version: 2 has per-block checksums in the sidecars, 1 does not."
    )
    d_model: int = Field(gt=0, description="Row width.")
    dtype: DType = Field(description="Storage dtype of every shard.")
    n_tokens: int = Field(gt=0, description="Total rows over all shards.")
    source_model: str = Field(description="Model the activations come from ('planted' if none).")
    hook: str = Field(description="Hook point, e.g. 'resid_post.6'.")
    layer: int | None = Field(description="Layer number of the hook, if it has one.")
    shards: list[ManifestShard] = Field(description="Shards in index order, indices 0..n-1.")
    stats: DatasetStats = Field(description="Mean row and mean squared norm.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form provenance.")

    @model_validator(mode="after")
    def _check_consistent(self) -> DatasetManifest:
        for position, shard in enumerate(self.shards):
            if shard.index != position:
                raise ValueError(f"shards[{position}] has index {shard.index}")
        if not self.shards:
            raise ValueError("no shards")
        total = sum(shard.n_tokens for shard in self.shards)
        if total != self.n_tokens:
            raise ValueError(f"n_tokens {self.n_tokens} != sum of shard n_tokens {total}")
        if len(self.stats.mean) != self.d_model:
            raise ValueError(
                f"stats.mean has {len(self.stats.mean)} entries, d_model {self.d_model}"
            )
        return self


def shard_bin_name(index: int) -> str:
    """Relative path of shard ``index``'s data file."""
    return f"{SHARDS_DIR}/shard-{index:05d}.bin"


def shard_info_name(index: int) -> str:
    """Relative path of shard ``index``'s sidecar."""
    return f"{SHARDS_DIR}/shard-{index:05d}.json"


def _display(url: str, relative: str) -> str:
    return f"{url.rstrip('/')}/{relative}"


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a storage dtype name stands for."""
    if dtype not in _NUMPY_DTYPES:
        raise DatasetError(f"unsupported dtype {dtype!r}; use one of {sorted(_NUMPY_DTYPES)}")
    return _NUMPY_DTYPES[dtype]


def _row_stats(rows: np.ndarray) -> tuple[np.ndarray, float]:
    total = np.zeros(rows.shape[1], np.float64)
    sq = 0.0
    for start in range(0, rows.shape[0], _STAT_CHUNK_ROWS):
        chunk = rows[start : start + _STAT_CHUNK_ROWS].astype(np.float64)
        total += chunk.sum(axis=0)
        sq += float(np.einsum("ij,ij->", chunk, chunk))
    return total, sq


def compute_crc32(data: bytes | memoryview, value: int = 0) -> int:
    """``zlib.crc32(data, value)``: the same CRC-32, the shard format's checksum, computed by
    zlib-ng's vectorised code. CPython's zlib (1.2.13 here) runs at 2-3 GB/s, 40-65 % of the
    train stream's time per batch; zlib-ng at ~50 GB/s on data in cache (``docs/gpu.md``)."""
    return _zlib_ng.crc32(data, value)


def _block_checksums(data: bytes, block_bytes: int) -> tuple[list[int], int]:
    """CRC32 of each ``block_bytes`` slice of ``data``, and of the whole, in one pass."""
    view = memoryview(data)
    blocks, whole = [], 0
    for offset in range(0, len(data), block_bytes):
        block = view[offset : offset + block_bytes]
        blocks.append(compute_crc32(block))
        whole = compute_crc32(block, whole)
    return blocks, whole


def write_shard(
    dataset_url: str,
    index: int,
    array: np.ndarray,
    dtype: str,
    *,
    checksum_rows: int = DEFAULT_CHECKSUM_ROWS,
) -> ShardInfo:
    """Write one shard and its sidecar, atomically and idempotently.

    The sidecar is removed first and written last, so at every instant either the old shard,
    nothing, or the new shard is committed; re-running a worker simply overwrites.

    Args:
        dataset_url: Dataset root URL.
        index: Shard number (>= 0).
        array: ``[n_tokens, d_model]`` floating-point rows; cast to ``dtype`` for storage.
        dtype: ``"float32"`` or ``"bfloat16"``.
        checksum_rows: Rows per checksummed block (a CRC32 each, checked on every read).

    Returns:
        The committed sidecar. Its statistics are computed on the stored (cast) values, so they
        agree exactly with what readers get back.

    Raises:
        DatasetError: ``array`` is not 2-D and non-empty, or holds NaN/Inf after the cast.
    """
    if index < 0:
        raise DatasetError(f"shard index must be >= 0, got {index}")
    if checksum_rows < 1:
        raise DatasetError(f"checksum_rows must be >= 1, got {checksum_rows}")
    target = numpy_dtype(dtype)
    array = np.asarray(array)
    bin_url = _display(dataset_url, shard_bin_name(index))
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DatasetError(f"{bin_url}: rows must be a non-empty 2-D array, got {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        stored = np.ascontiguousarray(array, dtype=target)
    if not np.isfinite(stored).all():
        bad = np.flatnonzero(~np.isfinite(stored).all(axis=1))
        raise DatasetError(
            f"{bin_url}: {bad.size} rows hold NaN/Inf after casting to {dtype} (first row "
            f"{bad[0]}); fix the producer, or store float32 if bfloat16 overflowed"
        )
    data = stored.tobytes()
    row_sum, sq = _row_stats(stored)
    block_crc32, crc32 = _block_checksums(data, checksum_rows * stored.shape[1] * target.itemsize)
    info = ShardInfo(
        index=index,
        n_tokens=stored.shape[0],
        d_model=stored.shape[1],
        dtype=dtype,  # type: ignore[arg-type]  # checked by numpy_dtype above
        nbytes=len(data),
        crc32=crc32,
        sum=row_sum.tolist(),
        sum_sq_norm=sq,
        checksum_rows=checksum_rows,
        block_crc32=block_crc32,
    )
    fs, root = storage.filesystem(dataset_url)
    sidecar = storage.join(root, shard_info_name(index))
    storage.remove_if_exists(fs, sidecar)
    storage.write_bytes_atomic(fs, storage.join(root, shard_bin_name(index)), data)
    storage.write_bytes_atomic(fs, sidecar, info.model_dump_json().encode())
    return info


def _parse_shard_info(raw: bytes, where: str) -> ShardInfo:
    try:
        return ShardInfo.model_validate_json(raw)
    except ValidationError as err:
        raise DatasetError(
            f"{where}: malformed shard sidecar ({err}); delete it and re-run generation for "
            "this shard"
        ) from err


def read_shard_info(dataset_url: str, index: int) -> ShardInfo | None:
    """Return shard ``index``'s sidecar, or None if that shard is not committed."""
    fs, root = storage.filesystem(dataset_url)
    raw = storage.read_bytes_or_none(fs, storage.join(root, shard_info_name(index)))
    if raw is None:
        return None
    return _parse_shard_info(raw, _display(dataset_url, shard_info_name(index)))


def read_shard_infos(dataset_url: str) -> dict[int, ShardInfo]:
    """Return every committed shard's sidecar, keyed by index (one listing, concurrent reads).

    What a coordinator calls to see which shards are done before committing the manifest.
    """
    fs, root = storage.filesystem(dataset_url)
    shards_dir = storage.join(root, SHARDS_DIR)
    names = [
        name
        for name in storage.list_sizes(fs, shards_dir)
        if name.startswith("shard-") and name.endswith(".json")
    ]
    if not names:
        return {}
    contents = storage.read_many(fs, [storage.join(shards_dir, name) for name in names])
    infos = {}
    for name, content in zip(names, contents, strict=True):
        if content is None:  # deleted between the listing and the read: not committed
            continue
        info = _parse_shard_info(content, _display(dataset_url, f"{SHARDS_DIR}/{name}"))
        infos[info.index] = info
    return dict(sorted(infos.items()))


def commit_manifest(
    dataset_url: str,
    shard_infos: Iterable[ShardInfo],
    *,
    source_model: str,
    hook: str,
    layer: int | None,
    metadata: dict[str, Any] | None = None,
) -> DatasetManifest:
    """Combine the shards' statistics and write ``manifest.json``, committing the dataset.

    Args:
        dataset_url: Dataset root URL.
        shard_infos: The sidecars of shards 0..n-1 (any order), e.g. from :func:`write_shard`
            or :func:`read_shard_infos`.
        source_model: Name of the model the activations come from.
        hook: Hook point name, e.g. ``"resid_post.6"``.
        layer: The hook's layer, or None.
        metadata: Free-form JSON-serialisable provenance (corpus, config, versions).

    Returns:
        The manifest written.

    Raises:
        DatasetError: shards missing or duplicated, d_model/dtype disagreeing, or a shard's file
            absent or of the wrong size.
    """
    infos = sorted(shard_infos, key=lambda info: info.index)
    if not infos:
        raise DatasetError(f"{dataset_url}: cannot commit a dataset with no shards")
    indices = [info.index for info in infos]
    if len(set(indices)) != len(indices):
        raise DatasetError(f"{dataset_url}: duplicate shard indices in {indices}")
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        raise DatasetError(
            f"{dataset_url}: shards {missing[:10]} are not committed; re-run generation for them "
            "before committing the manifest"
        )
    first = infos[0]
    for info in infos[1:]:
        if (info.d_model, info.dtype) != (first.d_model, first.dtype):
            raise DatasetError(
                f"{_display(dataset_url, shard_info_name(info.index))}: d_model {info.d_model} "
                f"dtype {info.dtype}, but shard 0 has d_model {first.d_model} dtype "
                f"{first.dtype}; regenerate it with the dataset's settings"
            )
    fs, root = storage.filesystem(dataset_url)
    sizes = storage.list_sizes(fs, storage.join(root, SHARDS_DIR))
    for info in infos:
        _check_bin_size(dataset_url, info.index, info.nbytes, sizes)

    # Shards written before version 2 (a generation resumed across an upgrade) have no block
    # checksums: the dataset is still valid, as version 1, which readers accept with a warning.
    unchecked = [info.index for info in infos if info.block_crc32 is None]
    if unchecked:
        warnings.warn(
            f"{dataset_url}: shards {unchecked[:10]} have no block checksums (written by an older "
            "dictlearn); committing format version 1, whose reads cannot detect corruption. "
            "Regenerate those shards to get version 2.",
            DatasetWarning,
            stacklevel=2,
        )
    n_tokens = sum(info.n_tokens for info in infos)
    total = np.sum([np.asarray(info.sum, np.float64) for info in infos], axis=0)
    sum_sq = math.fsum(info.sum_sq_norm for info in infos)
    if sum_sq <= 0:
        raise DatasetError(f"{dataset_url}: every row is zero; the activations are not usable")
    manifest = DatasetManifest(
        format=FORMAT_NAME,
        version=1 if unchecked else FORMAT_VERSION,
        d_model=first.d_model,
        dtype=first.dtype,
        n_tokens=n_tokens,
        source_model=source_model,
        hook=hook,
        layer=layer,
        shards=[
            ManifestShard(
                index=info.index,
                path=shard_bin_name(info.index),
                n_tokens=info.n_tokens,
                nbytes=info.nbytes,
                crc32=info.crc32,
            )
            for info in infos
        ],
        stats=DatasetStats(mean=(total / n_tokens).tolist(), mean_sq_norm=sum_sq / n_tokens),
        metadata=metadata or {},
    )
    storage.write_bytes_atomic(
        fs, storage.join(root, MANIFEST_NAME), manifest.model_dump_json(indent=1).encode()
    )
    return manifest


def _check_bin_size(dataset_url: str, index: int, expected: int, sizes: dict[str, int]) -> None:
    name = shard_bin_name(index)
    actual = sizes.get(name.rsplit("/", 1)[-1])
    if actual is None:
        raise DatasetError(
            f"{_display(dataset_url, name)}: shard file is missing; re-run generation for shard "
            f"{index}"
        )
    if actual != expected:
        raise DatasetError(
            f"{_display(dataset_url, name)}: {actual} bytes, expected {expected} "
            f"(truncated or corrupt); delete it and its .json and re-run generation for shard "
            f"{index}"
        )
