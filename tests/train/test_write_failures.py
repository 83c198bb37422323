"""A disk that fills up part-way: checkpoint, shard and export writes fail with one line and
exit status 2, commit nothing half-written, and a checkpoint's predecessor stays the latest.

Two real fault sources, because the writes take two paths:
- fsspec writes (shards, manifests, exports, metrics, config.yaml) go through a filesystem
  registered here under ``fullfs://``: the local filesystem, except that writes fail with
  ENOSPC once a byte budget is spent (mid-file, as a full disk does);
- Orbax writes checkpoints with tensorstore's own file I/O, which no fsspec wrapper reaches, so
  ``dictlearn train`` runs in a subprocess with ``RLIMIT_FSIZE`` (SIGXFSZ ignored): every write
  past the limit fails with EFBIG inside tensorstore, as ENOSPC would, while the metrics and
  config (smaller than the limit) still write.
"""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

from dictlearn.export import load_sae
from dictlearn.tracking import read_metrics
from dictlearn.train.trainer import main, run_dir_of
from launch.cli import main as cli_main
from tests.train.helpers import (
    REPO_ROOT,
    cli_command,
    cli_env,
    committed_steps,
    make_planted,
    restore_final,
    run_cli,
    tiny_config,
    with_overrides,
    write_config,
)


class _BudgetedFile:
    """A file opened for writing that raises ENOSPC once the disk's budget is spent."""

    def __init__(self, file: Any, disk: type[FullDisk]):
        self._file, self._disk = file, disk

    def write(self, data: bytes) -> int:
        room = self._disk.budget
        if len(data) > room:
            self._file.write(data[:room])  # a full disk takes what fits, then fails
            self._disk.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.budget -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _BudgetedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class FullDisk(LocalFileSystem):
    """``fullfs:///abs/path``: the local disk with ``budget`` bytes of free space."""

    protocol = ("fullfs",)
    budget = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        if path.startswith("fullfs://"):
            path = path[len("fullfs://") :]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        return _BudgetedFile(file, type(self)) if ("w" in mode or "a" in mode) else file


@pytest.fixture
def full_disk() -> type[FullDisk]:
    fsspec.register_implementation("fullfs", FullDisk, clobber=True)
    FullDisk.budget = 0
    return FullDisk


def _no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name], list(root.rglob("*"))


def test_shard_writes_on_a_full_disk(tmp_path: Path, full_disk, capsys) -> None:
    full_disk.budget = 700_000  # the planted data below is ~1 MiB of shards
    out = tmp_path / "planted"
    args = ["planted", f"fullfs://{out}", "d_model=16", "n_features=32", "n_tokens=16384"]
    args += ["mean_active=3", "shard_tokens=4096"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"dictlearn planted: error: could not write {re.escape(str(out))}/shards/"
        r"shard-\d{5}\.bin: No space left on device \(ENOSPC\); free space \(or fix the storage\) "
        r"and re-run\n",
        err,
    ), err
    # Nothing half-written under a final name, and no dataset committed.
    _no_temporaries(out)
    assert not (out / "manifest.json").exists()
    written = sorted(p.name for p in (out / "shards").glob("*.bin"))
    assert written and all((out / "shards" / n).stat().st_size == 4096 * 16 * 4 for n in written)

    full_disk.budget = 10**9  # space freed: re-running finishes the dataset
    assert cli_main(args) == 0
    assert (out / "manifest.json").exists()


def test_export_on_a_full_disk(tmp_path: Path, full_disk, capsys) -> None:
    data = tmp_path / "data"
    make_planted(data)
    config = tiny_config(tmp_path, data, train={"steps": 2})
    main(config)
    out = tmp_path / "export"
    args = ["export", run_dir_of(config), "--format", "native", "--density-tokens", "0"]
    full_disk.budget = 2_000
    assert cli_main([*args, "--out", f"fullfs://{out}"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"dictlearn export: error: could not write {re.escape(str(out))}/\S+: No space left on "
        r"device \(ENOSPC\); free space \(or fix the storage\) and re-run\n",
        err,
    ), err
    _no_temporaries(out)
    with pytest.raises(Exception, match="export"):
        load_sae(str(out))  # not committed: no reader takes it for an export

    full_disk.budget = 10**9
    assert cli_main([*args, "--out", f"fullfs://{out}"]) == 0
    assert load_sae(str(out)).d_sae == 64


def _with_file_size_limit(limit_kib: int, command: list[str]) -> list[str]:
    """``command`` under a shell that ignores SIGXFSZ (so a write past the limit fails with
    EFBIG instead of killing the process; an ignored signal stays ignored across exec) and
    limits the size of every file it writes. (Not a ``preexec_fn``: forking a process that
    runs JAX's threads can deadlock.)"""
    return ["bash", "-c", f'trap "" XFSZ; ulimit -f {limit_kib}; exec "$@"', "bash", *command]


@pytest.mark.slow  # three training processes: ~1.5-3 min each variant on 2 shared cores
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_checkpoint_write_on_a_full_disk(tmp_path: Path, async_save: bool) -> None:
    data = tmp_path / "data"
    make_planted(data)
    config = tiny_config(
        tmp_path,
        data,
        train={"steps": 8},
        checkpoint={"every_steps": 4, "async_save": async_save},
        # No lr decay, so the 4-step run below may be extended to 8 steps on resume.
        optimizer={"decay_fraction": 0.0},
    )
    main(with_overrides(config, "train.steps=4"))  # the checkpoint of step 4, on a roomy disk
    checkpoint_dir = f"{run_dir_of(config)}/checkpoints"
    config_path = write_config(tmp_path / "train.yaml", config)
    # 16 KiB: the state's arrays (~25 KiB in one OCDBT data file) no longer fit; the metric
    # rows, config.yaml and Orbax's small JSON files do. Output goes to pipes: files the child
    # writes (a log) would be limited too. No native-kernel build (the compiler's output would
    # hit the limit; the XLA path trains the same).
    proc = subprocess.run(
        _with_file_size_limit(16, cli_command("train", config_path)),
        cwd=REPO_ROOT,
        env=cli_env(DICTLEARN_CPU_KERNELS="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Orbax's save threads' own tracebacks of the failed write are filtered out (the error is
    # raised again, as ours); not assert_no_traceback: tensorstore's callbacks may still print
    # "Event loop is closed" ones. The last line is ours: what happened and what to do.
    assert "_SignalingThread" not in proc.stderr and "ERROR:absl" not in proc.stderr
    assert re.search(
        rf"dictlearn train: error: could not write checkpoint step 8 in "
        rf"{re.escape(checkpoint_dir)}: File too large \(EFBIG\); the latest committed "
        r"checkpoint, step 4, is intact: free space \(or fix the storage\) and re-run to resume "
        r"from it\n$",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert committed_steps(checkpoint_dir) == [4]
    _, restored = restore_final(config)
    assert restored.step == 4

    # Space freed: the same command resumes from step 4, and the leftovers of the failed save
    # are gone; every step's metric row is there once.
    again = run_cli("train", config_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr and "from step 4" in again.stderr
    assert committed_steps(checkpoint_dir) == [4, 8]
    assert [p.name for p in Path(checkpoint_dir).iterdir() if "tmp" in p.name] == []
    assert [r["step"] for r in read_metrics(run_dir_of(config)) if "loss" in r] == list(range(1, 9))
