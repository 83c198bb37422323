"""Feature-neighbour indexes: each feature's nearest features by decoder (or encoder) cosine.

    dictlearn index build SAE_URL --out OUT_URL [--against SAE_B_URL] [k=10 ...]
    dictlearn neighbors INDEX_OR_SAE FEATURE [-k 10] | --vector v.npy

* ``build_index(IndexConfig) -> IndexResult``: exact (``ShardedKnn``, sharded over the
  ``(data, model)`` mesh, never the ``F x F`` matrix) or approximate (faiss HNSW), written as
  resumable Parquet parts + ``index.json`` on any fsspec URL (``store``).
* ``query_neighbors(target, feature=... | vector=...) -> Neighbors``.
* ``exact_knn`` / ``brute_force_knn`` / ``AnnIndex``: the same on plain arrays.
"""

from dictlearn.index.ann import AnnConfig, AnnIndex
from dictlearn.index.build import IndexConfig, IndexResult, build_from_directions, build_index
from dictlearn.index.exact import ShardedKnn, brute_force_knn, exact_knn, normalize_rows
from dictlearn.index.query import Neighbors, query_neighbors
from dictlearn.index.source import Directions, load_directions
from dictlearn.index.store import IndexManifest, IndexMismatch, IndexPlan, IndexStore

__all__ = [
    "AnnConfig",
    "AnnIndex",
    "Directions",
    "IndexConfig",
    "IndexManifest",
    "IndexMismatch",
    "IndexPlan",
    "IndexResult",
    "IndexStore",
    "Neighbors",
    "ShardedKnn",
    "brute_force_knn",
    "build_from_directions",
    "build_index",
    "exact_knn",
    "load_directions",
    "normalize_rows",
    "query_neighbors",
]
