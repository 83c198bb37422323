"""Text corpora for activation generation: readers, shard planning, packing, built-ins.

    config = CorpusConfig(paths=["gs://bucket/corpus/*.jsonl"], n_shards=64)
    shards = plan_corpus_shards(config)            # on the coordinator; each shard is JSON-able
    docs = iter_documents(shards[i])               # on worker i
    for batch in batch_contexts(pack_documents(docs, tokenizer, 1024), 32):
        ...                                        # int32 [32, 1024], BOS at position 0

See ``docs/corpora.md`` for formats, the built-in corpora and the Debian corpus tool.
"""

from dictlearn.corpus.builtin import (
    BUILTIN_CORPORA,
    PYTHON_DOCS,
    PYTHON_STDLIB,
    python_doc_topics,
    stdlib_source_files,
)
from dictlearn.corpus.packing import (
    TextTokenizer,
    batch_contexts,
    pack_documents,
    position_mask,
    token_mask,
)
from dictlearn.corpus.readers import (
    CorpusConfig,
    CorpusError,
    CorpusShard,
    ShardPiece,
    iter_documents,
    plan_corpus_shards,
)

__all__ = [
    "BUILTIN_CORPORA",
    "PYTHON_DOCS",
    "PYTHON_STDLIB",
    "CorpusConfig",
    "CorpusError",
    "CorpusShard",
    "ShardPiece",
    "TextTokenizer",
    "batch_contexts",
    "iter_documents",
    "pack_documents",
    "plan_corpus_shards",
    "position_mask",
    "python_doc_topics",
    "stdlib_source_files",
    "token_mask",
]
