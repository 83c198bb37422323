"""``ShardWorker`` without Ray: the per-shard job, on a mesh of this process's 8 CPU devices."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dictlearn.activations import ModelConfig, ShardWorker, WorkerSpec, resolve_model
from dictlearn.activations import worker as worker_module
from dictlearn.activations.worker import _Prefetch
from dictlearn.config import ConfigError
from dictlearn.corpus import CorpusError, plan_corpus_shards
from dictlearn.data import read_shard_info
from dictlearn.data.format import numpy_dtype
from sharding import MeshConfig

from .helpers import expected_rows, tiny


def _spec(out: Path, mesh: MeshConfig | None, batch_size: int = 4) -> WorkerSpec:
    return WorkerSpec(
        model=resolve_model(ModelConfig()),
        hooks=("resid_post.3", "attn_out.1"),
        outputs={"resid_post.3": str(out / "resid_post.3"), "attn_out.1": str(out / "attn_out.1")},
        context_length=64,
        batch_size=batch_size,
        exclude_positions=(0,),
        exclude_token_ids=(2,),
        dtype="float32",
        mesh=mesh,
    )


def test_sharded_worker_matches_the_unsharded_reference(tmp_path: Path) -> None:
    # data=4 x model=2: the batch split four ways, heads / FFN / vocabulary two ways.
    worker = ShardWorker(_spec(tmp_path, MeshConfig(data=-1, model=2)))
    assert worker.ready() == worker.pid()
    config = tiny(str(tmp_path))
    shard = plan_corpus_shards(config.corpus)[1]
    outcome = worker.process(shard, max_contexts=10)
    assert (outcome.index, outcome.contexts, outcome.lm_tokens) == (1, 10, 640)
    want = expected_rows(config, 1)
    for hook, info in outcome.infos.items():
        assert read_shard_info(str(tmp_path / hook), 1) == info
        raw = (tmp_path / hook / "shards" / "shard-00001.bin").read_bytes()
        got = np.frombuffer(raw, numpy_dtype("float32")).reshape(info.n_tokens, info.d_model)
        assert got.shape == want[hook].shape
        # Splitting heads and FFN over devices sums partial products in another order, so rows
        # agree to float32 rounding (~1e-7 relative), not bit for bit.
        err = np.linalg.norm(got - want[hook], axis=1) / np.linalg.norm(want[hook], axis=1)
        assert err.max() < 1e-5, f"{hook}: max row rel err {err.max():.2e}"
    assert worker.status() == {"shard": None, "batches": 3, "contexts": 10, "shards_done": 1}
    assert not _prefetch_threads(), "the shard's reader thread outlived it"


def test_a_shard_is_written_while_the_next_one_runs_its_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two process() calls at once, as the threaded actor of `generate` makes them: the first
    # shard's write waits until the second shard's forward has started, which only happens if
    # the forward lock is released before writing (else the wait times out).
    out = tmp_path / "out"
    worker = ShardWorker(_spec(out, None))
    config = tiny(str(out))
    first_shard, second_shard = plan_corpus_shards(config.corpus)[:2]
    calls: list[str] = []
    second_forward_started = threading.Event()
    forward = worker._forward

    def spy_forward(params: object, tokens: object) -> object:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "second":
            second_forward_started.set()
        return forward(params, tokens)

    write_shard = worker_module.write_shard
    overlapped: list[bool] = []

    def write_after_the_next_forward_starts(url: str, index: int, *args: object) -> object:
        if index == first_shard.index:
            overlapped.append(second_forward_started.wait(timeout=60))
        return write_shard(url, index, *args)

    worker._forward = spy_forward  # type: ignore[method-assign]
    monkeypatch.setattr(worker_module, "write_shard", write_after_the_next_forward_starts)
    outcomes: dict[str, object] = {}

    def run(shard: object) -> None:
        try:
            outcomes[threading.current_thread().name] = worker.process(shard, max_contexts=10)
        except BaseException as err:  # re-raised in the test thread below
            outcomes[threading.current_thread().name] = err

    cpu0 = time.process_time()
    first = threading.Thread(target=run, args=(first_shard,), name="first")
    second = threading.Thread(target=run, args=(second_shard,), name="second")
    first.start()
    while worker.status()["shard"] != first_shard.index and first.is_alive():
        time.sleep(0.005)
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)
    cpu_total = time.process_time() - cpu0
    for name in ("first", "second"):
        if isinstance(outcomes[name], BaseException):
            raise outcomes[name]  # type: ignore[misc]
    # Every hook's shard is written, once per shard: one write per hook waited, and none of them
    # timed out.
    assert overlapped == [True, True]
    # The forward passes took turns: all of the first shard's before any of the second's.
    assert calls == ["first"] * 3 + ["second"] * 3, calls
    for shard in (first_shard, second_shard):
        want = expected_rows(config, shard.index)
        for hook in want:
            info = read_shard_info(str(out / hook), shard.index)
            raw = (out / hook / "shards" / f"shard-{shard.index:05d}.bin").read_bytes()
            got = np.frombuffer(raw, numpy_dtype("float32")).reshape(info.n_tokens, info.d_model)
            np.testing.assert_array_equal(got, want[hook], err_msg=f"{hook} shard {shard.index}")
    # The busy CPU time is handed out once: the outcomes' sum is not the overlap counted twice.
    cpu_s = sum(outcomes[name].cpu_s for name in ("first", "second"))  # type: ignore[union-attr]
    assert 0.5 * cpu_total < cpu_s <= cpu_total, (cpu_s, cpu_total)
    assert worker.status() == {"shard": None, "batches": 3, "contexts": 10, "shards_done": 2}


def test_mesh_that_does_not_fit_the_host_is_a_config_error(tmp_path: Path) -> None:
    worker = ShardWorker(_spec(tmp_path, MeshConfig(data=-1, model=3)))
    with pytest.raises(ConfigError, match=r"mesh: mesh.model=3 does not divide the 8"):
        worker.ready()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dictlearn-prefetch"]


def test_prefetch_hands_over_the_source_error_as_itself() -> None:
    error = CorpusError("docs.jsonl:3: field 'text' is int")

    def source() -> Iterator[int]:
        yield 0
        yield 1
        raise error

    got = []
    with pytest.raises(CorpusError) as raised, _Prefetch(source(), depth=1) as items:
        got.extend(items)
    assert raised.value is error
    assert got == [0, 1]
    assert not _prefetch_threads()


def test_prefetch_left_early_stops_its_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            closed.set()

    with _Prefetch(source(), depth=2) as items:
        assert [next(items), next(items)] == [0, 1]
    assert closed.is_set()
    assert not _prefetch_threads()
