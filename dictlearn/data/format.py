"""The on-disk activation-shard format: writer, manifest, and random-access reader.

A dataset is a directory URL (local path or ``gs://bucket/prefix``)::

    shards/shard-00000.bin    raw little-endian row-major [n_tokens, d_model] float32 | bfloat16
    shards/shard-00000.json   sidecar (ShardInfo), written after the .bin: its presence commits it
                              (version 2: also a CRC32 per block of checksum_rows rows)
    ...
    manifest.json             DatasetManifest, written last: its presence commits the dataset

Writing is idempotent and crash-safe: a worker calls :func:`write_shard` per shard (re-running
overwrites), a coordinator collects the :class:`ShardInfo` sidecars and calls
:func:`commit_manifest`. Readers open the dataset with :meth:`ActivationDataset.open`, which checks
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

import json
import math
import warnings
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import fsspec
import ml_dtypes
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dictlearn.data import storage

FORMAT_NAME = "dictlearn.activations"
FORMAT_VERSION = 2
"""Version written. 2 added per-block CRC32s to the sidecars; version 1 is still read."""
READABLE_VERSIONS = (1, 2)
DEFAULT_CHECKSUM_ROWS = 64
"""Rows per checksummed block. Small enough that a reader whose blocks are not a multiple of it
reads few extra rows; large enough (64 x 640 bfloat16 = 80 KiB) that one zlib.crc32 call per block
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


class DatasetError(ValueError):
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


def _block_checksums(data: bytes, block_bytes: int) -> tuple[list[int], int]:
    """CRC32 of each ``block_bytes`` slice of ``data``, and of the whole, in one pass."""
    view = memoryview(data)
    blocks, whole = [], 0
    for offset in range(0, len(data), block_bytes):
        block = view[offset : offset + block_bytes]
        blocks.append(zlib.crc32(block))
        whole = zlib.crc32(block, whole)
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


def _load_manifest(url: str, fs: fsspec.AbstractFileSystem, root: str) -> DatasetManifest:
    where = _display(url, MANIFEST_NAME)
    raw = storage.read_bytes_or_none(fs, storage.join(root, MANIFEST_NAME))
    if raw is None:
        if not storage.exists(fs, root):
            raise DatasetError(
                f"no activation dataset at {url}: the path does not exist; check data.path, "
                "or write one with `dictlearn generate` (or `dictlearn planted`)"
            )
        raise DatasetError(
            f"no manifest.json at {url}: dataset not committed (was generation interrupted? "
            "re-run generate)"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: not valid JSON ({err}); re-run generate") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DatasetError(
            f"{where}: format {found!r} is not {FORMAT_NAME!r}; this URL is not a dictlearn "
            "activation dataset"
        )
    if data.get("version") not in READABLE_VERSIONS:
        raise DatasetError(
            f"{where}: format version {data.get('version')!r}, this dictlearn reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use a matching dictlearn or regenerate "
            "the dataset"
        )
    try:
        return DatasetManifest.model_validate(data)
    except ValidationError as err:
        raise DatasetError(f"{where}: malformed manifest ({err}); re-run generate") from err


_warned_unchecked: set[str] = set()


def _warn_unchecked(url: str) -> None:
    # Once per dataset and process: a trainer opens its dataset once, but tests and tools open
    # the same one many times and one line says all there is to say.
    if url not in _warned_unchecked:
        _warned_unchecked.add(url)
        warnings.warn(
            f"{url}: format version 1 has no block checksums, so reads cannot detect a corrupted "
            "shard; `dictlearn validate URL --deep` checks whole-shard CRCs, regenerating the "
            "dataset writes version 2",
            DatasetWarning,
            stacklevel=3,
        )


