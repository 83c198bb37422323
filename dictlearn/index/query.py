"""Ad-hoc neighbour queries against a built index or straight against an SAE.

    dictlearn neighbors INDEX_OR_SAE FEATURE [-k 10]
    dictlearn neighbors INDEX_OR_SAE --vector v.npy [-k 10]

``query_neighbors(...) -> Neighbors`` is the entry point. A feature's neighbours come from the
index's Parquet part (one part read), or, for an SAE, from an exact scan of that one row
against all features. A direction (``vector``) is searched in the index's HNSW graph if it has
one, else exactly among the index's key SAE (re-read from the manifest's URL, its digest
checked) or the given SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from dictlearn.errors import MissingInputError, UserError
from dictlearn.index.ann import AnnIndex
from dictlearn.index.exact import normalize_rows
from dictlearn.index.source import Directions, Metric, load_directions
from dictlearn.index.store import IndexManifest, IndexStore


@dataclass(frozen=True)
class Neighbors:
    """Nearest features of one query, best first.

    Attributes:
        neighbors: ``[k]`` feature ids (of ``keys_source``).
        cosines: ``[k]`` their cosines with the query.
        keys_source: the SAE those feature ids belong to.
        exact: False when they came from an approximate (HNSW) search.
    """

    neighbors: np.ndarray
    cosines: np.ndarray
    keys_source: str
    exact: bool


def _committed_index(target: str) -> tuple[IndexStore, IndexManifest] | None:
    """The index at ``target``, or None when ``target`` is not an index directory."""
    store = IndexStore(target)
    try:
        manifest = store.manifest()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return None if manifest is None else (store, manifest)


def query_neighbors(
    target: str,
    feature: int | None = None,
    vector: np.ndarray | None = None,
    k: int = 10,
    metric: Metric = "decoder",
) -> Neighbors:
    """The ``k`` nearest features of ``feature`` (an id) or ``vector`` (a direction).

    Args:
        target: an index directory (``dictlearn index build``'s output) or an SAE URL.
        feature: a feature id of the (query) SAE; exactly one of ``feature`` and ``vector``.
        vector: a ``[d_in]`` direction.
        k: neighbours wanted (at most the index's ``k`` for a feature query on an index).
        metric: for an SAE target, compare decoder or encoder directions (an index has its own).

    Raises:
        ValueError: the feature id is out of range, the vector's width is not the SAE's
            ``d_in``, ``k`` is too large, or ``target`` is no index or SAE; the message names
            the culprit.
    """
    if (feature is None) == (vector is None):
        raise UserError("give a feature id or a vector, not both or neither")
    if k < 1:
        raise UserError(f"k={k} must be at least 1")
    index = _committed_index(target)
    if index is not None:
        store, manifest = index
        if feature is not None:
            return _feature_from_index(store, manifest, feature, k)
        keys_source = manifest.keys_source or manifest.source
        _check_vector(vector, manifest.d_in, target)
        if manifest.ann_file is not None:
            ann = AnnIndex.from_bytes(_required_blob(store, manifest.ann_file))
            ids, cos = ann.search(vector[None, :], _fits(k, manifest.n_keys, target))
            return Neighbors(ids[0], cos[0], keys_source, exact=False)
        keys = load_directions(keys_source, manifest.metric)
        expected = manifest.keys_digest or manifest.digest
        if keys.digest != expected:
            raise UserError(
                f"the SAE at {keys_source} has changed since {target} was built "
                f"(digest {keys.digest[:12]}, index built from {expected[:12]})"
            )
        return _scan(keys, vector, k)
    directions = load_directions(target, metric)
    if feature is not None:
        _check_feature(feature, directions.n_features, target)
        return _scan(directions, directions.vectors[feature], k, exclude=feature)
    _check_vector(vector, directions.d_in, target)
    return _scan(directions, vector, k)


def _feature_from_index(
    store: IndexStore, manifest: IndexManifest, feature: int, k: int
) -> Neighbors:
    _check_feature(feature, manifest.n_features, store.url)
    if k > manifest.k:
        raise UserError(f"k={k} exceeds the k={manifest.k} neighbours stored in {store.url}")
    table = store.read_part(manifest.parts[feature // manifest.block_size])
    rows = table.filter(pc.equal(table["feature"], feature)).sort_by("rank")
    return Neighbors(
        rows["neighbor"].to_numpy()[:k],
        rows["cosine"].to_numpy()[:k],
        manifest.keys_source or manifest.source,
        exact=manifest.method == "exact",
    )


def _scan(keys: Directions, vector: np.ndarray, k: int, exclude: int | None = None) -> Neighbors:
    """Exact neighbours of one direction among all of ``keys`` (``F x d`` work)."""
    available = keys.n_features - (0 if exclude is None else 1)
    k = _fits(k, available, keys.source)
    cos = keys.vectors @ normalize_rows(np.asarray(vector, np.float32)[None, :])[0]
    if exclude is not None:
        cos[exclude] = -np.inf
    order = np.argsort(-cos, kind="stable")[:k]  # ties: lower feature id first
    return Neighbors(order.astype(np.int64), cos[order], keys.source, exact=True)


def _fits(k: int, available: int, where: str) -> int:
    if k > available:
        raise UserError(f"k={k} exceeds the {available} features of {where}")
    return k


def _check_feature(feature: int, n_features: int, where: str) -> None:
    if not 0 <= feature < n_features:
        raise UserError(
            f"feature {feature} is out of range: {where} has {n_features} features "
            f"(0-{n_features - 1})"
        )


def _check_vector(vector: np.ndarray, d_in: int, where: str) -> None:
    if vector.ndim != 1 or vector.shape[0] != d_in:
        raise UserError(
            f"the query vector has shape {tuple(vector.shape)}, but {where} has d_in={d_in} "
            f"(expected shape ({d_in},))"
        )


def _required_blob(store: IndexStore, name: str) -> bytes:
    data = store.read_blob(name)
    if data is None:
        raise MissingInputError(f"{store.url}/{name} is missing: the index is incomplete")
    return data
