"""BatchStream: the order is a function of the seed only, whatever the process count or resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from dictlearn.data import (
    ActivationDataset,
    BatchStream,
    DatasetError,
    commit_manifest,
    storage,
    write_shard,
)

# Shard sizes with trailing partial blocks (block_rows 32 below), to exercise the drop rule.
SIZES = (1000, 700, 1310)
ROW_ID_SCALE = 10_000
B = 96  # divisible by 1, 2 and 4 processes; not a multiple of the 128-row window


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ActivationDataset:
    """Rows whose first column is their global identity: shard * 10000 + row."""
    url = str(tmp_path_factory.mktemp("ids"))
    infos = []
    for shard, n in enumerate(SIZES):
        rows = np.zeros((n, 4), np.float32)
        rows[:, 0] = shard * ROW_ID_SCALE + np.arange(n)
        rows[:, 1] = shard
        rows[:, 2] = np.arange(n)
        rows[:, 3] = 1.0
        infos.append(write_shard(url, shard, rows, "float32"))
    commit_manifest(url, infos, source_model="ids", hook="ids", layer=None)
    return ActivationDataset.open(url)


def _full_block_ids(block_rows: int) -> set[int]:
    return {
        shard * ROW_ID_SCALE + row
        for shard, n in enumerate(SIZES)
        for row in range(n // block_rows * block_rows)
    }


def _take(stream: BatchStream, n: int) -> list[np.ndarray]:
    with stream:
        return list(itertools.islice(stream, n))


def _stream(dataset: ActivationDataset, **kw: object) -> BatchStream:
    args: dict = {"global_batch": B, "seed": 0, "block_rows": 32, "shuffle_blocks": 4} | kw
    return BatchStream(dataset, **args)


def test_rows_are_unchanged_and_seed_determines_order(dataset: ActivationDataset) -> None:
    stream = _stream(dataset)
    n = stream.batches_per_epoch + 5  # run into the second epoch
    first = _take(stream, n)
    again = _take(_stream(dataset), n)
    other = _take(_stream(dataset, seed=1), n)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(np.stack(first)[:, :, 0], np.stack(other)[:, :, 0])
    batch = np.concatenate(first)
    assert batch.shape == (n * B, 4) and batch.dtype == np.float32
    # Each row is the stored row: its columns agree with its identity.
    np.testing.assert_array_equal(batch[:, 0], batch[:, 1] * ROW_ID_SCALE + batch[:, 2])
    # Epoch 2 is a fresh permutation, not a replay of epoch 1.
    bpe = stream.batches_per_epoch
    assert not np.array_equal(first[0], first[bpe])


def test_every_row_once_per_epoch(dataset: ActivationDataset) -> None:
    # global_batch = block_rows: nothing is dropped at the end of an epoch.
    stream = _stream(dataset, global_batch=32)
    n_blocks = sum(n // 32 for n in SIZES)
    assert stream.batches_per_epoch == n_blocks
    for epoch_batches in np.split(np.stack(_take(stream, 2 * n_blocks)), 2):
        ids = epoch_batches[:, :, 0].ravel().astype(np.int64)
        assert len(ids) == len(set(ids.tolist()))
        assert set(ids.tolist()) == _full_block_ids(32)


def test_epoch_tail_is_dropped(dataset: ActivationDataset) -> None:
    stream = _stream(dataset)
    rows = sum(n // 32 for n in SIZES) * 32
    assert stream.batches_per_epoch == rows // B
    ids = np.stack(_take(stream, stream.batches_per_epoch))[:, :, 0].ravel()
    assert len(set(ids.tolist())) == stream.batches_per_epoch * B  # no repeats within an epoch


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_tile_the_global_batch(dataset: ActivationDataset, processes: int) -> None:
    n = _stream(dataset).batches_per_epoch + 3
    reference = _take(_stream(dataset), n)
    slices = [
        _take(_stream(dataset, process_index=p, process_count=processes), n)
        for p in range(processes)
    ]
    for step, expected in enumerate(reference):
        parts = [slices[p][step] for p in range(processes)]
        assert all(part.shape == (B // processes, 4) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_processes_read_only_their_blocks(
    dataset: ActivationDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one block per window and a batch of P blocks, each process reads one block a batch."""
    counts: list[int] = []
    read = dataset.read_row_ranges

    def counting(ranges: list[tuple[int, int, int]], out: list[np.ndarray]) -> list[np.ndarray]:
        counts.append(len(ranges))
        return read(ranges, out)

    monkeypatch.setattr(dataset, "read_row_ranges", counting)
    for processes in (1, 4):
        for p in range(processes):
            counts.clear()
            # prefetch=0: no read-ahead, so the reads are exactly those of the 10 batches.
            kw = {"global_batch": 128, "shuffle_blocks": 1, "prefetch": 0, "read_threads": 3}
            _take(_stream(dataset, process_index=p, process_count=processes, **kw), 10)
            assert sum(counts) == 10 * 4 // processes


