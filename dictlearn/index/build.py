"""Build a feature-neighbour index: for every feature its ``k`` nearest features by cosine.

    dictlearn index build SAE_URL --out OUT_URL [--against SAE_B_URL] [k=10 metric=decoder ...]

``build_index(config) -> IndexResult`` is the entry point; ``build_from_directions`` does the
work on arrays (tests and benchmarks call it without an SAE on disk). Exact builds run
``ShardedKnn`` on a ``(data, model)`` mesh over every device of the JAX program (all hosts under
``jax.distributed``; only process 0 writes); approximate ones query a faiss HNSW graph on the
CPU. Either way the output is the directory described in ``dictlearn.index.store``: one Parquet
part per block of query features, skipped on re-runs, and ``index.json`` written last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field
from tqdm import tqdm

from dictlearn.config import StrictModel
from dictlearn.errors import UserError
from dictlearn.index.ann import AnnConfig, AnnIndex
from dictlearn.index.exact import ShardedKnn, block_ranges
from dictlearn.index.source import Directions, Metric, load_directions
from dictlearn.index.store import (
    ANN_FILE,
    IndexManifest,
    IndexPlan,
    IndexStore,
    part_name,
)
from dictlearn.train.config import ClusterConfig
from sharding import MeshConfig


class IndexConfig(StrictModel):
    """``dictlearn index build``: which SAE(s), which directions, how, and where to."""

    sae: str = Field(description="The SAE whose features are indexed (an export or run dir).")
    out: str = Field(description="Output directory (any fsspec URL).")
    against: str | None = Field(
        None,
        description="Cross-SAE: search this SAE's features (same d_in) instead of sae's own "
        "(e.g. 16k vs 65k latents of one layer, to see feature splitting).",
    )
    k: int = Field(10, ge=1, description="Neighbours per feature.")
    metric: Metric = Field(
        "decoder", description="Compare decoder rows (W_dec) or encoder columns (W_enc)."
    )
    method: Literal["exact", "approximate"] = Field(
        "exact", description="Exact sharded scan, or a faiss HNSW graph (CPU, approximate)."
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Exact scan's matmul dtype. bfloat16 picks rescore_factor*k candidates per "
        "shard that fp32 cosines re-rank (reported cosines are always fp32).",
    )
    rescore_factor: int = Field(
        4, ge=1, description="bfloat16 only: candidates per neighbour re-ranked in fp32."
    )
    block_size: int = Field(
        4096, ge=1, description="Query features per block and per Parquet part (resume unit)."
    )
    key_chunk: int = Field(
        16384,
        ge=1,
        description="Key features scored at once on one device: memory is "
        "block_size / mesh.data x key_chunk cosines.",
    )
    mesh: MeshConfig = Field(default_factory=MeshConfig, description="The (data, model) mesh.")
    ann: AnnConfig = Field(default_factory=AnnConfig, description="HNSW parameters.")
    ray: ClusterConfig = Field(
        default_factory=ClusterConfig,
        description="Multi-host exact builds: one Ray actor per host joined by jax.distributed "
        "(ray.hosts=4 'ray.resources_per_host={TPU: 4}'); the default builds in this process.",
    )


@dataclass(frozen=True)
class IndexResult:
    """What a build did.

    Attributes:
        url: the index directory.
        manifest: its committed manifest.
        parts_written: parts computed by this call.
        parts_skipped: parts found from an earlier run.
        seconds: wall time of this call.
    """

    url: str
    manifest: IndexManifest
    parts_written: int
    parts_skipped: int
    seconds: float


def build_index(config: IndexConfig) -> IndexResult:
    """Load the SAE(s) named by ``config`` and build (or finish) the index at ``config.out``."""
    queries = load_directions(config.sae, config.metric)
    keys = None if config.against is None else load_directions(config.against, config.metric)
    return build_from_directions(config, queries, keys)


def build_from_directions(
    config: IndexConfig, queries: Directions, keys: Directions | None = None
) -> IndexResult:
    """Build the index of ``queries`` (against ``keys``, or themselves) into ``config.out``.

    Raises:
        ValueError: the two SAEs have different ``d_in``, or ``k`` exceeds the features there
            are to find; nothing is written then.
        IndexMismatch: ``config.out`` holds another index (names the differing field).
    """
    import jax

    start_time = time.perf_counter()
    searched = keys or queries
    if searched.d_in != queries.d_in:
        raise UserError(
            f"--against {searched.source} has d_in={searched.d_in}, but {queries.source} has "
            f"d_in={queries.d_in}: a cross-SAE index needs SAEs of the same width"
        )
    available = searched.n_features - (0 if keys is not None else 1)
    if config.k > available:
        raise UserError(f"k={config.k} exceeds the {available} other features there are")
    plan = IndexPlan(
        source=queries.source,
        digest=queries.digest,
        keys_source=None if keys is None else keys.source,
        keys_digest=None if keys is None else keys.digest,
        n_features=queries.n_features,
        n_keys=searched.n_features,
        d_in=queries.d_in,
        k=config.k,
        metric=config.metric,
        method=config.method,
        compute_dtype=config.compute_dtype,
        block_size=config.block_size,
    )
    store = IndexStore(config.out)
    writer = jax.process_index() == 0
    done = store.begin(plan, write=writer)
    if done is not None:
        return IndexResult(config.out, done, 0, len(done.parts), time.perf_counter() - start_time)

    blocks = list(block_ranges(queries.n_features, config.block_size))
    finished = store.finished_parts()
    todo = [b for b in range(len(blocks)) if part_name(b) not in finished]
    search = _searcher(config, store, queries, keys) if todo else None
    for b in tqdm(todo, desc="index blocks", unit="block", disable=not writer):
        lo, hi = blocks[b]
        neighbors, cosines = search(queries.vectors[lo:hi], lo)
        if writer:
            store.write_part(b, np.arange(lo, hi), neighbors, cosines)
    manifest = IndexManifest(
        **plan.model_dump(),
        parts=[part_name(b) for b in range(len(blocks))],
        ann_file=ANN_FILE if config.method == "approximate" else None,
    )
    if writer:
        store.commit(manifest)
    return IndexResult(
        config.out,
        manifest,
        parts_written=len(todo),
        parts_skipped=len(blocks) - len(todo),
        seconds=time.perf_counter() - start_time,
    )


def _searcher(config: IndexConfig, store: IndexStore, queries: Directions, keys: Directions | None):
    """``(rows, first_id) -> (neighbors, cosines)`` for one block, exact or approximate."""
    searched = keys or queries
    if config.method == "approximate":
        ann = _ann_index(config, store, searched)
        if keys is not None:
            return lambda rows, first: ann.search(rows, config.k)
        return lambda rows, first: ann.search_excluding_self(rows, first, config.k)

    from sharding import make_mesh

    knn = ShardedKnn(
        searched.vectors,
        config.k,
        make_mesh(config.mesh),
        block=config.block_size,
        key_chunk=config.key_chunk,
        compute_dtype=config.compute_dtype,
        exclude_self=keys is None,
        rescore_factor=config.rescore_factor,
    )
    return knn.query_block


def _ann_index(config: IndexConfig, store: IndexStore, searched: Directions) -> AnnIndex:
    """The stored HNSW graph of an interrupted build, else a new one (saved before any part)."""
    data = store.read_blob(ANN_FILE)
    if data is not None:
        return AnnIndex.from_bytes(data, config.ann)
    ann = AnnIndex.build(searched.vectors, config.ann)
    store.write_blob(ANN_FILE, ann.to_bytes())
    return ann
