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
import errno
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


class WriteFailed(ValueError):
    """A write to storage failed (a full disk, a quota, a read-only mount).

    The message names the file and the OS error. The atomic writers leave nothing under the
    final name, so whatever was being committed (a shard, an export, a ledger) is not. A
    ValueError so that the CLI prints it as one line with exit status 2.
    """


def describe_os_error(error: OSError) -> str:
    """``No space left on device (ENOSPC)``: the OS's words and the errno's name."""
    if error.errno is None:
        return str(error)
    name = errno.errorcode.get(error.errno, str(error.errno))
    return f"{error.strerror or os.strerror(error.errno)} ({name})"


@contextlib.contextmanager
def reporting_write_failure(
    url: str, then: str = "free space (or fix the storage) and re-run"
) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into a :class:`WriteFailed` naming ``url``.

    Args:
        url: what was being written (shown to the user).
        then: what the user should do about it.
    """
    try:
        yield
    except WriteFailed:
        raise
    except FileNotFoundError:
        raise  # a missing parent or a vanished file: not a storage fault, let it say so
    except OSError as e:
        raise WriteFailed(f"could not write {url}: {describe_os_error(e)}; {then}") from e


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

    Raises:
        WriteFailed: the write failed (e.g. the disk is full); nothing is left under ``path``
            (a local temporary file is removed; an object upload was never finalised).
    """
    url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    with reporting_write_failure(url):
        _write_bytes_atomic(fs, path, data)


def _write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        # A unique temp name, so two workers racing on the same shard index cannot interleave
        # writes into one temp file; the rename (os.replace underneath) is atomic on POSIX.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        finally:
            # A full disk still lets us delete (and freeing the partial file helps).
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
