"""``dictlearn validate DATASET [--deep]``: what a user sees for a sound, corrupt or old dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main

PLANTED = [
    *("d_model=16", "n_features=32", "mean_active=3", "n_tokens=3000", "shard_tokens=1024"),
    "dtype=bfloat16",
]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    assert main(["planted", str(tmp_path / "acts"), *PLANTED]) == 0
    return tmp_path / "acts"


def test_sound_dataset_passes_both_checks(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["validate", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dataset OK (quick: manifest, shard sizes, sidecars")
    assert "format version 2, 3,000 rows x d_model 16 bfloat16 in 3 shards (96,000 bytes)" in out
    assert main(["validate", str(dataset), "--deep"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("dataset OK (deep: every block checksum read back, 96,000 bytes in ")
    assert err == ""


def test_corrupt_block_passes_quick_and_fails_deep_in_one_line(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = dataset / "shards" / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[100 * 16 * 2 + 7] ^= 0x01  # row 100: block 1 of 64-row blocks; size unchanged
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["validate", str(dataset)]) == 0  # sizes and sidecars cannot see it
    capsys.readouterr()
    assert main(["validate", str(dataset), "--deep"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(
        f"dictlearn validate: error: {dataset}: 1 corrupt blocks in 1 shards "
        "(shards/shard-00002.bin blocks [1]); to repair, delete shards/shard-00002.json and "
        "manifest.json there and re-run the command that wrote the dataset"
    )


def test_version_1_dataset_is_checked_with_a_warning(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sidecar in (dataset / "shards").glob("*.json"):
        info = json.loads(sidecar.read_text())
        del info["checksum_rows"], info["block_crc32"]
        sidecar.write_text(json.dumps(info))
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps(manifest | {"version": 1}))
    capsys.readouterr()
    assert main(["validate", str(dataset), "--deep"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("dataset OK (deep: every shard CRC32 and value read back")
    assert "format version 1," in out
    assert err.startswith(
        f"dictlearn validate: warning: {dataset}: format version 1 has no block checksums"
    )


def test_missing_dataset_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"dictlearn validate: error: no activation dataset at {tmp_path}/nowhere: the path does "
        "not exist; check data.path, or write one with `dictlearn generate` (or `dictlearn "
        "planted`)\n"
    )
