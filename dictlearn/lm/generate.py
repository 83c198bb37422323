"""Greedy decoding with the JAX Gemma 3: a sanity check of the port and a tool for steering.

There is no KV cache: every step re-runs the model over a fixed-size token buffer (so the whole
loop is one compiled ``lax.while_loop``). That costs O(length²) but is simple and exact, and the
prompts and continuations used for checks and steering demos are short.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.lm.gemma3 import Gemma3Config, Params, next_token_logits
from dictlearn.lm.tokenizer import Tokenizer


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _decode(
    params: Params,
    config: Gemma3Config,
    buffer: jax.Array,
    mask: jax.Array,
    start: int,
    max_new_tokens: int,
) -> jax.Array:
    """Fill ``buffer[:, start:start + max_new_tokens]`` greedily; stops early when all hit EOS."""

    def cond(state):
        step, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, buf, done = state
        scores = next_token_logits(params, config, buf, start + step - 1, attention_mask=mask)
        token = jnp.argmax(scores, axis=-1).astype(buf.dtype)
        token = jnp.where(done, config.pad_id, token)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, token[:, None], start + step, axis=1)
        return step + 1, buf, done | (token == config.eos_id)

    done = jnp.zeros(buffer.shape[0], dtype=bool)
    _, buffer, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), buffer, done))
    return buffer


def greedy_generate(
    params: Params,
    config: Gemma3Config,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 32,
) -> str | list[str]:
    """Continue ``prompt`` (or each of several prompts) with the most likely token at each step.

    Prompts are encoded with BOS and left-padded to a common length. Generation stops at EOS.

    Args:
        params: full-model params (all layers).
        config: the architecture.
        tokenizer: the model's tokenizer.
        prompt: one prompt or a batch of them.
        max_new_tokens: most tokens to add to each prompt.

    Returns:
        The continuation text only (without the prompt), one string per prompt.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    encoded = tokenizer.encode_batch(prompts, add_bos=True)
    width = max(len(ids) for ids in encoded)
    total = width + max_new_tokens
    buffer = np.full((len(prompts), total), config.pad_id, dtype=np.int32)
    mask = np.ones((len(prompts), total), dtype=np.int32)
    for row, ids in enumerate(encoded):
        buffer[row, width - len(ids) : width] = ids
        mask[row, : width - len(ids)] = 0  # left padding is never attended to
    out = np.asarray(
        _decode(params, config, jnp.asarray(buffer), jnp.asarray(mask), width, max_new_tokens)
    )
    texts = []
    for row in out[:, width:]:
        ids = row.tolist()
        if config.eos_id in ids:
            ids = ids[: ids.index(config.eos_id)]
        texts.append(tokenizer.decode(ids))
    return texts[0] if isinstance(prompt, str) else texts