@pytest.mark.parametrize("start", [7, 20])  # inside epoch 0, and inside epoch 1 (27 per epoch)
def test_resume_equals_continuing(dataset: ActivationDataset, start: int) -> None:
    whole = _take(_stream(dataset, process_index=1, process_count=2), start + 10)
    stream = _stream(dataset, process_index=1, process_count=2, position=start)
    resumed = _take(stream, 10)
    assert stream.position == start + 10
    for a, b in zip(whole[start:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_position_counts_yielded_batches_and_prefetch_is_invisible(
    dataset: ActivationDataset,
) -> None:
    sync = _stream(dataset, prefetch=0)
    threaded = _stream(dataset, prefetch=3)
    for expected_position in range(1, 6):
        np.testing.assert_array_equal(next(sync), next(threaded))
        assert sync.position == threaded.position == expected_position
    threaded.close()
    sync.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(threaded)


def test_train_and_eval_blocks_are_disjoint(dataset: ActivationDataset) -> None:
    kw = {"global_batch": 32, "eval_fraction": 0.3}
    train = _stream(dataset, **kw)
    evaluation = _stream(dataset, split="eval", **kw)
    n_blocks = sum(n // 32 for n in SIZES)
    assert 0 < evaluation.batches_per_epoch < n_blocks
    assert train.batches_per_epoch + evaluation.batches_per_epoch == n_blocks
    train_ids = set(np.stack(_take(train, train.batches_per_epoch))[:, :, 0].ravel().tolist())
    eval_ids = set(
        np.stack(_take(evaluation, evaluation.batches_per_epoch))[:, :, 0].ravel().tolist()
    )
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == _full_block_ids(32)
    # The eval set depends on split_seed, not on the training seed.
    eval_other_seed = _stream(dataset, split="eval", seed=5, **kw)
    other_ids = np.stack(_take(eval_other_seed, eval_other_seed.batches_per_epoch))[:, :, 0]
    assert set(other_ids.ravel().tolist()) == eval_ids


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"split": "eval"}, "eval_fraction=0.0 selects no blocks"),
        ({"process_count": 5}, "multiple of process_count 5"),
        ({"process_index": 2, "process_count": 2}, "process_index 2 is not in"),
        ({"global_batch": 10_000}, "fewer than one global batch of 10000"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\)"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_arguments(dataset: ActivationDataset, kw: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        _stream(dataset, **kw)


def test_error_in_prefetch_thread_reaches_consumer(tmp_path: Path) -> None:
    url = str(tmp_path)
    rows = np.ones((256, 4), np.float32)
    commit_manifest(
        url, [write_shard(url, 0, rows, "float32")], source_model="m", hook="h", layer=None
    )
    ds = ActivationDataset.open(url)
    path = tmp_path / "shards" / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    data[:4] = np.float32(np.inf).tobytes()  # row 0: corrupt after the dataset was opened
    path.write_bytes(bytes(data))
    stream = BatchStream(ds, global_batch=256, seed=0, block_rows=256, prefetch=2)
    with stream, pytest.raises(DatasetError, match=r"shard-00000\.bin: block 0 .* CRC32"):
        next(stream)
    assert stream.position == 0


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_read_threads_are_invisible(dataset: ActivationDataset, threads: int) -> None:
    # A 2-block window (64 rows) makes every 96-row batch span two windows; 40 batches cross
    # the epoch end.
    kw = {"shuffle_blocks": 2, "prefetch": 0}
    serial = _take(_stream(dataset, read_threads=1, **kw), 40)
    threaded_stream = _stream(dataset, read_threads=threads, **kw)
    threaded = _take(threaded_stream, 40)
    assert threaded_stream.read_threads == threads
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_rows_decode_in_place_as_they_do_by_copy(tmp_path: Path) -> None:
    url = str(tmp_path)
    rows = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    commit_manifest(
        url, [write_shard(url, 0, rows, "bfloat16")], source_model="m", hook="h", layer=None
    )
    ds = ActivationDataset.open(url)
    copied = ds.read_row_ranges([(0, 0, 256), (0, 256, 512)])
    buffers = [np.full((256, 8), np.nan, np.float32) for _ in range(2)]
    in_place = ds.read_row_ranges([(0, 0, 256), (0, 256, 512)], buffers)
    assert all(a is b for a, b in zip(in_place, buffers, strict=True))
    for a, b in zip(copied, buffers, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(np.concatenate(buffers) - rows).max() < 1e-2  # bf16 rounding, not garbage
    with pytest.raises(ValueError, match=r"out is float64\[256, 8\]"):
        ds.read_row_ranges([(0, 0, 256)], [np.empty((256, 8))])
    serial = _take(BatchStream(ds, global_batch=128, seed=0, block_rows=64, read_threads=1), 8)
    pooled = _take(BatchStream(ds, global_batch=128, seed=0, block_rows=64, read_threads=4), 8)
    stored = _take(
        BatchStream(ds, global_batch=128, seed=0, block_rows=64, read_threads=4, as_float32=False),
        8,
    )
    for a, b, c in zip(serial, pooled, stored, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and c.dtype == ds.storage_dtype != np.float32
        np.testing.assert_array_equal(a, c.astype(np.float32))


def test_error_in_a_read_thread_reaches_consumer(tmp_path: Path) -> None:
    url = str(tmp_path)
    commit_manifest(
        url,
        [write_shard(url, 0, np.ones((1024, 4), np.float32), "float32")],
        source_model="m",
        hook="h",
        layer=None,
    )
    ds = ActivationDataset.open(url)
    path = tmp_path / "shards" / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    row_bytes = 4 * 4
    data[700 * row_bytes : 700 * row_bytes + 4] = np.float32(np.inf).tobytes()
    path.write_bytes(bytes(data))
    # Four 256-row blocks read by four threads; the one holding row 700 fails its check.
    stream = BatchStream(ds, global_batch=1024, seed=0, block_rows=256, read_threads=4, prefetch=0)
    with stream, pytest.raises(DatasetError, match=r"shard-00000\.bin: block \d+ .* CRC32"):
        next(stream)
    assert stream.position == 0
    assert stream._pool is None  # close() shut the read pool down


def test_local_and_object_store_reads_agree_and_truncation_is_named(tmp_path: Path) -> None:
    rows = np.random.default_rng(1).normal(size=(1024, 8)).astype(np.float32)
    urls = [str(tmp_path / "local"), f"memory://{tmp_path.name}/remote"]  # reused scratch / bytes
    for url in urls:
        commit_manifest(
            url, [write_shard(url, 0, rows, "float32")], source_model="m", hook="h", layer=None
        )
    local, remote = (ActivationDataset.open(url) for url in urls)
    ranges = [(0, 512, 768), (0, 0, 256), (0, 256, 300)]
    for a, b, (_, start, stop) in zip(
        local.read_row_ranges(ranges), remote.read_row_ranges(ranges), ranges, strict=True
    ):
        np.testing.assert_array_equal(a, rows[start:stop])  # each a copy, not the scratch
        np.testing.assert_array_equal(b, rows[start:stop])
    path = tmp_path / "local" / "shards" / "shard-00000.bin"
    path.write_bytes(path.read_bytes()[: 600 * 8 * 4])
    with pytest.raises(
        DatasetError, match=r"shard-00000\.bin: read .* bytes for rows \[512, 768\)"
    ):
        local.read_row_ranges([(0, 512, 768)])


def test_a_block_read_straight_into_its_buffer_is_checked_and_re_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows in the storage dtype are read straight into the caller's buffer. A bit flipped on the
    # way (injected here into the first read: a local disk cannot be made to do it) fails the
    # block's CRC32; the re-read's good bytes must replace the bad ones in the buffer.
    url = str(tmp_path)
    rows = np.random.default_rng(2).normal(size=(512, 8)).astype(np.float32)
    commit_manifest(
        url, [write_shard(url, 0, rows, "float32")], source_model="m", hook="h", layer=None
    )
    ds = ActivationDataset.open(url)
    read_range_into = storage.read_range_into
    into: list[object] = []

    def flip_the_first_read(fs: object, path: str, start: int, out: memoryview) -> int:
        got = read_range_into(fs, path, start, out)  # type: ignore[arg-type]
        into.append(out.obj)
        if len(into) == 1:
            out[5] ^= 0x10
        return got

    monkeypatch.setattr(storage, "read_range_into", flip_the_first_read)
    buffers = [np.zeros((256, 8), np.float32) for _ in range(2)]
    got = ds.read_row_ranges([(0, 256, 512), (0, 0, 256)], buffers)
    assert all(a is b for a, b in zip(got, buffers, strict=True))
    np.testing.assert_array_equal(buffers[0], rows[256:512])
    np.testing.assert_array_equal(buffers[1], rows[:256])
    # Both reads landed in the buffers' own memory, not in a scratch buffer.
    assert [np.shares_memory(np.asarray(o), b) for o, b in zip(into, buffers, strict=True)] == [
        True,
        True,
    ]
