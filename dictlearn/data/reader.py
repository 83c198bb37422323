"""Deterministic, seeded, resumable streams of global batches, sliced per process.

The order of rows depends only on the dataset, the seed and the block/window sizes, never on how
many processes read it: a 2-process run sees exactly the global batches of a 1-process run, and a
run resumed from ``position`` sees exactly what it would have seen had it never stopped.

The order, in full (``R = block_rows``, ``S = shuffle_blocks``, ``B = global_batch``):

1. Each shard is cut into blocks of ``R`` consecutive rows (a shard's trailing partial block is
   dropped). Blocks are numbered globally, shard by shard: ``j = 0, 1, ...``.
2. Block ``j`` belongs to the eval split iff ``hash(split_seed, j) < eval_fraction`` (a
   SplitMix64 hash mapped to [0, 1)), else to train. The split does not depend on ``seed``, so
   runs with different seeds share one eval set.
3. Epoch ``e`` orders the split's blocks by ``default_rng([seed, 1, e]).permutation``.
4. The permuted blocks are grouped into windows of ``S`` blocks; the ``S * R`` rows of window
   ``w`` are permuted by ``default_rng([seed, 2, e, w]).permutation``. Concatenating the windows
   gives the epoch's row stream.
5. The stream is cut into global batches of ``B`` rows; rows left over at the end of an epoch are
   dropped. Global batch ``n`` is batch ``n % batches_per_epoch`` of epoch
   ``n // batches_per_epoch``, and epochs repeat forever.
6. Process ``p`` of ``P`` gets rows ``[p * B / P, (p + 1) * B / P)`` of every global batch and
   reads from storage only the blocks holding those rows.

(The constant 1 and 2 in the seeds keep the two families of generators apart: numpy's
``SeedSequence`` treats ``[s, e]`` and ``[s, e, 0]`` as the same seed.)

    with BatchStream(ds, global_batch=4096, seed=0, process_index=jax.process_index(),
                     process_count=jax.process_count(), position=ckpt_position) as stream:
        for local_rows in stream:           # [4096 / P, d_model] float32 (as_float32), raw
            ...
            save(..., data_position=stream.position)
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import numpy as np

from dictlearn.data.dataset import ActivationDataset
from dictlearn.data.format import DatasetError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_MIN_GATHER_ROWS = 256  # below this a thread's share of the row gather costs more than it saves
_MAX_DEFAULT_READ_THREADS = 8
_SPARE_WINDOW_BUFFERS = 2  # a batch spans at most a few windows; more would only hold memory


def default_read_threads() -> int:
    """Read threads when none are asked for: one per core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(_MAX_DEFAULT_READ_THREADS, cores or 1))


