"""One tracker interface: metric rows in the run directory, always, plus W&B.

Analysis code (scaling-law fits, exports, reports) reads the rows with :func:`read_metrics`, so
it works offline and never depends on W&B.

Layout. Rows are JSON lines in *segments*, ``<run_dir>/metrics/part-NNNNN.jsonl``, read in index
order. Each tracker session (a run, then each resume) starts a new segment, and a segment rolls
over to the next one past ``SEGMENT_BYTES``. Runs written before segments existed have a single
``<run_dir>/metrics.jsonl``; :func:`read_metrics` still reads it (before any segment).

Why segments: an object store (``gs://``) has no append, and an object exists only once its
upload is finalised. So on an object store the tracker buffers the open segment and re-uploads
it whole (each upload atomic) at every checkpoint (:meth:`Tracker.flush`), at most every
``flush_seconds`` in between, and at close; a segment that is full is never written again. On a
local disk it appends and flushes each line (a crash leaves at most a partial last line, which
readers skip).

Exactness on resume: a run resumed from the checkpoint of step ``S`` re-logs the steps after
``S``, so :class:`Tracker` first drops every stored row with ``step > S`` (rewriting the
segments that hold such rows, each atomically). Rows up to ``S`` were flushed no later than
that checkpoint was saved, so after a kill, resume and finish every step's row is there once.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import time
from typing import Any, TextIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dictlearn.data.storage import read_many, reporting_write_failure, write_bytes_atomic

METRICS_FILE = "metrics.jsonl"
"""The single metrics file of runs written before segments (read, never written)."""
METRICS_DIR = "metrics"
"""Directory of metric segments inside a run directory."""
SEGMENT_BYTES = 1 << 20
"""A segment past this size is closed and the next one started (bounds each re-upload)."""

_SEGMENT = re.compile(r"part-(\d+)\.jsonl")


def _segment_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def _jsonable(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than crash
    return value


class Tracker:
    """Log scalar metrics to the run directory's segments and (unless disabled) to W&B.

    Args:
        run_dir: the run directory (local path or URL).
        config: the resolved run config (recorded in W&B).
        start_step: the step training (re)starts from: stored rows of later steps are dropped,
            since this run logs those steps again (0 for a fresh run drops every row).
        wandb_mode: ``offline`` (default: no network at all), ``online`` or ``disabled``.
        project, entity, name: W&B identifiers.
        group: W&B run group: the sweep a trial belongs to, or the group run whose members
            train together; None for none.
        side_by_side: this run is opened beside others in one process (a group run's members),
            where a plain run finishes any run opened before it.
        enabled: False on non-zero processes of a multi-host run (only process 0 logs).
        flush_seconds: on an object store, the longest time rows wait in memory between
            uploads (besides :meth:`flush` at every checkpoint); local files flush every row.
    """

    def __init__(
        self,
        run_dir: str,
        config: dict[str, Any],
        *,
        start_step: int = 0,
        wandb_mode: str = "offline",
        project: str = "dictlearn",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        side_by_side: bool = False,
        enabled: bool = True,
        flush_seconds: float = 30.0,
    ):
        self.enabled = enabled
        self._wandb_run = None
        self._segments: _SegmentWriter | None = None
        if not enabled:
            return
        self._segments = _SegmentWriter(run_dir, start_step, flush_seconds)
        if wandb_mode != "disabled":
            self._wandb_run = _start_wandb(
                run_dir, config, wandb_mode, project, entity, name, group, side_by_side
            )

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Record one row: ``step``, the wall time and ``metrics`` (keys prefixed)."""
        if not self.enabled:
            return
        row = {f"{prefix}{k}": _jsonable(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **row}
        assert self._segments is not None
        self._segments.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if not isinstance(v, str)}, step=step)

    def flush(self) -> None:
        """Make every row logged so far durable (call it with every checkpoint save)."""
        if self._segments is not None:
            self._segments.flush()

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: _jsonable(v) for k, v in values.items()})

    def close(self) -> None:
        """Flush and close the metrics and the W&B run."""
        if self._segments is not None:
            segments, self._segments = self._segments, None
            segments.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


