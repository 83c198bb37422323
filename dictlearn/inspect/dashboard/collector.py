"""The streaming part of a dashboard: per-feature statistics in memory bounded by features x N.

The collector (:func:`update`) sees the SAE latents of ``[B, T]`` token contexts batch after batch and
keeps, per feature, only:

- the ``top_n`` contexts where it fires hardest (one entry per context: its maximum over the
  context's positions), ranked by (activation desc, context id asc), with a window of
  ``window`` tokens around the maximum and the feature's activation on each of them;
- a uniform sample of ``n_samples`` of the contexts where it fires at all: a bottom-k sketch
  over a hash of (feature, context id), so the sample does not depend on the order or the
  sharding of the corpus; the site splits it into activation-quantile bands;
- a histogram of its nonzero per-token activations over fixed log-spaced bins;
- how many (valid) tokens it fires on, and how many tokens were seen.

Every buffer is ``[F, N]``-shaped: nothing grows with the corpus. The update is one jitted pure
function (``lax.top_k`` over the batch's candidates, then over the running buffer concatenated
with them), and :func:`merge_states` combines the states of several workers exactly: the top-N
of a union is the top-N of the top-Ns, and a bottom-k sketch of a union is the bottom-k of the
sketches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Buffer fields: per-feature arrays of entries, the first two dims [F, N]. "value" ranks the
# top buffer; "priority" ranks the sample (lower first).
ENTRY_FIELDS = ("value", "context", "position", "start", "tokens", "acts")
EMPTY_VALUE = -1.0


@dataclass(frozen=True)
class CollectorSpec:
    """Sizes of a collector's buffers (static: they decide the jitted shapes)."""

    n_features: int
    """Features collected (columns of the latents the collector is given)."""
    context_length: int
    """Tokens per context, T."""
    top_n: int = 20
    """Top-activating contexts kept per feature."""
    n_samples: int = 24
    """Uniformly sampled firing contexts kept per feature (the quantile bands come from these)."""
    window: int = 12
    """Tokens kept on each side of a kept context's maximum (window length ``2 * window + 1``,
    at most the context length)."""
    hist_bins: int = 40
    """Log-spaced histogram bins of nonzero activations."""
    hist_min: float = 1e-3
    """Left edge of the first bin; smaller activations are counted in the first bin."""
    hist_max: float = 1e3
    """Right edge of the last bin; larger activations are counted in the last bin."""

    @property
    def window_length(self) -> int:
        """Tokens kept per context."""
        return min(2 * self.window + 1, self.context_length)

    @property
    def hist_edges(self) -> np.ndarray:
        """``[hist_bins + 1]`` bin edges."""
        return np.logspace(np.log10(self.hist_min), np.log10(self.hist_max), self.hist_bins + 1)


def init_state(spec: CollectorSpec) -> dict[str, Any]:
    """An empty collector state (numpy; a pytree of arrays)."""
    f, length = spec.n_features, spec.window_length

    def entries(n: int) -> dict[str, np.ndarray]:
        return {
            "value": np.full((f, n), EMPTY_VALUE, np.float32),
            "context": np.full((f, n), -1, np.int32),
            "position": np.zeros((f, n), np.int32),
            "start": np.zeros((f, n), np.int32),
            "tokens": np.zeros((f, n, length), np.int32),
            "acts": np.zeros((f, n, length), np.float32),
        }

    return {
        "top": entries(spec.top_n),
        "sample": entries(spec.n_samples)
        | {"priority": np.full((f, spec.n_samples), np.inf, np.float32)},
        "hist": np.zeros((f, spec.hist_bins), np.int32),
        "fires": np.zeros((f,), np.int32),
        "tokens_seen": np.zeros((), np.int32),
    }


def context_priority(features: jax.Array, contexts: jax.Array) -> jax.Array:
    """A uniform pseudo-random float32 in ``[0, 1)`` per (feature, context id) pair.

    A 32-bit integer hash (the murmur3 finaliser of ``feature * C + context``) of both ids, so a
    context's chance of being sampled for a feature is the same whichever worker sees it.
    """
    h = features.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + contexts.astype(jnp.uint32)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    # 24 bits: exact in float32.
    return (h >> 8).astype(jnp.float32) / jnp.float32(1 << 24)


