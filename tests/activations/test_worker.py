"""``ShardWorker`` without Ray: the per-shard job, on a mesh of this process's 8 CPU devices."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dictlearn.activations import ModelConfig, ShardWorker, WorkerSpec, resolve_model
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
