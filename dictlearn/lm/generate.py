"""Decoding with the JAX Gemma 3 (greedy or sampled, optionally with interventions): a sanity
check of the port and the engine of steering.

There is no KV cache: every step re-runs the model over a fixed-size token buffer (so the whole
loop is one compiled ``lax.while_loop``). That costs O(length²) but is simple and exact, and the
prompts and continuations used for checks and steering demos are short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.errors import UserError
from dictlearn.lm.gemma3 import Edit, Gemma3Config, Params, next_token_logits
from dictlearn.lm.interventions import only_at
from dictlearn.lm.tokenizer import Tokenizer


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _decode(
    params: Params,
    config: Gemma3Config,
    buffer: jax.Array,
    mask: jax.Array,
    start: int,
    max_new_tokens: int,
    edits: dict[str, Edit],
    temperature: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Fill ``buffer[:, start:start + max_new_tokens]``; stops early when all rows hit EOS."""

    def cond(state):
        step, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, buf, done = state
        scores = next_token_logits(
            params, config, buf, start + step - 1, attention_mask=mask, edits=edits
        )
        greedy = jnp.argmax(scores, axis=-1)
        sampled = jax.random.categorical(
            jax.random.fold_in(key, step), scores / jnp.maximum(temperature, 1e-6), axis=-1
        )
        token = jnp.where(temperature > 0, sampled, greedy).astype(buf.dtype)
        token = jnp.where(done, config.pad_id, token)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, token[:, None], start + step, axis=1)
        return step + 1, buf, done | (token == config.eos_id)

    done = jnp.zeros(buffer.shape[0], dtype=bool)
    _, buffer, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), buffer, done))
    return buffer


def generate(
    params: Params,
    config: Gemma3Config,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 32,
    *,
    edits: Mapping[str, Edit] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    edit_bos: bool = False,
) -> str | list[str]:
    """Continue ``prompt`` (or each of several prompts), optionally under interventions.

    Prompts are encoded with BOS and left-padded to a common length. Generation stops at EOS.

    Args:
        params: full-model params (all layers).
        config: the architecture.
        tokenizer: the model's tokenizer.
        prompt: one prompt or a batch of them.
        max_new_tokens: most tokens to add to each prompt.
        edits: interventions by hook name (``dictlearn.lm.interventions``), applied at every
            step to the prompt and to what has been generated so far.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        seed: the sampling seed.
        edit_bos: also edit the BOS position (off by default: its activations are an outlier
            SAEs are not trained on, and steering it perturbs every later token at once).

    Returns:
        The continuation text only (without the prompt), one string per prompt.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    encoded = tokenizer.encode_batch(prompts, add_bos=True)
    width = max(len(ids) for ids in encoded)
    total = width + max_new_tokens
    buffer = np.full((len(prompts), total), config.pad_id, dtype=np.int32)
    mask = np.ones((len(prompts), total), dtype=np.int32)
    for row, ids in enumerate(encoded):
        buffer[row, width - len(ids) : width] = ids
        mask[row, : width - len(ids)] = 0  # left padding is never attended to
    wrapped: dict[str, Edit] = {}
    if edits:
        keep = np.asarray(mask, bool)
        if not edit_bos:
            keep[np.arange(len(prompts)), [width - len(ids) for ids in encoded]] = False
        wrapped = {name: only_at(keep, edit) for name, edit in edits.items()}
    out = np.asarray(
        _decode(
            params,
            config,
            jnp.asarray(buffer),
            jnp.asarray(mask),
            width,
            max_new_tokens,
            wrapped,
            jnp.float32(temperature),
            jax.random.key(seed),
        )
    )
    texts = []
    for row in out[:, width:]:
        ids = row.tolist()
        if config.eos_id in ids:
            ids = ids[: ids.index(config.eos_id)]
        texts.append(tokenizer.decode(ids))
    return texts[0] if isinstance(prompt, str) else texts


def greedy_generate(
    params: Params,
    config: Gemma3Config,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 32,
) -> str | list[str]:
    """Continue ``prompt`` with the most likely token at each step (see :func:`generate`)."""
    return generate(params, config, tokenizer, prompt, max_new_tokens)
