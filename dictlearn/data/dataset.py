"""Reading a committed activation dataset: :class:`ActivationDataset` (open, read, validate).

    ds = ActivationDataset.open("gs://b/acts")    # manifest, shard sizes, sidecars: cheap
    x = ds.read_rows(0, 0, 256) * ds.norm_scale   # one byte-range read, block checksums checked
    ds.validate(deep=True)                        # every block checksum: reads everything

The files and their writer are in :mod:`dictlearn.data.format`; the specification is
``docs/activation_format.md``.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
from pydantic import ValidationError

from dictlearn.data import storage
from dictlearn.data.format import (
    _VALIDATE_CHUNK_BYTES,
    FORMAT_NAME,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    SHARDS_DIR,
    DatasetError,
    DatasetManifest,
    DatasetWarning,
    ManifestShard,
    ShardInfo,
    _check_bin_size,
    _display,
    _parse_shard_info,
    compute_crc32,
    numpy_dtype,
    shard_info_name,
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


_thread_scratch = threading.local()


def _scratch(nbytes: int) -> memoryview:
    """This thread's reusable byte buffer for local reads, at least ``nbytes`` long."""
    buffer = getattr(_thread_scratch, "buffer", None)
    if buffer is None or buffer.size < nbytes:
        buffer = np.empty(nbytes, np.uint8)
        _thread_scratch.buffer = buffer
    return memoryview(buffer)[:nbytes]


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous ``array``, writable in place."""
    return memoryview(array.reshape(-1).view(np.uint8))


class _Checksums:
    """One shard's block checksums: ``rows`` rows per block, ``crc32[k]`` for block ``k``."""

    def __init__(self, rows: int, crc32: list[int]) -> None:
        self.rows = rows
        self.crc32 = np.asarray(crc32, np.uint32)

    def span(self, start: int, stop: int, n_tokens: int) -> tuple[int, int]:
        """The smallest run of whole blocks holding rows ``[start, stop)``."""
        return (start // self.rows) * self.rows, min(n_tokens, -(-stop // self.rows) * self.rows)

    def bad_blocks(self, first_row: int, blob: bytes | memoryview, row_bytes: int) -> list[int]:
        """Blocks of ``blob`` (whole blocks from row ``first_row``) whose CRC32 differs."""
        view, step, first = memoryview(blob), self.rows * row_bytes, first_row // self.rows
        return [
            first + k
            for k, offset in enumerate(range(0, len(blob), step))
            if compute_crc32(view[offset : offset + step]) != self.crc32[first + k]
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
    def storage_dtype(self) -> np.dtype:
        """The rows' dtype in the shard files (float32 or bfloat16)."""
        return self._dtype

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

    def read_row_ranges(
        self,
        ranges: Sequence[tuple[int, int, int]],
        out: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Read several ``(shard_index, start, stop)`` row ranges in one concurrent request batch.

        On GCS the ranges are fetched in parallel (``fs.cat_ranges``), which is what keeps a
        shuffled reader, which reads many scattered blocks, from paying one round trip each.
        Each range is widened to whole checksummed blocks (nothing to widen when its ends are
        multiples of the shard's ``checksum_rows``) and every block's CRC32 is checked.

        Args:
            ranges: ``(shard_index, start, stop)`` per range.
            out: Optional ``[stop - start, d_model]`` array per range to decode into (saves a
                copy when the caller has a buffer waiting), float32 or the storage dtype (then
                the rows are copied as stored; from local storage, a contiguous array is read
                into directly); float32 arrays are allocated when None.

        Returns:
            One ``[stop - start, d_model]`` array per range, in order: ``out`` if given, else
            new float32 arrays.

        Raises:
            DatasetError: a range is out of bounds, or a block fails its checksum (version 2), or
                rows hold NaN/Inf (version 1).
        """
        if out is not None and len(out) != len(ranges):
            raise ValueError(f"out has {len(out)} arrays for {len(ranges)} ranges")
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
        targets = list(out) if out is not None else [None] * len(ranges)
        # A target that holds exactly the span's bytes as stored receives them directly: no
        # scratch buffer, no decoding copy.
        direct = [
            target
            if target is not None
            and target.dtype == self._dtype
            and target.flags.c_contiguous
            and span == (start, stop)
            and target.shape == (stop - start, self.d_model)
            else None
            for (_, start, stop), span, target in zip(ranges, spans, targets, strict=True)
        ]
        blobs = self._span_reader([r[0] for r in ranges], spans, direct)
        decoded = []
        for (shard_index, start, stop), (lo, hi), blob, target, into in zip(
            ranges, spans, blobs, targets, direct, strict=True
        ):
            if self._checksums and self._checksums[shard_index].bad_blocks(
                lo, blob, self._row_bytes
            ):
                # Read once more before failing: a fault in transit or in this host's memory
                # passes on a re-read, a corrupt object does not.
                blob = self._read_spans([shard_index], [(lo, hi)])[0]
                bad = self._checksums[shard_index].bad_blocks(lo, blob, self._row_bytes)
                if bad:
                    raise self._corrupt_error(shard_index, bad)
                into = None  # the good bytes are in the re-read, not in the target
            if into is not None:
                self._check_finite(shard_index, start, stop, into)
                decoded.append(into)
            else:
                decoded.append(self._decode(shard_index, lo, start, stop, blob, target))
        return decoded

    def _span_reader(
        self,
        shards: list[int],
        spans: list[tuple[int, int]],
        direct: list[np.ndarray | None],
    ) -> Iterator[bytes | memoryview]:
        """The spans' bytes, one at a time, in a span's ``direct`` array where one is given.

        A local dataset reads each span straight into that array, else into this thread's
        scratch buffer, which the next span overwrites (callers copy what they keep: ``_decode``
        does), so a shuffled reader allocates nothing per block. Remote storage fetches all
        spans concurrently in one request batch, then copies each into its ``direct`` array.
        """
        if not storage.is_local(self._fs):
            for blob, into in zip(self._read_spans(shards, spans), direct, strict=True):
                if into is None:
                    yield blob
                else:
                    view = _byte_view(into)
                    view[:] = blob
                    yield view
            return
        for shard_index, (lo, hi), into in zip(shards, spans, direct, strict=True):
            path = storage.join(self._root, self.manifest.shards[shard_index].path)
            blob = _byte_view(into) if into is not None else _scratch((hi - lo) * self._row_bytes)
            got = storage.read_range_into(self._fs, path, lo * self._row_bytes, blob)
            self._check_read_size(shard_index, lo, hi, got)
            yield blob

    def _check_read_size(self, shard_index: int, lo: int, hi: int, got: int) -> None:
        if got != (hi - lo) * self._row_bytes:
            raise DatasetError(
                f"{self.shard_url(shard_index)}: read {got} bytes for rows [{lo}, {hi}),"
                f" expected {(hi - lo) * self._row_bytes} (file truncated since open?); "
                "re-run generation for it"
            )

    def _read_spans(self, shards: list[int], spans: list[tuple[int, int]]) -> list[bytes]:
        if not spans:
            return []
        paths = [storage.join(self._root, self.manifest.shards[i].path) for i in shards]
        starts = [lo * self._row_bytes for lo, _ in spans]
        ends = [hi * self._row_bytes for _, hi in spans]
        blobs = storage.read_ranges(self._fs, paths, starts, ends)
        for shard_index, (lo, hi), blob in zip(shards, spans, blobs, strict=True):
            self._check_read_size(shard_index, lo, hi, len(blob))
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

    def _check_finite(self, shard_index: int, start: int, stop: int, rows: np.ndarray) -> None:
        # With block checksums the bytes are exactly those write_shard stored, and it refused
        # NaN/Inf: only version 1 needs (and pays for) the scan.
        if not self._checksums and not np.isfinite(rows).all():
            bad = start + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise DatasetError(
                f"{self.shard_url(shard_index)}: NaN/Inf in rows [{start}, {stop}) (first at row "
                f"{bad}); the shard is corrupt, regenerate it"
            )

    def _decode(
        self,
        shard_index: int,
        lo: int,
        start: int,
        stop: int,
        blob: bytes | memoryview,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of ``blob``, which holds rows ``[lo, ...)`` of the shard, as
        float32 (written into ``out`` when given)."""
        rows = np.frombuffer(blob, self._dtype).reshape(-1, self.d_model)[start - lo : stop - lo]
        self._check_finite(shard_index, start, stop, rows)
        if out is None:
            # astype always copies here, giving the caller a writable float32 array.
            return rows.astype(np.float32)
        if out.shape != rows.shape or out.dtype not in (np.float32, self._dtype):
            raise ValueError(
                f"out is {out.dtype}{list(out.shape)}, rows are float32 or "
                f"{self._dtype}{list(rows.shape)}"
            )
        np.copyto(out, rows, casting="same_kind")
        return out

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
            crc = compute_crc32(blob, crc)
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
