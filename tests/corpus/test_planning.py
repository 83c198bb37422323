"""Shard planning: deterministic, an exact partition of the documents, readable per shard."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dictlearn.corpus import (
    CorpusConfig,
    CorpusError,
    CorpusShard,
    iter_documents,
    plan_corpus_shards,
)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A mixed corpus of 6 txt docs, 3 jsonl files (25 docs) and a parquet file with 4 row
    groups (23 docs); every document text is unique, so duplicates and losses show."""
    docs = []
    for i in range(6):
        text = f"txt document {i}"
        (tmp_path / f"t{i}.txt").write_text(text)
        docs.append(text)
    for j, n in enumerate([10, 1, 14]):
        texts = [f"jsonl {j} line {k}" for k in range(n)]
        (tmp_path / f"j{j}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts)
        )
        docs += texts
    texts = [f"parquet row {k}" for k in range(23)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet", row_group_size=6)
    docs += texts
    return tmp_path, docs


@pytest.mark.parametrize("n_shards", [1, 3, 7, 54])
def test_shards_partition_the_documents(corpus: tuple[Path, list[str]], n_shards: int) -> None:
    root, docs = corpus
    shards = plan_corpus_shards(CorpusConfig(paths=[str(root)], n_shards=n_shards, seed=5))
    per_shard = [list(iter_documents(s)) for s in shards]
    read = [d for shard_docs in per_shard for d in shard_docs]
    assert sorted(read) == sorted(docs)  # Nothing lost, nothing read twice.
    sizes = [len(d) for d in per_shard]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [s.n_documents for s in shards]
    assert [s.index for s in shards] == list(range(n_shards))


def test_plan_is_deterministic_and_seeded(corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    plan = lambda seed: plan_corpus_shards(  # noqa: E731
        CorpusConfig(paths=[str(root)], n_shards=4, seed=seed)
    )
    assert plan(1) == plan(1)
    files = lambda shards: [p.path for s in shards for p in s.pieces]  # noqa: E731
    assert files(plan(1)) != files(plan(2))  # The seed shuffles whole files.
    # No seed: the sorted listing order, each file's documents in their own order.
    unshuffled = [d for s in plan(None) for d in iter_documents(s)]
    assert unshuffled[:2] == ["jsonl 0 line 0", "jsonl 0 line 1"]
    assert unshuffled[-1] == "txt document 5"


def test_shard_round_trips_through_json(corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    for shard in plan_corpus_shards(CorpusConfig(paths=[str(root)], n_shards=5)):
        copy = CorpusShard.model_validate_json(shard.model_dump_json())
        assert copy == shard
        assert list(iter_documents(copy)) == list(iter_documents(shard))


def test_max_documents_takes_a_prefix_of_the_order(corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    full = [
        d
        for s in plan_corpus_shards(CorpusConfig(paths=[str(root)], n_shards=1, seed=3))
        for d in iter_documents(s)
    ]
    capped = plan_corpus_shards(
        CorpusConfig(paths=[str(root)], n_shards=4, seed=3, max_documents=17)
    )
    assert [d for s in capped for d in iter_documents(s)] == full[:17]
    assert [s.n_documents for s in capped] == [4, 4, 4, 5]


def test_fewer_documents_than_shards_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("only one")
    with pytest.raises(CorpusError, match="1 documents, fewer than n_shards=2"):
        plan_corpus_shards(CorpusConfig(paths=[str(tmp_path / "a.txt")], n_shards=2))