class _Checksums:
    """One shard's block checksums: ``rows`` rows per block, ``crc32[k]`` for block ``k``."""

    def __init__(self, rows: int, crc32: list[int]) -> None:
        self.rows = rows
        self.crc32 = np.asarray(crc32, np.uint32)

    def span(self, start: int, stop: int, n_tokens: int) -> tuple[int, int]:
        """The smallest run of whole blocks holding rows ``[start, stop)``."""
        return (start // self.rows) * self.rows, min(n_tokens, -(-stop // self.rows) * self.rows)

    def bad_blocks(self, first_row: int, blob: bytes, row_bytes: int) -> list[int]:
        """Blocks of ``blob`` (whole blocks from row ``first_row``) whose CRC32 differs."""
        view, step, first = memoryview(blob), self.rows * row_bytes, first_row // self.rows
        return [
            first + k
            for k, offset in enumerate(range(0, len(blob), step))
            if zlib.crc32(view[offset : offset + step]) != self.crc32[first + k]
        ]


class ActivationDataset:
    """A committed activation dataset, opened for random-access reads of float32 rows.

    Use :meth:`open`; the constructor does no I/O or checking.
    """

    def __init__(
        self, url: str, manifest: DatasetManifest, fs: fsspec.AbstractFileSystem, root: str
    ) -> None:
        self.url = url
        self.manifest = manifest
        self._fs = fs
        self._root = root
        self._dtype = numpy_dtype(manifest.dtype)
        self._row_bytes = manifest.d_model * self._dtype.itemsize
        # Per shard, from the sidecars (loaded by validate); empty for version 1.
        self._checksums: list[_Checksums] = []

    @classmethod
    def open(cls, url: str) -> ActivationDataset:
        """Open the dataset at ``url`` and cheaply validate it.

        Checks the manifest, every shard's size (one listing) and every sidecar's d_model/dtype
        (concurrent small reads), and loads the block checksums every read then verifies. Use
        :meth:`validate` with ``deep=True`` to check every checksum now.

        Raises:
            DatasetError: not committed, unknown format or version, or a shard inconsistent.
        """
        fs, root = storage.filesystem(url)
        dataset = cls(url, _load_manifest(url, fs, root), fs, root)
        dataset.validate(deep=False)
        if not dataset.checks_blocks:
            _warn_unchecked(url)
        return dataset

    @property
    def checks_blocks(self) -> bool:
        """Whether reads verify block checksums (format version 2 and later)."""
        return bool(self._checksums)

    @property
    def d_model(self) -> int:
        """Row width."""
        return self.manifest.d_model

    @property
    def n_tokens(self) -> int:
        """Total rows."""
        return self.manifest.n_tokens

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.manifest.shards)

    @property
    def mean(self) -> np.ndarray:
        """Mean row, ``[d_model]`` float32 (e.g. to initialise ``b_dec``)."""
        return np.asarray(self.manifest.stats.mean, np.float32)

    @property
    def norm_scale(self) -> float:
        """Scale that gives raw rows mean squared norm ``d_model``: ``sqrt(d_model / E||x||^2)``."""
        return math.sqrt(self.d_model / self.manifest.stats.mean_sq_norm)

    def shard_n_tokens(self, shard_index: int) -> int:
        """Rows in shard ``shard_index``."""
        return self.manifest.shards[shard_index].n_tokens

    def shard_url(self, shard_index: int) -> str:
        """Full URL of shard ``shard_index``'s data file (for messages and logs)."""
        return _display(self.url, self.manifest.shards[shard_index].path)

    def read_rows(self, shard_index: int, start: int, stop: int) -> np.ndarray:
        """Read rows ``[start, stop)`` of one shard with a single byte-range read.

        Returns:
            ``[stop - start, d_model]`` float32 array.

        Raises:
            DatasetError: the range is out of bounds, or the rows are corrupt.
        """
        return self.read_row_ranges([(shard_index, start, stop)])[0]

    def read_row_ranges(self, ranges: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """Read several ``(shard_index, start, stop)`` row ranges in one concurrent request batch.

        On GCS the ranges are fetched in parallel (``fs.cat_ranges``), which is what keeps a
        shuffled reader, which reads many scattered blocks, from paying one round trip each.
        Each range is widened to whole checksummed blocks (nothing to widen when its ends are
        multiples of the shard's ``checksum_rows``) and every block's CRC32 is checked.

        Returns:
            One float32 ``[stop - start, d_model]`` array per range, in order.

        Raises:
            DatasetError: a range is out of bounds, or a block fails its checksum (version 2), or
                rows hold NaN/Inf (version 1).
        """
        spans = []
        for shard_index, start, stop in ranges:
            if not 0 <= shard_index < self.num_shards:
                raise DatasetError(
                    f"{self.url}: shard {shard_index} out of range (dataset has "
                    f"{self.num_shards} shards)"
                )
            n = self.shard_n_tokens(shard_index)
            if not 0 <= start < stop <= n:
                raise DatasetError(
                    f"{self.shard_url(shard_index)}: rows [{start}, {stop}) out of range "
                    f"(shard has {n} rows)"
                )
            checksums = self._checksums[shard_index] if self._checksums else None
            spans.append(checksums.span(start, stop, n) if checksums else (start, stop))
        blobs = self._read_spans([r[0] for r in ranges], spans)
        out = []
        for (shard_index, start, stop), (lo, hi), blob in zip(ranges, spans, blobs, strict=True):
            if self._checksums and self._checksums[shard_index].bad_blocks(
                lo, blob, self._row_bytes
            ):
                # Read once more before failing: a fault in transit or in this host's memory
                # passes on a re-read, a corrupt object does not.
                blob = self._read_spans([shard_index], [(lo, hi)])[0]
                bad = self._checksums[shard_index].bad_blocks(lo, blob, self._row_bytes)
                if bad:
                    raise self._corrupt_error(shard_index, bad)
            out.append(self._decode(shard_index, lo, start, stop, blob))
        return out

    def _read_spans(self, shards: list[int], spans: list[tuple[int, int]]) -> list[bytes]:
        if not spans:
            return []
        paths = [storage.join(self._root, self.manifest.shards[i].path) for i in shards]
        starts = [lo * self._row_bytes for lo, _ in spans]
        ends = [hi * self._row_bytes for _, hi in spans]
        blobs = storage.read_ranges(self._fs, paths, starts, ends)
        for shard_index, (lo, hi), blob in zip(shards, spans, blobs, strict=True):
            if len(blob) != (hi - lo) * self._row_bytes:
                raise DatasetError(
                    f"{self.shard_url(shard_index)}: read {len(blob)} bytes for rows [{lo}, {hi}),"
                    f" expected {(hi - lo) * self._row_bytes} (file truncated since open?); "
                    "re-run generation for it"
                )
        return blobs

    def _corrupt_error(self, shard_index: int, bad: list[int]) -> DatasetError:
        rows = self._checksums[shard_index].rows
        n = self.shard_n_tokens(shard_index)
        first = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return DatasetError(
            f"{self.shard_url(shard_index)}: block {first} (rows [{first * rows}, "
            f"{min(n, (first + 1) * rows)})){more} fails its CRC32 check, the shard is corrupt; "
            f"`dictlearn validate {self.url} --deep` lists every bad block; to repair, delete "
            f"{_display(self.url, shard_info_name(shard_index))} and "
            f"{_display(self.url, MANIFEST_NAME)} and re-run the command that wrote the dataset "
            "(generate redoes only that shard)"
        )

    def _decode(self, shard_index: int, lo: int, start: int, stop: int, blob: bytes) -> np.ndarray:
        """Rows ``[start, stop)`` of ``blob``, which holds rows ``[lo, ...)`` of the shard."""
        rows = np.frombuffer(blob, self._dtype).reshape(-1, self.d_model)[start - lo : stop - lo]
        # With block checksums the bytes are exactly those write_shard stored, and it refused
        # NaN/Inf: only version 1 needs (and pays for) the scan.
        if not self._checksums and not np.isfinite(rows).all():
            bad = start + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise DatasetError(
                f"{self.shard_url(shard_index)}: NaN/Inf in rows [{start}, {stop}) (first at row "
                f"{bad}); the shard is corrupt, regenerate it"
            )
        # astype always copies here, giving the caller a writable float32 array.
        return rows.astype(np.float32)

    def validate(self, deep: bool = False) -> None:
        """Check the dataset's files against the manifest.

        Args:
            deep: Also read every shard in full and check every block checksum and the
                whole-shard CRC32 (version 1: the CRC32 and that every value is finite). Reads the
                whole dataset; what ``dictlearn validate --deep`` runs.

        Raises:
            DatasetError: naming the first inconsistent shard (with ``deep``: every corrupt
                block, over all shards) and what to do about it.
        """
        shards_dir = storage.join(self._root, SHARDS_DIR)
        sizes = storage.list_sizes(self._fs, shards_dir)
        for shard in self.manifest.shards:
            _check_bin_size(self.url, shard.index, shard.n_tokens * self._row_bytes, sizes)
            if shard.nbytes != shard.n_tokens * self._row_bytes:
                raise DatasetError(
                    f"{_display(self.url, MANIFEST_NAME)}: shard {shard.index} lists nbytes "
                    f"{shard.nbytes}, expected {shard.n_tokens * self._row_bytes}; re-run generate"
                )
        sidecar_paths = [
            storage.join(self._root, shard_info_name(s.index)) for s in self.manifest.shards
        ]
        sidecars = storage.read_many(self._fs, sidecar_paths)
        checksums = []
        for shard, raw in zip(self.manifest.shards, sidecars, strict=True):
            where = _display(self.url, shard_info_name(shard.index))
            if raw is None:
                raise DatasetError(f"{where}: sidecar missing; re-run generation for this shard")
            info = _parse_shard_info(raw, where)
            self._check_sidecar(shard, info, where)
            if self.manifest.version >= 2:
                if info.checksum_rows is None or info.block_crc32 is None:
                    raise DatasetError(
                        f"{where}: no block checksums, but the manifest is format version "
                        f"{self.manifest.version}; the shard was written by an older dictlearn, "
                        "delete it and manifest.json and re-run generation"
                    )
                checksums.append(_Checksums(info.checksum_rows, info.block_crc32))
        self._checksums = checksums
        if deep:
            bad = [(shard, self._check_contents(shard)) for shard in self.manifest.shards]
            bad = [(shard, blocks) for shard, blocks in bad if blocks]
            if bad:
                listed = "; ".join(
                    f"{shard.path} blocks {blocks[:10]}{' ...' if len(blocks) > 10 else ''}"
                    for shard, blocks in bad[:10]
                )
                sidecars = " ".join(shard_info_name(shard.index) for shard, _ in bad)
                raise DatasetError(
                    f"{self.url}: {sum(len(b) for _, b in bad)} corrupt blocks in {len(bad)} "
                    f"shards ({listed}); to repair, delete {sidecars} and {MANIFEST_NAME} there "
                    "and re-run the command that wrote the dataset (generate redoes only those "
                    "shards)"
                )

    def _check_sidecar(self, shard: ManifestShard, info: ShardInfo, where: str) -> None:
        for field, in_sidecar, in_manifest in (
            ("d_model", info.d_model, self.manifest.d_model),
            ("dtype", info.dtype, self.manifest.dtype),
            ("n_tokens", info.n_tokens, shard.n_tokens),
            ("crc32", info.crc32, shard.crc32),
        ):
            if in_sidecar != in_manifest:
                raise DatasetError(
                    f"{where}: {field} {in_sidecar!r} in the shard sidecar but {in_manifest!r} in "
                    f"the manifest; the shard was written by a different run, regenerate it and "
                    "re-commit the manifest"
                )

    def _check_contents(self, shard: ManifestShard) -> list[int]:
        """Read a whole shard; its corrupt blocks (version 1: raise on a bad CRC or value)."""
        checksums = self._checksums[shard.index] if self._checksums else None
        rows_per_chunk = max(1, _VALIDATE_CHUNK_BYTES // self._row_bytes)
        if checksums is not None:  # chunks of whole blocks
            rows_per_chunk = max(1, rows_per_chunk // checksums.rows) * checksums.rows
        crc, bad = 0, []
        for start in range(0, shard.n_tokens, rows_per_chunk):
            stop = min(shard.n_tokens, start + rows_per_chunk)
            blob = self._read_spans([shard.index], [(start, stop)])[0]
            crc = zlib.crc32(blob, crc)
            if checksums is not None:
                bad += checksums.bad_blocks(start, blob, self._row_bytes)
            else:
                self._decode(shard.index, start, start, stop, blob)
        if checksums is None and crc != shard.crc32:
            raise DatasetError(
                f"{self.shard_url(shard.index)}: CRC32 {crc} != {shard.crc32} recorded at write "
                "time (corrupt); regenerate this shard and re-commit the manifest"
            )
        if checksums is not None and not bad and crc != shard.crc32:
            # Every block matches its own CRC but the whole does not: the sidecar's checksums
            # were rewritten along with the data, e.g. by a different writer.
            raise DatasetError(
                f"{self.shard_url(shard.index)}: blocks match the sidecar but the shard's CRC32 "
                f"{crc} != {shard.crc32} in the manifest; regenerate this shard and re-commit "
                "the manifest"
            )
        return bad


def check_compatible(datasets: Sequence[ActivationDataset]) -> None:
    """Check that several datasets can be trained on together.

    Raises:
        DatasetError: their d_model, source_model or hook differ, e.g. ``mixing d_model 640
            (gs://a) with 2304 (gs://b)``.
    """
    if not datasets:
        return
    first = datasets[0]
    for other in datasets[1:]:
        a, b = first.manifest, other.manifest
        for field, mine, theirs in (
            ("d_model", a.d_model, b.d_model),
            ("source_model", a.source_model, b.source_model),
            ("hook", a.hook, b.hook),
        ):
            if mine != theirs:
                raise DatasetError(
                    f"mixing {field} {mine!r} ({first.url}) with {theirs!r} ({other.url}); "
                    "train on datasets from one model and hook point"
                )
