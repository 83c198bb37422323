"""The on-disk activation-shard format: writer, manifest, and random-access reader.

A dataset is a directory URL (local path or ``gs://bucket/prefix``)::

    shards/shard-00000.bin    raw little-endian row-major [n_tokens, d_model] float32 | bfloat16
    shards/shard-00000.json   sidecar (ShardInfo), written after the .bin: its presence commits it
    ...
    manifest.json             DatasetManifest, written last: its presence commits the dataset

Writing is idempotent and crash-safe: a worker calls :func:`write_shard` per shard (re-running
overwrites), a coordinator collects the :class:`ShardInfo` sidecars and calls
:func:`commit_manifest`. Readers open the dataset with :meth:`ActivationDataset.open`, which checks
every shard's size against the manifest in one listing, and read rows by byte range. The full
specification is ``docs/activation_format.md``.

    write_shard("gs://b/acts", 0, rows, "bfloat16")
    commit_manifest("gs://b/acts", [read_shard_info("gs://b/acts", 0)], source_model="gemma3-270m",
                    hook="resid_post.6", layer=6)
    ds = ActivationDataset.open("gs://b/acts")
    x = ds.read_rows(0, 0, 256) * ds.norm_scale
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import fsspec
import ml_dtypes
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dictlearn.data import storage
from dictlearn.errors import UserError

FORMAT_NAME = "dictlearn.activations"
FORMAT_VERSION = 1
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

    @model_validator(mode="after")
    def _check_consistent(self) -> ShardInfo:
        if len(self.sum) != self.d_model:
            raise ValueError(f"sum has {len(self.sum)} entries, d_model is {self.d_model}")
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
    version: Literal[1] = Field(description="Format version.")
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


def write_shard(dataset_url: str, index: int, array: np.ndarray, dtype: str) -> ShardInfo:
    """Write one shard and its sidecar, atomically and idempotently.

    The sidecar is removed first and written last, so at every instant either the old shard,
    nothing, or the new shard is committed; re-running a worker simply overwrites.

    Args:
        dataset_url: Dataset root URL.
        index: Shard number (>= 0).
        array: ``[n_tokens, d_model]`` floating-point rows; cast to ``dtype`` for storage.
        dtype: ``"float32"`` or ``"bfloat16"``.

    Returns:
        The committed sidecar. Its statistics are computed on the stored (cast) values, so they
        agree exactly with what readers get back.

    Raises:
        DatasetError: ``array`` is not 2-D and non-empty, or holds NaN/Inf after the cast.
    """
    if index < 0:
        raise DatasetError(f"shard index must be >= 0, got {index}")
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
    info = ShardInfo(
        index=index,
        n_tokens=stored.shape[0],
        d_model=stored.shape[1],
        dtype=dtype,  # type: ignore[arg-type]  # checked by numpy_dtype above
        nbytes=len(data),
        crc32=zlib.crc32(data),
        sum=row_sum.tolist(),
        sum_sq_norm=sq,
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

    n_tokens = sum(info.n_tokens for info in infos)
    total = np.sum([np.asarray(info.sum, np.float64) for info in infos], axis=0)
    sum_sq = math.fsum(info.sum_sq_norm for info in infos)
    if sum_sq <= 0:
        raise DatasetError(f"{dataset_url}: every row is zero; the activations are not usable")
    manifest = DatasetManifest(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
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
        if not fs.exists(root):
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
    if data.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{where}: format version {data.get('version')!r}, this dictlearn reads version "
            f"{FORMAT_VERSION}; use a matching dictlearn or regenerate the dataset"
        )
    try:
        return DatasetManifest.model_validate(data)
    except ValidationError as err:
        raise DatasetError(f"{where}: malformed manifest ({err}); re-run generate") from err


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

    @classmethod
    def open(cls, url: str) -> ActivationDataset:
        """Open the dataset at ``url`` and cheaply validate it.

        Checks the manifest, every shard's size (one listing) and every sidecar's d_model/dtype
        (concurrent small reads). Use :meth:`validate` with ``deep=True`` to also check CRCs.

        Raises:
            DatasetError: not committed, unknown format or version, or a shard inconsistent.
        """
        fs, root = storage.filesystem(url)
        dataset = cls(url, _load_manifest(url, fs, root), fs, root)
        dataset.validate(deep=False)
        return dataset

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
            DatasetError: the range is out of bounds, or the rows hold NaN/Inf.
        """
        return self.read_row_ranges([(shard_index, start, stop)])[0]

    def read_row_ranges(self, ranges: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """Read several ``(shard_index, start, stop)`` row ranges in one concurrent request batch.

        On GCS the ranges are fetched in parallel (``fs.cat_ranges``), which is what keeps a
        shuffled reader, which reads many scattered blocks, from paying one round trip each.

        Returns:
            One float32 ``[stop - start, d_model]`` array per range, in order.

        Raises:
            DatasetError: a range is out of bounds, or rows hold NaN/Inf.
        """
        paths, starts, ends = [], [], []
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
            paths.append(storage.join(self._root, self.manifest.shards[shard_index].path))
            starts.append(start * self._row_bytes)
            ends.append(stop * self._row_bytes)
        blobs = self._fs.cat_ranges(paths, starts, ends, on_error="raise") if paths else []
        return [
            self._decode(shard_index, start, stop, blob)
            for (shard_index, start, stop), blob in zip(ranges, blobs, strict=True)
        ]

    def _decode(self, shard_index: int, start: int, stop: int, blob: bytes) -> np.ndarray:
        expected = (stop - start) * self._row_bytes
        if len(blob) != expected:
            raise DatasetError(
                f"{self.shard_url(shard_index)}: read {len(blob)} bytes for rows [{start}, {stop}),"
                f" expected {expected} (file truncated since open?); re-run generation for it"
            )
        rows = np.frombuffer(blob, self._dtype).reshape(stop - start, self.d_model)
        if not np.isfinite(rows).all():
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
            deep: Also read every shard in full to check its CRC32 and that every value is
                finite (reads the whole dataset; meant for a one-off check after generation).

        Raises:
            DatasetError: naming the first inconsistent shard and what to do about it.
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
        for shard, raw in zip(self.manifest.shards, sidecars, strict=True):
            where = _display(self.url, shard_info_name(shard.index))
            if raw is None:
                raise DatasetError(f"{where}: sidecar missing; re-run generation for this shard")
            self._check_sidecar(shard, _parse_shard_info(raw, where), where)
        if deep:
            for shard in self.manifest.shards:
                self._check_contents(shard)

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

    def _check_contents(self, shard: ManifestShard) -> None:
        rows_per_chunk = max(1, _VALIDATE_CHUNK_BYTES // self._row_bytes)
        crc = 0
        for start in range(0, shard.n_tokens, rows_per_chunk):
            stop = min(shard.n_tokens, start + rows_per_chunk)
            path = storage.join(self._root, shard.path)
            blob = self._fs.cat_file(
                path, start=start * self._row_bytes, end=stop * self._row_bytes
            )
            crc = zlib.crc32(blob, crc)
            self._decode(shard.index, start, stop, blob)
        if crc != shard.crc32:
            raise DatasetError(
                f"{self.shard_url(shard.index)}: CRC32 {crc} != {shard.crc32} recorded at write "
                "time (corrupt); regenerate this shard and re-commit the manifest"
            )


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
