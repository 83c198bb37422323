"""Edits to an activation at a hook point: add, replace, zero- or mean-ablate, per token position.

    edits = {"resid_post.6": add(direction, scale=8.0)}
    logits = lm.logits(params, config, tokens, edits=edits)

Each builder returns a ``jax.tree_util.Partial`` over a module-level function: its arrays are
pytree leaves, so an edit can be passed INTO a jitted function as an ordinary argument and one
compiled program serves every direction, scale or mask of the same shapes. To edit with a
function of your own, wrap it the same way: ``Partial(my_fn, my_array)`` with ``my_fn(my_array,
x) -> x'``.

``positions`` selects where an edit applies: None for every position, else a boolean mask that
broadcasts against ``[B, T]`` (``[T]`` for the same positions in every row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from dictlearn.lm.gemma3 import Edit

Positions = jax.Array | None


def apply_at(positions: Positions, new: jax.Array, x: jax.Array) -> jax.Array:
    """``new`` where ``positions`` says (everywhere for None), ``x`` elsewhere."""
    if positions is None:
        return new
    return jnp.where(jnp.asarray(positions, bool)[..., None], new, x)


def _add(direction: jax.Array, scale: jax.Array, positions: Positions, x: jax.Array) -> jax.Array:
    return apply_at(positions, x + scale * direction.astype(x.dtype), x)


def _replace(value: jax.Array, positions: Positions, x: jax.Array) -> jax.Array:
    return apply_at(positions, jnp.broadcast_to(value.astype(x.dtype), x.shape), x)


def add(
    direction: jax.Array, scale: float | jax.Array = 1.0, positions: Positions = None
) -> Partial:
    """``x + scale * direction`` (steering); ``direction`` is ``[d_model]`` or broadcastable."""
    return Partial(_add, jnp.asarray(direction), jnp.asarray(scale, jnp.float32), positions)


def replace(value: jax.Array, positions: Positions = None) -> Partial:
    """The activation replaced by ``value`` (``[d_model]``, ``[T, d_model]`` or ``[B, T, d]``)."""
    return Partial(_replace, jnp.asarray(value), positions)


def zero_ablate(d_model: int, positions: Positions = None) -> Partial:
    """The activation set to zero."""
    return replace(jnp.zeros((d_model,), jnp.float32), positions)


def mean_ablate(mean: jax.Array, positions: Positions = None) -> Partial:
    """The activation set to its mean over some reference text (``[d_model]``)."""
    return replace(mean, positions)


def _only_at(positions: jax.Array, edit: Edit, x: jax.Array) -> jax.Array:
    return apply_at(positions, edit(x), x)


def only_at(positions: jax.Array, edit: Edit) -> Partial:
    """``edit`` restricted to ``positions`` (e.g. every position but BOS)."""
    return Partial(_only_at, jnp.asarray(positions, bool), edit)