def _gather_entries(
    latents: jax.Array,
    tokens: jax.Array,
    rows: jax.Array,
    positions: jax.Array,
    length: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Windows of the chosen (row, feature) candidates: ``start``, token ids, activations.

    Args:
        latents: ``[B, T, F]``.
        tokens: ``[B, T]``.
        rows: ``[F, n]`` batch row of each candidate.
        positions: ``[F, n]`` the candidate's maximum position in its row.
        length: window length.
    """
    t = tokens.shape[1]
    start = jnp.clip(positions - length // 2, 0, t - length)
    offsets = start[..., None] + jnp.arange(length)  # [F, n, L]
    window_tokens = tokens[rows[..., None], offsets]
    feature = jnp.arange(latents.shape[2])[:, None, None]
    window_acts = latents[rows[..., None], offsets, feature]
    return start, window_tokens, window_acts


def _merge_into(
    buffer: dict[str, jax.Array], candidates: dict[str, jax.Array], key: str, largest: bool
) -> dict[str, jax.Array]:
    """Keep the best ``N`` of buffer + candidates per feature by ``key`` (ties: buffer first)."""
    n = buffer[key].shape[1]
    both = {name: jnp.concatenate([buffer[name], candidates[name]], axis=1) for name in buffer}
    score = both[key] if largest else -both[key]
    _, keep = jax.lax.top_k(score, n)  # sorted; equal scores keep their concatenation order
    return {
        name: jnp.take_along_axis(value, keep.reshape(keep.shape + (1,) * (value.ndim - 2)), 1)
        for name, value in both.items()
    }


@partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def update(
    state: dict[str, Any],
    latents: jax.Array,
    tokens: jax.Array,
    valid: jax.Array,
    context_ids: jax.Array,
    feature_ids: jax.Array | None = None,
    sparse: tuple[jax.Array, jax.Array] | None = None,
    *,
    spec: CollectorSpec,
) -> dict[str, Any]:
    """Fold one batch into the state (jitted; the state is donated).

    Args:
        state: from :func:`init_state` or a previous update.
        latents: ``[B, T, F]`` float32 SAE activations of the batch's tokens.
        tokens: ``[B, T]`` int32 token ids (shown in the windows).
        valid: ``[B, T]`` bool: positions that count (False for BOS, separators and padding
            rows); invalid positions never rank, fire or enter the histogram.
        context_ids: ``[B]`` int32 global ids of the contexts, distinct across the whole corpus
            (ties in activation go to the smaller id).
        feature_ids: ``[F]`` the SAE's ids of the latents' columns, which seed the sample's
            hash (default ``0..F-1``): a feature's sample is the same whichever subset of
            features is collected.
        sparse: for a TopK SAE, ``(values, columns)``, each ``[B, T, k]``: its k chosen
            latents per token and their column in ``latents`` (``-1``: not collected). The
            histogram and firing counts then scatter only these ``B*T*k`` pairs instead of all
            ``B*T*F`` (same result: every other latent is zero).
    """
    latents = jnp.where(valid[..., None], latents.astype(jnp.float32), 0.0)
    b, _, f = latents.shape
    length = spec.window_length
    ctx_max = latents.max(axis=1).T  # [F, B]
    ctx_pos = jnp.argmax(latents, axis=1).T.astype(jnp.int32)
    fired = ctx_max > 0
    ids = jnp.broadcast_to(context_ids.astype(jnp.int32)[None, :], (f, b))

    def candidates(score: jax.Array, n: int) -> dict[str, jax.Array]:
        _, rows = jax.lax.top_k(score, min(n, b))  # ties: smaller row = smaller context id
        pos = jnp.take_along_axis(ctx_pos, rows, 1)
        start, window_tokens, window_acts = _gather_entries(latents, tokens, rows, pos, length)
        value = jnp.take_along_axis(ctx_max, rows, 1)
        return {
            "value": jnp.where(value > 0, value, EMPTY_VALUE),
            "context": jnp.where(value > 0, jnp.take_along_axis(ids, rows, 1), -1),
            "position": pos,
            "start": start,
            "tokens": window_tokens,
            "acts": window_acts,
            "rows": rows,
        }

    top_candidates = candidates(jnp.where(fired, ctx_max, EMPTY_VALUE), spec.top_n)
    del top_candidates["rows"]
    top = _merge_into(state["top"], top_candidates, "value", True)
    if feature_ids is None:
        feature_ids = jnp.arange(f, dtype=jnp.int32)
    priority = jnp.where(fired, context_priority(feature_ids[:, None], ids), jnp.inf)
    sample_candidates = candidates(-priority, spec.n_samples)
    rows = sample_candidates.pop("rows")
    sample_candidates["priority"] = jnp.take_along_axis(priority, rows, 1)
    sample = _merge_into(state["sample"], sample_candidates, "priority", False)

    if sparse is None:  # every (token, feature) pair; zeros are dropped below
        values, columns = latents, jnp.arange(f, dtype=jnp.int32)
    else:  # only the pairs a TopK SAE can have made nonzero
        values = jnp.where(valid[..., None], sparse[0].astype(jnp.float32), 0.0)
        columns = sparse[1]
    hist, fires = _histogram(values, columns, spec)
    return {
        "top": top,
        "sample": sample,
        "hist": state["hist"] + hist,
        "fires": state["fires"] + fires,
        "tokens_seen": state["tokens_seen"] + valid.sum(dtype=jnp.int32),
    }


def _histogram(
    values: jax.Array, columns: jax.Array, spec: CollectorSpec
) -> tuple[jax.Array, jax.Array]:
    """Per-feature histogram ``[F, bins]`` and firing counts ``[F]`` of the positive ``values``.

    One scatter-add over ``values``' entries (``columns`` broadcasts against them: a feature
    index, ``-1`` for none); zeros and unknown columns land in a discarded slot.
    """
    f, nb = spec.n_features, spec.hist_bins
    log_lo, log_hi = np.log10(spec.hist_min), np.log10(spec.hist_max)
    keep = (values > 0) & (columns >= 0)
    bins = jnp.clip(
        jnp.floor((jnp.log10(jnp.where(keep, values, 1.0)) - log_lo) * (nb / (log_hi - log_lo))),
        0,
        nb - 1,
    ).astype(jnp.int32)
    slot = jnp.where(keep, columns * nb + bins, f * nb).reshape(-1)
    hist = jnp.zeros(f * nb + 1, jnp.int32).at[slot].add(1, mode="drop")[:-1].reshape(f, nb)
    return hist, hist.sum(axis=1)


def to_numpy(state: dict[str, Any]) -> dict[str, Any]:
    """The state as numpy arrays (counts widened to int64 so merged sums cannot overflow)."""
    out = jax.tree.map(np.asarray, jax.device_get(state))
    for name in ("hist", "fires", "tokens_seen"):
        out[name] = out[name].astype(np.int64)
    return out


def _merge_entries(a: dict[str, np.ndarray], b: dict[str, np.ndarray], largest: bool):
    n = a["context"].shape[1]
    both = {name: np.concatenate([a[name], b[name]], axis=1) for name in a}
    key = both["value"] if largest else both["priority"]
    empty = both["context"] < 0
    # Order: non-empty first, then by key (desc for values, asc for priorities), then context id.
    primary = np.where(empty, np.inf, -key if largest else key)
    order = np.lexsort((both["context"], primary), axis=1)[:, :n]
    return {
        name: np.take_along_axis(value, order.reshape(order.shape + (1,) * (value.ndim - 2)), 1)
        for name, value in both.items()
    }


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the numpy states of disjoint parts of a corpus into the state of the whole.

    Exact: the top-N of the union by (activation desc, context id asc) is the top-N of the
    parts' top-Ns, and the sample's bottom-k by (priority, context id) likewise; counts add.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    merged = states[0]
    for other in states[1:]:
        merged = {
            "top": _merge_entries(merged["top"], other["top"], largest=True),
            "sample": _merge_entries(merged["sample"], other["sample"], largest=False),
            "hist": merged["hist"] + other["hist"],
            "fires": merged["fires"] + other["fires"],
            "tokens_seen": merged["tokens_seen"] + other["tokens_seen"],
        }
    return merged
