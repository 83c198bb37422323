"""Shared pieces of the generate tests: tiny configs and a direct (Ray-free) reference."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import lm
from dictlearn.activations import GenerateConfig
from dictlearn.config import validate
from dictlearn.corpus import (
    batch_contexts,
    iter_documents,
    pack_documents,
    plan_corpus_shards,
    position_mask,
    token_mask,
)

CONTEXT = 64
BATCH = 4


def tiny(out: str, **overrides: Any) -> GenerateConfig:
    """Gemma 3 270M to layer 3 on the Python docs: 3 shards of 10 contexts of 64 tokens."""
    data: dict[str, Any] = {
        "hooks": ["resid_post.3", "attn_out.1"],
        "corpus": {"paths": ["builtin:python-docs"], "n_shards": 3},
        "context_length": CONTEXT,
        "batch_size": BATCH,
        "max_tokens": CONTEXT * 10 * 3,
        "output": {"path": out, "dtype": "float32"},
        "ray": {"num_workers": 2},
    }
    for key, value in overrides.items():
        data[key] = data.get(key, {}) | value if isinstance(value, dict) else value
    return validate(GenerateConfig, data)


@functools.cache
def _model(max_layer: int) -> tuple[lm.Params, lm.Gemma3Config, lm.Tokenizer, Any]:
    params, config = lm.load_gguf(max_layer=max_layer)
    return (
        params,
        config,
        lm.Tokenizer.from_gguf(),
        jax.jit(lm.forward, static_argnames=("config", "hooks")),
    )


def expected_rows(config: GenerateConfig, shard_index: int) -> dict[str, np.ndarray]:
    """Rows shard ``shard_index`` must hold, from lm.forward on the same packed contexts.

    Batches are padded to the configured size like the worker pads them, so the forward is
    the same XLA program and the rows can be compared bit for bit.
    """
    hooks = tuple(lm.parse_hooks(config.hooks, lm.get_config()))
    params, model_config, tokenizer, forward = _model(max(h.layer for h in hooks))
    shard = plan_corpus_shards(config.corpus)[shard_index]
    n_contexts = config.max_tokens // config.context_length // config.corpus.n_shards
    contexts = itertools.islice(
        pack_documents(iter_documents(shard), tokenizer, config.context_length), n_contexts
    )
    names = tuple(h.name for h in hooks)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    keep_pos = position_mask(config.context_length, config.exclude_positions)
    for batch in batch_contexts(contexts, config.batch_size):
        n = len(batch)
        padded = np.concatenate([batch, np.repeat(batch[-1:], config.batch_size - n, 0)])
        acts = forward(params, model_config, jnp.asarray(padded), hooks=names)
        keep = keep_pos[None] & token_mask(batch, [model_config.bos_id])
        for name in names:
            rows[name].append(np.asarray(acts[name])[:n][keep])
    return {name: np.concatenate(chunks) for name, chunks in rows.items()}
