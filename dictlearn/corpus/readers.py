"""Corpus config, file readers, and deterministic splitting of a corpus into shards.

A corpus is a list of fsspec URLs or globs (local paths, ``gs://``, ``memory://``, ...) plus the
built-in corpora of :mod:`dictlearn.corpus.builtin`. What a *document* is depends on the format:

* ``txt``: one file is one document (code and prose keep their structure; a long book is fine
  because packing concatenates documents anyway). Put many small documents into ``.jsonl``.
* ``jsonl``: one non-blank line is one JSON object; its ``text_field`` is the document.
* ``parquet``: one row is one document; the ``text_field`` column holds it.

Files may be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``; the suffix picks the codec).
Documents are yielded as they are; empty ones are skipped later by packing.

Planning (:func:`plan_corpus_shards`) runs once, on the coordinator: it lists the files, counts
their documents (free for txt and parquet, a streaming pass for jsonl), orders them (sorted
listing, then a seeded shuffle of the files), truncates to ``max_documents`` and cuts the
document sequence into ``n_shards`` contiguous ranges whose sizes differ by at most one. Each
:class:`CorpusShard` is a small serialisable description a Ray worker hands to
:func:`iter_documents` to read exactly its documents and nothing else.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from dictlearn.config import StrictModel
from dictlearn.corpus.builtin import (
    BUILTIN_CORPORA,
    PYTHON_DOCS,
    PYTHON_STDLIB,
    python_doc_topics,
    stdlib_source_files,
)
from dictlearn.errors import UserError

FileFormat = Literal["txt", "jsonl", "parquet"]
PieceFormat = Literal["txt", "jsonl", "parquet", "python-docs"]

_EXTENSIONS: dict[str, FileFormat] = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_GLOB_CHARS = frozenset("*?[")


class CorpusError(UserError):
    """A corpus is empty, unreadable or malformed; the message names the paths or file at fault."""


class CorpusConfig(StrictModel):
    """Where the text comes from and how it is cut into shards for parallel workers."""

    paths: list[str] = Field(
        min_length=1,
        description=(
            "fsspec URLs, globs or directories (local, gs://, ...) of corpus files, or the "
            "built-in corpora 'builtin:python-stdlib' and 'builtin:python-docs'. A directory "
            "means every file under it with a known extension."
        ),
    )
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        default="auto",
        description=(
            "File format; 'auto' picks it from the extension (.txt, .jsonl/.ndjson, .parquet, "
            "optionally followed by .gz/.bz2/.xz/.zst)."
        ),
    )
    text_field: str = Field(
        default="text", min_length=1, description="JSON field / parquet column holding the text."
    )
    max_documents: int | None = Field(
        default=None, gt=0, description="Use at most this many documents (after the shuffle)."
    )
    n_shards: int = Field(
        default=1, gt=0, description="Number of corpus shards (units of work for the workers)."
    )
    seed: int | None = Field(
        default=0,
        description="Seed of the file-order shuffle; null keeps the sorted listing order.",
    )

    @field_validator("paths")
    @classmethod
    def _known_builtins(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.strip():
                raise ValueError("paths must not contain an empty string")
            if path.startswith("builtin:") and path not in BUILTIN_CORPORA:
                raise ValueError(f"unknown built-in corpus {path!r}; known: {BUILTIN_CORPORA}")
        return paths


class ShardPiece(StrictModel):
    """Documents ``[start, stop)`` of one file (in the file's own order)."""

    path: str = Field(description="fsspec URL of the file, or 'builtin:python-docs'.")
    format: PieceFormat = Field(description="How to read the file.")
    start: int = Field(ge=0, description="First document of the file in this piece.")
    stop: int = Field(ge=0, description="One past the last document of the file in this piece.")


class CorpusShard(StrictModel):
    """One unit of work: the documents a worker reads, as file pieces. Serialisable as JSON."""

    index: int = Field(ge=0, description="Position of this shard in the plan.")
    n_shards: int = Field(gt=0, description="Number of shards in the plan.")
    text_field: str = Field(description="JSON field / parquet column holding the text.")
    pieces: tuple[ShardPiece, ...] = Field(description="File pieces, read in this order.")

    @property
    def n_documents(self) -> int:
        """Number of documents in the shard."""
        return sum(p.stop - p.start for p in self.pieces)


def plan_corpus_shards(config: CorpusConfig) -> list[CorpusShard]:
    """Cut the corpus into ``config.n_shards`` shards that partition its documents exactly.

    Deterministic: the same config over the same files gives the same plan (sorted listing,
    seeded shuffle of whole files, contiguous document ranges).

    Raises:
        CorpusError: if no file matches, every file is empty, a file cannot be read, a format
            cannot be inferred, or there are fewer documents than shards.
    """
    files = _list_files(config)
    if config.seed is not None:
        order = np.random.default_rng(config.seed).permutation(len(files))
        files = [files[i] for i in order]

    counted: list[tuple[str, PieceFormat, int]] = []
    total = 0
    for path, fmt in files:
        if config.max_documents is not None and total >= config.max_documents:
            break  # Later files cannot contribute; skip counting them (a pass over jsonl).
        n = _count_documents(path, fmt)
        if n:
            counted.append((path, fmt, n))
            total += n
    if total == 0:
        raise CorpusError(f"corpus {config.paths} holds no documents (every file is empty)")
    if config.max_documents is not None:
        total = min(total, config.max_documents)
    if total < config.n_shards:
        raise CorpusError(
            f"corpus {config.paths} holds {total} documents, fewer than n_shards={config.n_shards}"
        )

    # Shard i gets global documents [bounds[i], bounds[i+1]); sizes differ by at most one.
    bounds = [total * i // config.n_shards for i in range(config.n_shards + 1)]
    shards = []
    file_offsets = np.cumsum([0] + [n for _, _, n in counted])
    for i in range(config.n_shards):
        lo, hi = bounds[i], bounds[i + 1]
        pieces = []
        for (path, fmt, _), f_lo, f_hi in zip(
            counted, file_offsets[:-1], file_offsets[1:], strict=True
        ):
            start, stop = max(lo, int(f_lo)), min(hi, int(f_hi))
            if start < stop:
                pieces.append(
                    ShardPiece(
                        path=path, format=fmt, start=start - int(f_lo), stop=stop - int(f_lo)
                    )
                )
        shards.append(
            CorpusShard(
                index=i,
                n_shards=config.n_shards,
                text_field=config.text_field,
                pieces=tuple(pieces),
            )
        )
    return shards


def iter_documents(shard: CorpusShard) -> Iterator[str]:
    """Yield the shard's documents in order, reading only its pieces of its files.

    Raises:
        CorpusError: naming the file (and line or row) that cannot be read or lacks the text.
    """
    for piece in shard.pieces:
        yield from _read_piece(piece, shard.text_field)


# ---------------------------------------------------------------------------------------------
# Listing


def _list_files(config: CorpusConfig) -> list[tuple[str, PieceFormat]]:
    """Expand every entry of ``config.paths`` into sorted ``(url, format)`` pairs, deduplicated."""
    seen: set[str] = set()
    files: list[tuple[str, PieceFormat]] = []

    def add(path: str, fmt: PieceFormat) -> None:
        if path not in seen:
            seen.add(path)
            files.append((path, fmt))

    for entry in config.paths:
        if entry == PYTHON_STDLIB:
            for path in stdlib_source_files():
                add(path, "txt")
        elif entry == PYTHON_DOCS:
            add(PYTHON_DOCS, "python-docs")
        else:
            for path in _expand(entry, config.format):
                add(path, _infer_format(path) if config.format == "auto" else config.format)
    if not files:
        raise CorpusError(f"no corpus files match {config.paths}")
    return files


def _expand(entry: str, fmt: str) -> list[str]:
    """Files an entry names: a glob's matches, a directory's files, or the file itself."""
    fs, root = fsspec.core.url_to_fs(entry)
    try:
        if any(c in _GLOB_CHARS for c in root):
            matches = [
                p for p, info in fs.glob(root, detail=True).items() if info["type"] == "file"
            ]
        elif fs.isdir(root):
            matches = [p for p in fs.find(root) if fmt != "auto" or _format_or_none(p) is not None]
        elif fs.exists(root):
            matches = [root]
        else:
            matches = []
    except OSError as e:
        raise CorpusError(f"cannot list corpus path {entry}: {e}") from e
    return [_to_url(fs, entry, p) for p in sorted(matches)]


def _to_url(fs: fsspec.AbstractFileSystem, entry: str, path: str) -> str:
    # Local entries given without a protocol stay plain paths, so messages show what the user
    # wrote; everything else gets its protocol back (fs.glob strips it: "bucket/x" for gs://).
    if "://" not in entry and "local" in _protocols(fs):
        return path
    return fs.unstrip_protocol(path)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _format_or_none(path: str) -> FileFormat | None:
    name = posixpath.basename(path).lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return _EXTENSIONS.get(posixpath.splitext(name)[1])


def _infer_format(path: str) -> FileFormat:
    fmt = _format_or_none(path)
    if fmt is None:
        raise CorpusError(
            f"cannot tell the format of corpus file {path} from its extension "
            f"(known: {sorted(_EXTENSIONS)}); set format: txt|jsonl|parquet"
        )
    return fmt


# ---------------------------------------------------------------------------------------------
# Counting and reading


def _count_documents(path: str, fmt: PieceFormat) -> int:
    if fmt == "python-docs":
        return len(python_doc_topics())
    try:
        if fmt == "txt":
            fs, root = fsspec.core.url_to_fs(path)
            return 1 if fs.size(root) else 0  # A file is a document; an empty one is none.
        if fmt == "parquet":
            with fsspec.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        with _open_text(path) as f:
            return sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError, pa.ArrowException, EOFError) as e:
        raise CorpusError(f"cannot read corpus file {path}: {e}") from e


def _open_text(path: str) -> fsspec.core.OpenFile:
    # Strict UTF-8: a corpus in another encoding should fail loudly, not feed mojibake to the LM.
    return fsspec.open(path, "rt", encoding="utf-8", compression="infer")


def _read_piece(piece: ShardPiece, text_field: str) -> Iterator[str]:
    if piece.format == "python-docs":
        for _, text in python_doc_topics()[piece.start : piece.stop]:
            yield text
        return
    try:
        if piece.format == "txt":
            with _open_text(piece.path) as f:
                text = f.read()
            yield text  # A txt piece is always document [0, 1) of its file.
        elif piece.format == "jsonl":
            yield from _read_jsonl(piece, text_field)
        else:
            yield from _read_parquet(piece, text_field)
    except CorpusError:
        raise
    except (OSError, UnicodeDecodeError, pa.ArrowException, EOFError) as e:
        raise CorpusError(f"cannot read corpus file {piece.path}: {e}") from e


def _read_jsonl(piece: ShardPiece, text_field: str) -> Iterator[str]:
    index = 0  # Document index: non-blank lines only, matching _count_documents.
    with _open_text(piece.path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if index >= piece.stop:
                return
            if index >= piece.start:
                yield _jsonl_text(line, text_field, f"{piece.path}:{line_no}")
            index += 1


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise CorpusError(
            f"{where}: no field {text_field!r} (fields present: {sorted(record)}); "
            "set corpus.text_field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _read_parquet(piece: ShardPiece, text_field: str) -> Iterator[str]:
    with fsspec.open(piece.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise CorpusError(
                f"{piece.path}: no column {text_field!r} (columns present: {names}); "
                "set corpus.text_field"
            )
        row = 0  # First row of the current row group; groups outside the piece are not read.
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            lo, hi = max(piece.start, row), min(piece.stop, row + n)
            if lo < hi:
                column = pf.read_row_group(group, columns=[text_field]).column(0)
                for offset, text in enumerate(column.slice(lo - row, hi - lo).to_pylist()):
                    if not isinstance(text, str):
                        raise CorpusError(
                            f"{piece.path}: row {lo + offset} of column {text_field!r} is "
                            f"{type(text).__name__}, not a string"
                        )
                    yield text
            row += n
            if row >= piece.stop:
                return