class _SegmentWriter:
    """Writes one run's rows into new segments; see the module docstring for the policy."""

    def __init__(self, run_dir: str, start_step: int, flush_seconds: float):
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/") or root
        self.directory = posixpath.join(self.root, METRICS_DIR)
        self.url = run_dir.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.flush_seconds = flush_seconds
        self.fs.makedirs(self.directory, exist_ok=True)
        indices = _drop_rows_after(self.fs, self.root, start_step)
        self.index = max(indices, default=-1) + 1
        self._lines: list[str] = []  # the open segment's rows (object stores only)
        self._size = 0
        self._dirty = False
        self._last_upload = time.monotonic()
        self._file: TextIO | None = None

    @property
    def path(self) -> str:
        return posixpath.join(self.directory, _segment_name(self.index))

    def write(self, line: str) -> None:
        with reporting_write_failure(f"{self.url}/{METRICS_DIR}/{_segment_name(self.index)}"):
            self._write(line)

    def _write(self, line: str) -> None:
        if self.local:
            if self._file is None:
                self._file = open(self.path, "a")  # noqa: SIM115 -- open across calls
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._last_upload >= self.flush_seconds:
                self.flush()
        self._size += len(line)
        if self._size >= SEGMENT_BYTES:
            self._roll()

    def flush(self) -> None:
        with reporting_write_failure(f"{self.url}/{METRICS_DIR}/{_segment_name(self.index)}"):
            self._flush()

    def _flush(self) -> None:
        if self.local:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
        elif self._dirty:
            self.fs.pipe_file(self.path, "".join(self._lines).encode())
            self._dirty = False
            self._last_upload = time.monotonic()

    def _roll(self) -> None:
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.index += 1
        self._lines, self._size = [], 0

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _stored_paths(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[int, str]]:
    """``(index, path)`` of a run's stored metrics, in reading order: the single file of older
    runs (index -1), then the segments by index."""
    directory = posixpath.join(root, METRICS_DIR)
    # Another process (the trainer, a resumed run) may have written since this one listed.
    fs.invalidate_cache(root)
    fs.invalidate_cache(directory)
    found: list[tuple[int, str]] = []
    if fs.isfile(posixpath.join(root, METRICS_FILE)):
        found.append((-1, posixpath.join(root, METRICS_FILE)))
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        names = []
    segments = []
    for name in names:
        match = _SEGMENT.fullmatch(posixpath.basename(name.rstrip("/")))
        if match:
            segments.append((int(match.group(1)), posixpath.join(directory, match.group(0))))
    return found + sorted(segments)


def _parse(blob: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The rows of one stored file, and whether any line was unreadable (a crash's partial
    last line, skipped)."""
    rows, skipped = [], False
    for line in blob.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped = True
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped = True
    return rows, skipped


def _drop_rows_after(fs: fsspec.AbstractFileSystem, root: str, step: int) -> list[int]:
    """Remove every stored row with ``step`` past ``step`` (and unreadable partial lines).

    Each file is rewritten atomically or deleted, so an interruption leaves every file whole,
    and doing it again (the next resume) finishes the job. Returns the indices left.
    """
    stored = _stored_paths(fs, root)
    left = []
    for (index, path), blob in zip(stored, read_many(fs, [p for _, p in stored]), strict=True):
        if blob is None:
            continue
        rows, skipped = _parse(blob)
        kept = [r for r in rows if int(r.get("step", 0)) <= step]
        if kept and len(kept) == len(rows) and not skipped:
            left.append(index)
        elif kept:
            write_bytes_atomic(fs, path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            left.append(index)
        else:
            fs.rm_file(path)
    return [i for i in left if i >= 0]


def has_metrics(run_dir: str) -> bool:
    """Whether the run directory holds any stored metrics (segments or an old single file)."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    return bool(_stored_paths(fs, root.rstrip("/") or root))


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Every metric row of a run, in the order logged (partial lines from a crash skipped).

    Reads the segments under ``<run_dir>/metrics/`` and the single ``metrics.jsonl`` of older
    runs; the one reader that scaling-law fits, exports, sweeps and tests use.

    Raises:
        FileNotFoundError: the run directory holds no metrics at all.
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    stored = _stored_paths(fs, root.rstrip("/") or root)
    if not stored:
        raise FileNotFoundError(
            f"no metrics in {run_dir}: neither {METRICS_DIR}/ nor {METRICS_FILE}; is it a run "
            "directory?"
        )
    rows: list[dict[str, Any]] = []
    for blob in read_many(fs, [path for _, path in stored]):
        if blob is not None:
            rows += _parse(blob)[0]
    return rows


def _start_wandb(run_dir, config, mode, project, entity, name, group=None, side_by_side=False):
    import wandb  # imported lazily: ~2 s, and not needed with wandb_mode=disabled

    local_dir = run_dir if "://" not in run_dir else os.path.join(os.getcwd(), "wandb-local")
    os.environ.setdefault("WANDB_DIR", local_dir)
    os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(local_dir, ".wandb-cache"))
    return wandb.init(
        project=project,
        entity=entity,
        name=name,
        group=group,
        config=config,
        dir=local_dir,
        mode=mode,
        resume="allow",
        # A sweep's trial names repeat across sweeps: prefix the group so that a trial never
        # resumes another sweep's W&B run of the same name.
        id=name if group is None else f"{group}-{name}",
        reinit="create_new" if side_by_side else "finish_previous",
    )
