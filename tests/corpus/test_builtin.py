"""The built-in corpora: present in every Python install, non-empty and deterministic."""

from __future__ import annotations

from dictlearn.corpus import (
    PYTHON_DOCS,
    PYTHON_STDLIB,
    CorpusConfig,
    iter_documents,
    plan_corpus_shards,
    stdlib_source_files,
)


def test_stdlib_corpus_is_large_sorted_and_skips_tests() -> None:
    files = stdlib_source_files()
    assert len(files) > 300
    assert files == stdlib_source_files()
    assert not any("/test/" in f or "/site-packages/" in f for f in files)
    assert any(f.endswith("/json/decoder.py") for f in files)


def test_builtin_corpora_plan_deterministically() -> None:
    config = CorpusConfig(paths=[PYTHON_STDLIB, PYTHON_DOCS], n_shards=8, seed=0, max_documents=40)
    shards = plan_corpus_shards(config)
    assert shards == plan_corpus_shards(config)
    docs = [d for s in shards for d in iter_documents(s)]
    assert len(docs) == 40 and all(docs)


def test_python_docs_corpus_is_the_language_reference() -> None:
    (shard,) = plan_corpus_shards(CorpusConfig(paths=[PYTHON_DOCS], n_shards=1))
    docs = list(iter_documents(shard))
    assert len(docs) > 50
    assert any("The " in d and "statement" in d for d in docs)
    assert sum(map(len, docs)) > 100_000
