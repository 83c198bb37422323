"""What a dashboard reads off the weights alone: logit attribution and decoder neighbours.

- :func:`logit_attribution`: the tokens each feature's decoder direction promotes and
  suppresses through the unembedding, a ``[block, vocab]`` product at a time (never
  ``[F, vocab]``).
- :func:`decoder_neighbours`: each feature's nearest decoder directions by cosine, in blocks;
  :func:`read_index_neighbours` reads the same table from a ``dictlearn index`` directory instead.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.config import ConfigError
from dictlearn.errors import UserError


@partial(jax.jit, static_argnames=("top",))
def _block_logits(directions, final_norm, embed, *, top: int):
    # Direct-path approximation, as Neuronpedia/SAEDashboard's W_dec @ W_U: the feature's
    # decoder direction goes straight to the unembedding, through the final RMSNorm's
    # per-dimension weight (linear) but not its division by the residual's RMS (a positive
    # per-token scale that changes no ranking). Gemma's unembedding is its tied embedding.
    logits = (directions * final_norm) @ embed.T  # [block, vocab]
    pos_values, pos_ids = jax.lax.top_k(logits, top)
    neg_values, neg_ids = jax.lax.top_k(-logits, top)
    return pos_values, pos_ids, -neg_values, neg_ids


def logit_attribution(
    w_dec: np.ndarray,
    embed: jax.Array,
    final_norm: jax.Array,
    top: int = 10,
    block: int = 64,
) -> dict[str, np.ndarray]:
    """The ``top`` most promoted and most suppressed tokens of each decoder row.

    Args:
        w_dec: ``[F, d_model]`` decoder rows of the features to attribute.
        embed: ``[vocab, d_model]`` the (tied) unembedding.
        final_norm: ``[d_model]`` the final RMSNorm's weight (Gemma's ``+1`` included).
        top: tokens per side.
        block: features per matmul (``block x vocab`` floats live at once).

    Returns:
        ``pos_ids``, ``pos_values`` (largest first), ``neg_ids``, ``neg_values`` (most negative
        first), each ``[F, top]``.
    """
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("pos_values", "pos_ids", "neg_values")}
    out["neg_ids"] = []
    n = w_dec.shape[0]
    for lo in range(0, n, block):
        rows = np.zeros((block, w_dec.shape[1]), np.float32)  # fixed shape: one compile
        rows[: min(block, n - lo)] = w_dec[lo : lo + block]
        results = jax.device_get(_block_logits(rows, final_norm, embed, top=top))
        for name, value in zip(
            ("pos_values", "pos_ids", "neg_values", "neg_ids"), results, strict=True
        ):
            out[name].append(np.asarray(value)[: min(block, n - lo)])
    return {name: np.concatenate(parts) for name, parts in out.items()}


@partial(jax.jit, static_argnames=("top",))
def _block_neighbours(rows, row_ids, unit, *, top: int):
    cos = rows @ unit.T  # [block, F]
    cos = cos.at[jnp.arange(rows.shape[0]), row_ids].set(-jnp.inf)  # not its own neighbour
    return jax.lax.top_k(cos, top)


def decoder_neighbours(
    w_dec: np.ndarray, features: np.ndarray, top: int = 5, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's ``top`` nearest decoder directions among all the SAE's features.

    Exact, in ``[block, F]`` pieces; fine for tens of thousands of features (for millions use
    ``dictlearn index``).

    Returns:
        ``(neighbours, cosines)``, each ``[len(features), top]``, most similar first.
    """
    norms = np.linalg.norm(w_dec, axis=1, keepdims=True)
    unit = jnp.asarray(w_dec / np.maximum(norms, 1e-12), jnp.float32)
    top = min(top, w_dec.shape[0] - 1)
    ids_out, cos_out = [], []
    for lo in range(0, len(features), block):
        ids = np.zeros(block, np.int32)
        chunk = features[lo : lo + block]
        ids[: len(chunk)] = chunk
        cos, nb = jax.device_get(_block_neighbours(unit[ids], ids, unit, top=top))
        ids_out.append(np.asarray(nb)[: len(chunk)])
        cos_out.append(np.asarray(cos)[: len(chunk)])
    return np.concatenate(ids_out), np.concatenate(cos_out)


def read_index_neighbours(
    url: str, features: np.ndarray, top: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of ``features`` from a ``dictlearn index`` directory.

    The directory holds ``index.json`` and a Parquet table (one or several part files) with
    columns ``feature, rank, neighbor, cosine``; missing entries come back as ``-1`` / NaN.

    Raises:
        ConfigError: no such table, or it lacks those columns.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from dictlearn.data import storage

    fs, root = storage.filesystem(url)
    try:
        parts = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
        if not parts:
            raise UserError("no .parquet files")
        dataset = ds.dataset(parts, filesystem=fs, format="parquet")
        wanted = pc.field("feature").isin(features.astype(np.int64).tolist())
        table = dataset.to_table(columns=["feature", "rank", "neighbor", "cosine"], filter=wanted)
    except (OSError, ValueError, KeyError) as err:  # pyarrow's errors subclass these
        raise ConfigError(
            f"index {url}: not a neighbour table with columns feature, rank, neighbor, "
            f"cosine ({err})"
        ) from None
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    # Whether ranks count from 0 or 1, each feature's rows in rank order are its neighbours.
    order = np.lexsort((columns["rank"], columns["feature"]))
    row_of = {int(f): i for i, f in enumerate(features)}
    neighbours = np.full((len(features), top), -1, np.int64)
    cosines = np.full((len(features), top), np.nan, np.float32)
    filled = np.zeros(len(features), np.int64)
    for i in order:
        row = row_of[int(columns["feature"][i])]
        if filled[row] < top:
            neighbours[row, filled[row]] = columns["neighbor"][i]
            cosines[row, filled[row]] = columns["cosine"][i]
            filled[row] += 1
    return neighbours, cosines
