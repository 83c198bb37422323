"""The few fsspec operations the activation format needs, in one place.

Everything goes through an fsspec URL (a local path, ``gs://bucket/prefix``, ``memory://``), so
the same code writes to a laptop's disk and to GCS. What differs between backends is how to make a
write *atomic*: a local file appears under its final name as soon as it is opened, so we write a
temporary sibling and rename it; an object-store upload (GCS, S3, memory) only becomes visible
when it is finalised, so a direct write is already all-or-nothing, and a rename there is a
copy + delete that only doubles the traffic.

Transient storage faults (HTTP 408/429/5xx, dropped connections) are retried twice: gcsfs retries
each request 6 times over ~30 s, and every operation here runs up to 3 times, 5 s and 20 s apart,
so an outage of about two minutes (the default deadline of Google's own storage client) is
ridden out. After that, :class:`StorageError` names the object. Errors that a retry cannot fix
(missing object, permission denied, a full local disk) are raised at once, as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dictlearn.errors import UserError

T = TypeVar("T")

RETRY_PAUSES: tuple[float, ...] = (5.0, 20.0)
"""Seconds to wait before each of our retries of an operation that failed transiently."""

# gcsfs logs every request that runs out of retries with a full traceback (logger.exception);
# with no handler configured Python prints it to stderr, burying the one-line StorageError the
# user should see. A NullHandler silences only that fallback: an app that configures logging
# still gets gcsfs's records through the root logger.
logging.getLogger("gcsfs").addHandler(logging.NullHandler())


class StorageError(OSError):
    """Storage kept failing for an object after every retry; the message names the object."""


def _transient(error: BaseException) -> bool:
    """Whether a retry may succeed: throttling, server errors, dropped connections."""
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:
        from gcsfs.retry import is_retriable
    except ImportError:  # pragma: no cover - gcsfs is a dependency; other backends are not
        return False
    return bool(is_retriable(error))


def retrying(fs: fsspec.AbstractFileSystem, paths: str | list[str], op: Callable[[], T]) -> T:
    """Run ``op`` (an operation on ``paths``), retrying transient storage faults.

    Args:
        fs: The filesystem ``op`` uses (names the objects in the error).
        paths: The backend path(s) ``op`` touches, for the message.
        op: The operation; it must be safe to repeat (every operation here is).

    Raises:
        StorageError: still failing after ``len(RETRY_PAUSES) + 1`` attempts.
    """
    start = time.monotonic()
    for attempt, pause in enumerate((*RETRY_PAUSES, None), start=1):
        try:
            return op()
        except Exception as error:
            if not _transient(error):
                raise
            if pause is None:
                names = [paths] if isinstance(paths, str) else paths
                what = fs.unstrip_protocol(names[0])
                more = f" (and {len(names) - 1} more objects)" if len(names) > 1 else ""
                raise StorageError(
                    f"{what}{more}: storage still failing after {attempt} tries over "
                    f"{time.monotonic() - start:.0f} s ({type(error).__name__}: {error}); check "
                    "the bucket and the network, then re-run: finished work is kept"
                ) from error
            time.sleep(pause)
    raise AssertionError("unreachable")


class WriteFailed(UserError):
    """A write to storage failed (a full disk, a quota, a read-only mount).

    The message names the file and the OS error. The atomic writers leave nothing under the
    final name, so whatever was being committed (a shard, an export, a ledger) is not. A
    UserError, so that the CLI prints it as one line with exit status 2.
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
        retrying(fs, path, lambda: fs.pipe_file(path, data))


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete ``path`` if it exists (no error if it does not)."""
    with contextlib.suppress(FileNotFoundError):
        # A retry after a delete whose answer was lost finds nothing: FileNotFoundError, fine.
        retrying(fs, path, lambda: fs.rm_file(path))


def read_bytes_or_none(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """Return the content of ``path``, or None if it does not exist.

    Reading and catching ``FileNotFoundError`` is one round trip, where ``exists`` + ``cat``
    would be two and, on GCS, ``exists`` may answer from a stale listing cache.
    """
    try:
        return retrying(fs, path, lambda: fs.cat_file(path))
    except FileNotFoundError:
        return None


def read_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | None]:
    """Read several whole files concurrently (on async backends); None for each missing one.

    Results are in the order of ``paths``.
    """
    if not paths:
        return []

    def read() -> list[bytes | None]:
        out: list[bytes | None] = []
        for result in fs.cat_ranges(paths, None, None, on_error="return"):
            if isinstance(result, FileNotFoundError):
                out.append(None)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result)
        return out

    return retrying(fs, paths, read)


def read_ranges(
    fs: fsspec.AbstractFileSystem, paths: list[str], starts: list[int], ends: list[int]
) -> list[bytes]:
    """Read byte ranges ``[starts[i], ends[i])`` of ``paths[i]`` concurrently (on async backends).

    Raises:
        FileNotFoundError: a file is missing.
        StorageError: storage kept failing after the retries.
    """
    if not paths:
        return []
    return retrying(fs, paths, lambda: fs.cat_ranges(paths, starts, ends, on_error="raise"))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is this machine's own filesystem (where :func:`read_range_into` works)."""
    return isinstance(fs, LocalFileSystem)


def read_range_into(fs: LocalFileSystem, path: str, start: int, out: memoryview) -> int:
    """Read ``len(out)`` bytes of the local file ``path`` from byte ``start`` into ``out``.

    For hot read loops: the caller reuses ``out``, so no fresh memory is allocated (and
    page-faulted in) per read, as ``cat_ranges``' new ``bytes`` objects are.

    Returns:
        The number of bytes read: less than ``len(out)`` only where the file ends first.

    Raises:
        FileNotFoundError: the file is missing.
    """

    def read() -> int:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < len(out):
                got = f.readinto(out[done:])
                if not got:
                    break
                done += got
            return done

    return retrying(fs, path, read)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists (retrying transient faults)."""
    return retrying(fs, path, lambda: fs.exists(path))


def list_sizes(fs: fsspec.AbstractFileSystem, directory: str) -> dict[str, int]:
    """Map each file name (basename) directly under ``directory`` to its size in bytes.

    One listing call, which is what makes validating thousands of shards cheap on GCS. The
    listing cache is dropped first: another process (a generation worker) may have written files
    since this process last looked.
    """
    fs.invalidate_cache(directory)
    try:
        entries = retrying(fs, directory, lambda: fs.ls(directory, detail=True))
    except FileNotFoundError:
        return {}
    return {
        posixpath.basename(entry["name"].rstrip("/")): int(entry["size"])
        for entry in entries
        if entry.get("type") == "file"
    }