def _unit_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of ``(seed, id)`` mapped to [0, 1): a stateless per-block coin.

    Stateless (unlike drawing ``n_blocks`` numbers from one generator) so a block's split never
    depends on how many blocks the dataset has or on numpy's generator internals.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap
        z = ids.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_blocks(
    dataset: ActivationDataset, *, block_rows: int, eval_fraction: float, split_seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Assign every block of the dataset to train or eval.

    Returns:
        ``{"train": (shards, starts), "eval": (shards, starts)}``: for each split, the shard
        index and first row of each of its blocks, in global block order.
    """
    per_shard = [shard.n_tokens // block_rows for shard in dataset.manifest.shards]
    shards = np.repeat(np.arange(len(per_shard), dtype=np.int64), per_shard)
    starts = np.concatenate([np.arange(k, dtype=np.int64) * block_rows for k in per_shard])
    is_eval = _unit_hash(np.arange(shards.size), split_seed) < eval_fraction
    return {
        "train": (shards[~is_eval], starts[~is_eval]),
        "eval": (shards[is_eval], starts[is_eval]),
    }


@dataclass
class _Window:
    """One window's blocks and row permutation, plus the blocks read so far."""

    blocks: np.ndarray  # split-block indices, in window order
    row_perm: np.ndarray  # permutation of len(blocks) * block_rows
    buffer: np.ndarray  # [len(blocks), block_rows, d_model], filled on demand
    loaded: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.loaded = np.zeros(len(self.blocks), bool)


class _Failure:
    """Carries an exception from the prefetch thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchStream:
    """An endless iterator over this process's slice of deterministic global batches.

    Args:
        dataset: The dataset to read.
        global_batch: Rows per global batch (over all processes).
        seed: Seed of the epoch and window permutations (>= 0).
        split: ``"train"`` or ``"eval"``.
        eval_fraction: Fraction of blocks held out for eval, in [0, 1). Train and eval streams
            must use the same value (and ``split_seed``) to be disjoint.
        split_seed: Seed of the train/eval assignment; independent of ``seed`` so that runs
            with different seeds evaluate on the same blocks.
        block_rows: Rows per block, the unit of storage reads and of the epoch shuffle.
        shuffle_blocks: Blocks per window of the row shuffle; larger mixes more but makes each
            process read more of the window for its slice.
        process_index: This process's index ``p``.
        process_count: Number of processes ``P``; must divide ``global_batch``.
        position: Number of global batches already consumed (from a checkpoint); the stream
            starts at that batch without replaying the ones before.
        prefetch: Batches prepared ahead by a background thread; 0 reads synchronously.
        read_threads: Threads that read, check and decode a batch's blocks and gather its
            rows in parallel (file reads, CRC32 and numpy copies release the GIL); 0 picks
            ``default_read_threads()``, 1 does it all on the producing thread. The rows are
            the same for every value.
        as_float32: Yield float32 rows (True) or rows in the dataset's storage dtype (False:
            a bf16 dataset's rows stay bf16, half the bytes to copy, shuffle and transfer).

    Raises:
        DatasetError: bad arguments, or the split has fewer rows than one global batch.
    """

    def __init__(
        self,
        dataset: ActivationDataset,
        *,
        global_batch: int,
        seed: int,
        split: Literal["train", "eval"] = "train",
        eval_fraction: float = 0.0,
        split_seed: int = 0,
        block_rows: int = 256,
        shuffle_blocks: int = 16,
        process_index: int = 0,
        process_count: int = 1,
        position: int = 0,
        prefetch: int = 2,
        read_threads: int = 0,
        as_float32: bool = True,
    ) -> None:
        if split not in ("train", "eval"):
            raise DatasetError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0.0 <= eval_fraction < 1.0:
            raise DatasetError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if split == "eval" and eval_fraction == 0.0:
            raise DatasetError(
                "split='eval' with eval_fraction=0.0 selects no blocks; set eval_fraction "
                "(e.g. 0.01) for both the train and the eval stream"
            )
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DatasetError(
                f"process_index {process_index} is not in [0, process_count={process_count})"
            )
        if global_batch < 1 or global_batch % process_count:
            raise DatasetError(
                f"global_batch {global_batch} must be a positive multiple of process_count "
                f"{process_count}"
            )
        for name, value, minimum in (
            ("block_rows", block_rows, 1),
            ("shuffle_blocks", shuffle_blocks, 1),
            ("seed", seed, 0),
            ("position", position, 0),
            ("prefetch", prefetch, 0),
            ("read_threads", read_threads, 0),
        ):
            if value < minimum:
                raise DatasetError(f"{name} must be >= {minimum}, got {value}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.split = split
        self.block_rows = block_rows
        self.shuffle_blocks = shuffle_blocks
        self.process_index = process_index
        self.process_count = process_count
        self.prefetch = prefetch
        self.read_threads = read_threads or default_read_threads()
        self.row_dtype = np.dtype(np.float32) if as_float32 else dataset.storage_dtype
        self.position = position
        """Global batches already yielded: save it in checkpoints, pass it back to resume."""

        self._shards, self._starts = split_blocks(
            dataset, block_rows=block_rows, eval_fraction=eval_fraction, split_seed=split_seed
        )[split]
        self.rows_per_epoch = self._shards.size * block_rows
        if self.rows_per_epoch < global_batch:
            raise DatasetError(
                f"{dataset.url}: the {split} split has {self._shards.size} blocks of "
                f"{block_rows} rows ({self.rows_per_epoch} rows), fewer than one global batch "
                f"of {global_batch}; use a smaller batch or block_rows, or a larger dataset"
            )
        self._epoch_cache: tuple[int, np.ndarray] | None = None
        self._windows: dict[tuple[int, int], _Window] = {}
        self._spare_buffers: list[np.ndarray] = []
        self._queue: queue.Queue[tuple[np.ndarray, None] | _Failure] = queue.Queue(
            maxsize=max(prefetch, 1)
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the last partial batch of an epoch is dropped)."""
        return self.rows_per_epoch // self.global_batch

    # -- the order: pure functions of (seed, epoch, window) --------------------------------

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self._shards.size)
            self._epoch_cache = (epoch, perm)
        return self._epoch_cache[1]

    def _window(self, epoch: int, window: int) -> _Window:
        key = (epoch, window)
        if key not in self._windows:
            perm = self._epoch_perm(epoch)
            blocks = perm[window * self.shuffle_blocks : (window + 1) * self.shuffle_blocks]
            row_perm = np.random.default_rng([self.seed, 2, epoch, window]).permutation(
                blocks.size * self.block_rows
            )
            shape = (blocks.size, self.block_rows, self.dataset.d_model)
            spare = self._spare_buffers.pop() if self._spare_buffers else None
            reuse = spare is not None and spare.shape == shape
            buffer = spare if reuse else np.empty(shape, self.row_dtype)
            self._windows[key] = _Window(blocks, row_perm, buffer)
        return self._windows[key]

    def _parallel(self, tasks: list[Callable[[], None]]) -> None:
        """Run ``tasks`` on the read pool (inline when there is one task or one thread) and
        re-raise the first failure once all have finished."""
        if len(tasks) == 1 or self.read_threads == 1:
            for task in tasks:
                task()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="BatchStream")
        futures = [self._pool.submit(task) for task in tasks]
        wait(futures)  # none still writing into a buffer when a failure propagates
        for future in futures:
            future.result()

    def _load(self, window: _Window, slots: np.ndarray) -> None:
        missing = slots[~window.loaded[slots]]
        if missing.size == 0:
            return
        blocks = window.blocks[missing]
        ranges = [
            (int(shard), int(start), int(start) + self.block_rows)
            for shard, start in zip(self._shards[blocks], self._starts[blocks], strict=True)
        ]

        def read(group: np.ndarray) -> Callable[[], None]:
            def task() -> None:
                # Each block decodes straight into its slot of the window's buffer.
                self.dataset.read_row_ranges(
                    [ranges[i] for i in group], [window.buffer[missing[i]] for i in group]
                )

            return task

        groups = np.array_split(np.arange(missing.size), min(self.read_threads, missing.size))
        self._parallel([read(group) for group in groups])
        window.loaded[missing] = True

    def _gather(self, out: np.ndarray, window: _Window, indices: np.ndarray) -> None:
        """``out[:]`` = the window's rows ``indices`` (counted over its blocks in order), in row
        chunks on the read pool."""
        flat = window.buffer.reshape(-1, window.buffer.shape[-1])

        def copy(part: slice) -> Callable[[], None]:
            # mode="clip" writes straight into ``out`` ("raise" would gather into a temporary
            # first); it clips nothing, as the indices come from a permutation of the window.
            return lambda: np.take(flat, indices[part], axis=0, out=out[part], mode="clip")

        chunks = min(self.read_threads, max(1, indices.size // _MIN_GATHER_ROWS))
        bounds = np.linspace(0, indices.size, chunks + 1).astype(int)
        self._parallel([copy(slice(a, b)) for a, b in itertools.pairwise(bounds)])

    def _produce(self, n: int) -> np.ndarray:
        """This process's slice of global batch ``n``."""
        epoch, b = divmod(n, self.batches_per_epoch)
        lo = b * self.global_batch + self.process_index * self.local_batch
        hi = lo + self.local_batch
        window_rows = self.shuffle_blocks * self.block_rows
        out = np.empty((self.local_batch, self.dataset.d_model), self.row_dtype)
        filled = 0
        first_window, last_window = lo // window_rows, (hi - 1) // window_rows
        for w in range(first_window, last_window + 1):
            a = max(lo, w * window_rows) - w * window_rows
            c = min(hi, (w + 1) * window_rows) - w * window_rows
            window = self._window(epoch, w)
            indices = window.row_perm[a:c]
            self._load(window, np.unique(indices // self.block_rows))
            self._gather(out[filled : filled + c - a], window, indices)
            filled += c - a
        # The next batch of this process starts at or after the last window touched here, so
        # earlier windows' blocks will never be needed again. Their buffers are kept for the
        # next windows: fresh ones would be page-faulted in again on every window.
        done = [k for k in self._windows if k < (epoch, last_window)]
        self._spare_buffers += [self._windows.pop(k).buffer for k in done]
        del self._spare_buffers[_SPARE_WINDOW_BUFFERS:]
        return out

    # -- iteration and prefetching --------------------------------------------------------

    def _run(self, start: int) -> None:
        n = start
        try:
            while not self._stop.is_set():
                self._put((self._produce(n), None))
                n += 1
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_Failure(exc))

    def _put(self, item: tuple[np.ndarray, None] | _Failure) -> None:
        # Time out so close() can stop a thread blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise RuntimeError("BatchStream is closed")
        if self._failure is not None:
            raise self._failure
        if self.prefetch == 0:
            batch = self._produce(self.position)
        else:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self.position,), name="BatchStream", daemon=True
                )
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._failure = item.exc
                raise item.exc
            batch = item[0]
        self.position += 1
        return batch

    def close(self) -> None:
        """Stop the prefetch thread and release buffers. Idempotent."""
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._windows = {}
        self._spare_buffers = []

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
