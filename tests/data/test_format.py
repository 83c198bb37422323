"""The shard format: round trips, statistics, and the error each kind of damage must raise."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dictlearn.data import (
    ActivationDataset,
    BatchStream,
    DatasetError,
    DatasetWarning,
    check_compatible,
    commit_manifest,
    read_shard_info,
    read_shard_infos,
    write_shard,
)
from dictlearn.data.format import compute_crc32


def _rows(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 2.0, (n, d)).astype(np.float32)


def _make(
    root: Path, sizes: tuple[int, ...] = (300, 200), d: int = 8, dtype: str = "float32", **kw
) -> tuple[str, list[np.ndarray]]:
    url = str(root)
    arrays = [_rows(i, n, d) for i, n in enumerate(sizes)]
    infos = [write_shard(url, i, a, dtype) for i, a in enumerate(arrays)]
    commit_manifest(
        url,
        infos,
        source_model=kw.get("source_model", "m"),
        hook=kw.get("hook", "resid_post.6"),
        layer=6,
        metadata={"note": "test"},
    )
    return url, arrays


def _downgrade_to_version_1(root: Path) -> None:
    """Rewrite a dataset as version 1 wrote it: no block checksums, manifest version 1."""
    for sidecar in (root / "shards").glob("*.json"):
        info = json.loads(sidecar.read_text())
        del info["checksum_rows"], info["block_crc32"]
        sidecar.write_text(json.dumps(info))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))


def _flip_bit(path: Path, byte: int) -> None:
    """Flip the lowest bit of one byte: the file keeps its size and every value stays finite."""
    data = bytearray(path.read_bytes())
    data[byte] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    url, arrays = _make(tmp_path, dtype=dtype)
    ds = ActivationDataset.open(url)
    assert (ds.d_model, ds.n_tokens, ds.num_shards) == (8, 500, 2)
    for i, array in enumerate(arrays):
        stored = (
            array.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else array
        )
        got = ds.read_rows(i, 0, len(array))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, stored)
        np.testing.assert_array_equal(ds.read_rows(i, 17, 42), stored[17:42])
    assert (tmp_path / "shards" / "shard-00001.bin").stat().st_size == 200 * 8 * (
        4 if dtype == "float32" else 2
    )
    ds.validate(deep=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "dictlearn.activations"
    assert manifest["version"] == 2
    assert manifest["shards"][1]["path"] == "shards/shard-00001.bin"
    assert manifest["metadata"] == {"note": "test"}
    # Only committed files remain: no temporaries left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "shard-00000.bin",
        "shard-00000.json",
        "shard-00001.bin",
        "shard-00001.json",
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_match_numpy(tmp_path: Path, dtype: str) -> None:
    url, _ = _make(tmp_path, dtype=dtype)
    ds = ActivationDataset.open(url)
    # Statistics describe the stored values, so compare with what the reader returns.
    rows = np.concatenate([ds.read_rows(i, 0, ds.shard_n_tokens(i)) for i in range(2)])
    rows64 = rows.astype(np.float64)
    np.testing.assert_allclose(ds.manifest.stats.mean, rows64.mean(0), rtol=1e-12, atol=1e-12)
    mean_sq = (rows64**2).sum(1).mean()
    assert ds.manifest.stats.mean_sq_norm == pytest.approx(mean_sq, rel=1e-12)
    assert np.mean(((rows64 * ds.norm_scale) ** 2).sum(1)) == pytest.approx(8.0, rel=1e-9)
    assert ds.mean.dtype == np.float32


def test_rewrite_is_idempotent_and_shard_info(tmp_path: Path) -> None:
    url = str(tmp_path)
    assert read_shard_info(url, 0) is None
    write_shard(url, 0, _rows(0, 50, 4), "float32")
    new = _rows(1, 70, 4)
    info = write_shard(url, 0, new, "float32")
    assert read_shard_info(url, 0) == info
    assert info.n_tokens == 70
    commit_manifest(url, [info], source_model="m", hook="h", layer=None, metadata={})
    np.testing.assert_array_equal(ActivationDataset.open(url).read_rows(0, 0, 70), new)
    # A shard whose sidecar is absent (crash between .bin and .json) is not committed.
    write_shard(url, 1, _rows(2, 10, 4), "float32")
    (tmp_path / "shards" / "shard-00001.json").unlink()
    assert read_shard_info(url, 1) is None
    assert list(read_shard_infos(url)) == [0]


def test_missing_manifest(tmp_path: Path) -> None:
    write_shard(str(tmp_path), 0, _rows(0, 10, 4), "float32")
    with pytest.raises(DatasetError, match=r"no manifest.json at .*re-run generate"):
        ActivationDataset.open(str(tmp_path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("format", "other", "not 'dictlearn.activations'"), ("version", 3, "version 3")],
)
def test_unknown_format_or_version(tmp_path: Path, field: str, value: object, message: str) -> None:
    url, _ = _make(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest[field] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=message) as err:
        ActivationDataset.open(url)
    assert "manifest.json" in str(err.value)


def test_truncated_shard(tmp_path: Path) -> None:
    url, _ = _make(tmp_path)
    path = tmp_path / "shards" / "shard-00001.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"shard-00001\.bin: 6300 bytes, expected 6400"):
        ActivationDataset.open(url)


def test_sidecar_d_model_disagrees(tmp_path: Path) -> None:
    url, _ = _make(tmp_path, d=8)
    # Same byte count (100 x 16 = 200 x 8), so only the sidecar can tell.
    write_shard(url, 1, _rows(5, 100, 16), "float32")
    with pytest.raises(
        DatasetError, match=r"shard-00001\.json: d_model 16 .* but 8 in the manifest"
    ):
        ActivationDataset.open(url)


def test_sidecar_dtype_disagrees(tmp_path: Path) -> None:
    url, _ = _make(tmp_path, d=8)
    write_shard(url, 1, _rows(5, 400, 8), "bfloat16")  # same byte count as 200 float32 rows
    with pytest.raises(
        DatasetError, match=r"shard-00001\.json: dtype 'bfloat16' .* 'float32' in the manifest"
    ):
        ActivationDataset.open(url)


def test_commit_refuses_mixed_or_missing_shards(tmp_path: Path) -> None:
    url = str(tmp_path)
    a = write_shard(url, 0, _rows(0, 10, 4), "float32")
    b = write_shard(url, 1, _rows(1, 10, 8), "float32")
    c = write_shard(url, 2, _rows(2, 10, 4), "float32")
    with pytest.raises(DatasetError, match=r"shard-00001\.json: d_model 8"):
        commit_manifest(url, [a, b, c], source_model="m", hook="h", layer=None)
    with pytest.raises(DatasetError, match=r"shards \[1\] are not committed"):
        commit_manifest(url, [a, c], source_model="m", hook="h", layer=None)
    (tmp_path / "shards" / "shard-00002.bin").unlink()
    with pytest.raises(DatasetError, match=r"shard-00002\.bin: shard file is missing"):
        commit_manifest(
            url,
            [a, write_shard(url, 1, _rows(1, 10, 4), "float32"), c],
            source_model="m",
            hook="h",
            layer=None,
        )


def test_nan_rejected_on_write_and_detected_on_read(tmp_path: Path) -> None:
    bad = _rows(0, 20, 4)
    bad[7, 2] = np.nan
    with pytest.raises(DatasetError, match=r"shard-00000\.bin: 1 rows hold NaN/Inf"):
        write_shard(str(tmp_path), 0, bad, "float32")
    # bfloat16 overflow becomes Inf: also refused.
    with pytest.raises(DatasetError, match="NaN/Inf after casting to bfloat16"):
        write_shard(str(tmp_path), 0, np.full((2, 4), 1e39, np.float64), "bfloat16")

    url, _ = _make(tmp_path / "ds")
    _downgrade_to_version_1(tmp_path / "ds")  # version 2 reads catch this by checksum
    path = tmp_path / "ds" / "shards" / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    data[(150 * 8 + 3) * 4 : (150 * 8 + 4) * 4] = np.float32(np.nan).tobytes()
    path.write_bytes(bytes(data))
    with pytest.warns(DatasetWarning):
        ds = ActivationDataset.open(url)  # sizes are intact: the cheap check passes
    np.testing.assert_array_equal(ds.read_rows(0, 0, 150).shape, (150, 8))
    with pytest.raises(
        DatasetError, match=r"shard-00000\.bin: NaN/Inf in rows \[128, 192\) .* row 150"
    ):
        ds.read_rows(0, 128, 192)
    with pytest.raises(DatasetError, match=r"shard-00000\.bin: NaN/Inf"):
        ds.validate(deep=True)


def test_crc_mismatch_in_deep_validation_of_version_1(tmp_path: Path) -> None:
    url, _ = _make(tmp_path)
    _downgrade_to_version_1(tmp_path)
    _flip_bit(tmp_path / "shards" / "shard-00001.bin", 10)
    with pytest.warns(DatasetWarning, match="version 1 has no block checksums"):
        ds = ActivationDataset.open(url)
    ds.validate(deep=False)
    with pytest.raises(DatasetError, match=r"shard-00001\.bin: CRC32 \d+ != \d+"):
        ds.validate(deep=True)


def test_corrupt_block_fails_the_read_that_touches_it(tmp_path: Path) -> None:
    url, arrays = _make(tmp_path, sizes=(300, 200))
    row_bytes = 8 * 4
    _flip_bit(tmp_path / "shards" / "shard-00001.bin", 130 * row_bytes + 5)  # block 2 of 64 rows
    ds = ActivationDataset.open(url)  # sizes and sidecars are intact: the quick check passes
    assert ds.checks_blocks
    np.testing.assert_array_equal(ds.read_rows(1, 0, 128), arrays[1][:128])
    np.testing.assert_array_equal(ds.read_rows(1, 192, 200), arrays[1][192:])
    message = (
        r"shard-00001\.bin: block 2 \(rows \[128, 192\)\) fails its CRC32 check.*"
        r"dictlearn validate .* --deep.*delete .*shards/shard-00001\.json and .*manifest\.json"
    )
    for start, stop in ((129, 131), (100, 140), (0, 200)):  # unaligned reads widen to the block
        with pytest.raises(DatasetError, match=message):
            ds.read_rows(1, start, stop)
    # Through the batch stream's prefetch thread, as training meets it.
    with (
        BatchStream(ds, global_batch=64, seed=0, block_rows=64, shuffle_blocks=2) as stream,
        pytest.raises(DatasetError, match=message),
    ):
        for _ in range(2 * stream.batches_per_epoch):
            next(stream)


def test_deep_validation_lists_every_corrupt_block(tmp_path: Path) -> None:
    url, _ = _make(tmp_path, sizes=(300, 200))
    row_bytes = 8 * 4
    _flip_bit(tmp_path / "shards" / "shard-00000.bin", 299 * row_bytes)  # last, short block
    _flip_bit(tmp_path / "shards" / "shard-00001.bin", 3)
    _flip_bit(tmp_path / "shards" / "shard-00001.bin", 199 * row_bytes)
    ds = ActivationDataset.open(url)
    ds.validate(deep=False)
    with pytest.raises(
        DatasetError,
        match=r"3 corrupt blocks in 2 shards \(shards/shard-00000\.bin blocks \[4\]; "
        r"shards/shard-00001\.bin blocks \[0, 3\]\); to repair, delete shards/shard-00000\.json "
        r"shards/shard-00001\.json and manifest\.json",
    ):
        ds.validate(deep=True)


def test_checksum_rows_need_not_divide_the_reads(tmp_path: Path) -> None:
    url, rows = str(tmp_path), _rows(0, 100, 8)
    commit_manifest(
        url,
        [write_shard(url, 0, rows, "float32", checksum_rows=7)],
        source_model="m",
        hook="h",
        layer=None,
    )
    ds = ActivationDataset.open(url)
    info = read_shard_info(url, 0)
    assert info is not None and info.checksum_rows == 7 and len(info.block_crc32 or []) == 15
    for start, stop in ((0, 100), (6, 8), (13, 14), (95, 100), (98, 99)):
        np.testing.assert_array_equal(ds.read_rows(0, start, stop), rows[start:stop])
    ds.validate(deep=True)


def test_version_1_is_read_with_one_warning(tmp_path: Path) -> None:
    url, arrays = _make(tmp_path)
    _downgrade_to_version_1(tmp_path)
    with pytest.warns(DatasetWarning) as caught:
        ds = ActivationDataset.open(url)
        ActivationDataset.open(url)
    assert len(caught) == 1 and str(tmp_path) in str(caught[0].message)
    assert not ds.checks_blocks
    np.testing.assert_array_equal(ds.read_rows(1, 17, 150), arrays[1][17:150])
    ds.validate(deep=True)


def test_commit_with_old_sidecars_writes_version_1(tmp_path: Path) -> None:
    """A generation resumed across the upgrade: old shards have no block checksums."""
    url = str(tmp_path)
    old = write_shard(url, 0, _rows(0, 50, 4), "float32")
    old = old.model_copy(update={"checksum_rows": None, "block_crc32": None})
    (tmp_path / "shards" / "shard-00000.json").write_text(old.model_dump_json())
    new = write_shard(url, 1, _rows(1, 50, 4), "float32")
    with pytest.warns(DatasetWarning, match=r"shards \[0\] have no block checksums"):
        manifest = commit_manifest(
            url, read_shard_infos(url).values(), source_model="m", hook="h", layer=None
        )
    assert manifest.version == 1
    again = write_shard(url, 0, _rows(0, 50, 4), "float32")
    assert commit_manifest(url, [again, new], source_model="m", hook="h", layer=None).version == 2


def test_read_out_of_range(tmp_path: Path) -> None:
    url, _ = _make(tmp_path)
    ds = ActivationDataset.open(url)
    with pytest.raises(DatasetError, match=r"shard-00001\.bin: rows \[150, 201\) out of range"):
        ds.read_rows(1, 150, 201)


def test_check_compatible(tmp_path: Path) -> None:
    a = ActivationDataset.open(_make(tmp_path / "a", d=8)[0])
    b = ActivationDataset.open(_make(tmp_path / "b", d=16)[0])
    c = ActivationDataset.open(_make(tmp_path / "c", d=8, hook="resid_post.7")[0])
    same = ActivationDataset.open(_make(tmp_path / "same", d=8)[0])
    check_compatible([a, same])
    with pytest.raises(DatasetError, match=r"mixing d_model 8 \(.*/a\) with 16 \(.*/b\)"):
        check_compatible([a, b])
    with pytest.raises(DatasetError, match=r"mixing hook 'resid_post.6' .* 'resid_post.7'"):
        check_compatible([a, same, c])


def test_checksums_are_zlibs_crc32() -> None:
    """The shard format's checksum is zlib's CRC-32 (datasets written before zlib-ng computed
    it, and other readers, check the same values), chained and over memoryview slices too."""
    data = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    view = memoryview(data)
    for size in (0, 1, 15, 64 * 1280, len(data)):
        assert compute_crc32(view[:size]) == zlib.crc32(view[:size])
    chained = 0
    for offset in range(0, len(data), 81_920):
        chained = compute_crc32(view[offset : offset + 81_920], chained)
    assert chained == zlib.crc32(data)
