"""The few fsspec operations the activation format needs, in one place.

Everything goes through an fsspec URL (a local path, ``gs://bucket/prefix``, ``memory://``), so
the same code writes to a laptop's disk and to GCS. What differs between backends is how to make a
write *atomic*: a local file appears under its final name as soon as it is opened, so we write a
temporary sibling and rename it; an object-store upload (GCS, S3, memory) only becomes visible
when it is finalised, so a direct write is already all-or-nothing, and a rename there is a
copy + delete that only doubles the traffic.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to its filesystem and the backend's path for it (protocol stripped).

    Credentials and endpoints come from fsspec's own configuration (for tests against the GCS
    emulator, ``tests/gcs_emulator.py`` sets ``token="anon"`` there), so no caller needs to know
    which backend it talks to.
    """
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def join(path: str, *parts: str) -> str:
    """Join path components with ``/``: every fsspec backend uses POSIX separators."""
    return posixpath.join(path, *parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the whole new content or nothing.

    Args:
        fs: The filesystem holding ``path``.
        path: Backend path (as returned by :func:`filesystem`).
        data: The full content.
    """
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        # A unique temp name, so two workers racing on the same shard index cannot interleave
        # writes into one temp file; the rename (os.replace underneath) is atomic on POSIX.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)
    else:
        fs.pipe_file(path, data)


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete ``path`` if it exists (no error if it does not)."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def read_bytes_or_none(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """Return the content of ``path``, or None if it does not exist.

    Reading and catching ``FileNotFoundError`` is one round trip, where ``exists`` + ``cat``
    would be two and, on GCS, ``exists`` may answer from a stale listing cache.
    """
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | None]:
    """Read several whole files concurrently (on async backends); None for each missing one.

    Results are in the order of ``paths``.
    """
    if not paths:
        return []
    results = fs.cat_ranges(paths, None, None, on_error="return")
    out: list[bytes | None] = []
    for result in results:
        if isinstance(result, FileNotFoundError):
            out.append(None)
        elif isinstance(result, BaseException):
            raise result
        else:
            out.append(result)
    return out


def list_sizes(fs: fsspec.AbstractFileSystem, directory: str) -> dict[str, int]:
    """Map each file name (basename) directly under ``directory`` to its size in bytes.

    One listing call, which is what makes validating thousands of shards cheap on GCS. The
    listing cache is dropped first: another process (a generation worker) may have written files
    since this process last looked.
    """
    fs.invalidate_cache(directory)
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return {}
    return {
        posixpath.basename(entry["name"].rstrip("/")): int(entry["size"])
        for entry in entries
        if entry.get("type") == "file"
    }
