"""Approximate nearest directions on a CPU: a faiss HNSW graph over unit rows.

For ad-hoc queries over millions of directions (every feature of several SAEs, say) an exact scan
costs ``F x d`` multiply-adds per query; an HNSW graph answers in ~``log F`` hops. Rows are
normalised, so faiss's inner-product metric is the cosine. ``bench/index_throughput.py``
measures recall@10 against the exact index and queries/s next to usearch and hnswlib; the README
says why faiss is the one used here.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from dictlearn.config import StrictModel
from dictlearn.errors import UserError
from dictlearn.index.exact import normalize_rows


class AnnConfig(StrictModel):
    """HNSW graph parameters (faiss ``IndexHNSWFlat``, inner product)."""

    m: int = Field(32, ge=4, le=256, description="Graph neighbours per node (memory ~ 2m ints).")
    ef_construction: int = Field(
        200, ge=8, description="Candidate list while building: higher builds slower, recalls more."
    )
    ef_search: int = Field(
        128, ge=8, description="Candidate list per query: the recall / speed knob at query time."
    )


class AnnIndex:
    """An HNSW index over unit rows; ``search`` returns ids and cosines, best first."""

    def __init__(self, index: object, d: int) -> None:
        self._index = index
        self.d = d

    @classmethod
    def build(cls, directions: np.ndarray, config: AnnConfig | None = None) -> AnnIndex:
        """Index ``directions`` (``[F, d]``, normalised here); ids are row numbers."""
        import faiss

        config = config or AnnConfig()
        x = normalize_rows(directions)
        index = faiss.IndexHNSWFlat(x.shape[1], config.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
        index.add(x)
        return cls(index, x.shape[1])

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [n, k] int64, cosines [n, k] float32)`` of ``queries`` (normalised here)."""
        if queries.shape[1] != self.d:
            raise UserError(f"query vectors have d={queries.shape[1]}, the index d={self.d}")
        cos, ids = self._index.search(normalize_rows(queries), k)
        return ids.astype(np.int64), cos.astype(np.float32)

    def search_excluding_self(
        self, queries: np.ndarray, first_id: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of indexed rows ``first_id, first_id + 1, ...`` other than themselves."""
        ids, cos = self.search(queries, k + 1)
        own = np.arange(first_id, first_id + len(queries))[:, None]
        keep = ids != own
        # Rows where the graph did not return the query itself: drop the last (k+1-th) hit.
        keep[keep.all(axis=1), -1] = False
        return ids[keep].reshape(-1, k), cos[keep].reshape(-1, k)

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, config: AnnConfig | None = None) -> AnnIndex:
        import faiss

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        index.hnsw.efSearch = (config or AnnConfig()).ef_search
        return cls(index, index.d)
