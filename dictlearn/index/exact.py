"""Exact k-nearest features by cosine, sharded over a ``(data, model)`` mesh.

The ``F x F`` cosine matrix of a million-feature SAE is 4 TB; it is never held anywhere. The key
directions (unit rows, ``[F_keys, d]``) are split over the ``model`` axis like the SAE's features
during training, and the query directions go through in blocks of rows split over ``data``.
Inside ``shard_map`` each device walks its key slice in chunks of ``key_chunk`` rows:

1. cosines of its query rows against one key chunk (``compute_dtype`` matmul, fp32 accumulate),
2. the chunk's top-k (padding rows masked inside it) merged into a running top-k (``[rows, k]``),
3. for an SAE indexed against itself, one candidate more, and the query itself (same global
   index) dropped at the end: exact, and no pass over the cosines to mask a diagonal,

then only the ``k`` candidates per row cross devices: ``merge_shard_candidates`` (the two-stage
top-k of ``dictlearn.sae.topk_select``) picks the global winners. With bf16 scores each shard
first re-ranks ``rescore_factor x k`` candidates by their fp32 cosines (from its own key rows),
so the merge and the reported cosines are fp32. A device holds at most
``rows x key_chunk`` cosines, and the same code runs one SAE on a laptop or 1M+ features on a
multi-host slice.

Ties resolve as a dense ``lax.top_k`` over the whole row does (lowest feature index first): the
running top-k keeps earlier chunks first and shards are merged in shard order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dictlearn.errors import UserError
from dictlearn.sae.topk_select import merge_shard_candidates, top_k
from sharding import BATCH, D_MODEL, DATA, FEATURES, MODEL, named_sharding, replicated
from sharding.axes import logical_to_spec
from sharding.varying import vary_over

ComputeDtype = Literal["float32", "bfloat16"]


def normalize_rows(directions: np.ndarray) -> np.ndarray:
    """Unit-norm float32 rows (a zero row stays zero: its cosine with anything is 0)."""
    x = np.asarray(directions, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class KnnLayout:
    """How queries and keys are padded and split for one mesh.

    Attributes:
        n_keys: real key rows.
        key_chunk: key rows per chunk on one device.
        chunks_per_shard: chunks each ``model`` shard walks.
        block: query rows per block (a multiple of the ``data`` axis size).
    """

    n_keys: int
    key_chunk: int
    chunks_per_shard: int
    block: int

    @property
    def keys_per_shard(self) -> int:
        return self.key_chunk * self.chunks_per_shard

    @staticmethod
    def plan(mesh: Mesh, n_keys: int, block: int, key_chunk: int) -> KnnLayout:
        """Pad the key count to ``model x chunks x chunk`` and the block to the ``data`` size."""
        model, data = mesh.shape[MODEL], mesh.shape[DATA]
        per_shard = math.ceil(n_keys / model)
        chunks = math.ceil(per_shard / key_chunk)
        chunk = math.ceil(per_shard / chunks)
        return KnnLayout(n_keys, chunk, chunks, math.ceil(block / data) * data)


class ShardedKnn:
    """Exact top-k neighbours of query blocks among keys that stay sharded on ``model``.

    Args:
        keys: ``[F_keys, d]`` unit rows (host numpy; every process passes the same array).
        k: neighbours per query.
        mesh: the ``(data, model)`` mesh.
        block: query rows per call (rounded up to a multiple of the ``data`` axis).
        key_chunk: key rows scored at once on one device (bounds memory: ``block / data x
            key_chunk`` cosines).
        compute_dtype: the matmul's input dtype; accumulation and the reported cosines are fp32.
        exclude_self: never return key ``i`` for query ``i`` (an SAE indexed against itself):
            each shard keeps one candidate more and drops the query itself (or the last).
        rescore_factor: with a low-precision ``compute_dtype``, each shard keeps
            ``rescore_factor * k`` candidates by the low-precision cosine and re-ranks them by
            their fp32 cosine (bf16 alone misorders neighbours whose cosines differ by < ~4e-3).
    """

    def __init__(
        self,
        keys: np.ndarray,
        k: int,
        mesh: Mesh,
        block: int = 4096,
        key_chunk: int = 16384,
        compute_dtype: ComputeDtype = "float32",
        exclude_self: bool = False,
        rescore_factor: int = 4,
    ) -> None:
        n_keys, d = keys.shape
        available = n_keys - (1 if exclude_self else 0)
        if not 1 <= k <= available:
            raise UserError(f"k={k} must be in [1, {available}] for {n_keys} key features")
        self.k, self.d, self.mesh = k, d, mesh
        self.layout = KnnLayout.plan(mesh, n_keys, block, key_chunk)
        needed = k + (1 if exclude_self else 0)
        if self.layout.key_chunk < needed:
            raise UserError(
                f"k={k} needs {needed} key features per chunk on one device, there are "
                f"{self.layout.key_chunk}; use a smaller mesh.model"
            )
        self.compute_dtype = jnp.dtype(compute_dtype)
        # bf16 scores pick rescore_factor * k candidates per shard; fp32 re-ranks them.
        low_precision = self.compute_dtype != jnp.float32
        self.candidates = min(k * rescore_factor, self.layout.key_chunk) if low_precision else k
        self.exclude_self = exclude_self
        padded = np.zeros((self.layout.keys_per_shard * mesh.shape[MODEL], d), np.float32)
        padded[:n_keys] = keys
        self._keys = _global_array(padded, named_sharding(mesh, (FEATURES, D_MODEL)))
        self._query_sharding = named_sharding(mesh, (BATCH, D_MODEL))
        self._scalar_sharding = replicated(mesh)
        self._fn = self._compile()

    def _compile(self):
        mesh, layout, k, kc = self.mesh, self.layout, self.k, self.candidates
        chunk, chunks = layout.key_chunk, layout.chunks_per_shard
        dtype, exclude_self = self.compute_dtype, self.exclude_self
        rows = layout.block // mesh.shape[DATA]

        padded = layout.keys_per_shard * mesh.shape[MODEL] > layout.n_keys
        # One more candidate when the query itself may be among them (dropped below).
        cand = min(kc + 1, chunk) if exclude_self else kc

        def local(queries: jax.Array, keys: jax.Array, start: jax.Array):
            # queries [rows, d] fp32 (this device's rows of the block), keys [chunks*chunk, d].
            shard_offset = jax.lax.axis_index(MODEL) * (chunks * chunk)
            row_ids = start + jax.lax.axis_index(DATA) * rows + jnp.arange(rows, dtype=jnp.int32)
            q = queries.astype(dtype)
            key_chunks = keys.reshape(chunks, chunk, -1)

            def chunk_top(c):
                rows_c = jax.lax.dynamic_index_in_dim(key_chunks, c, keepdims=False)
                cos = jnp.dot(q, rows_c.astype(dtype).T, preferred_element_type=jnp.float32)
                if not padded:
                    v, i = top_k(cos, cand)
                else:  # padding rows get -inf, added inside the top-k (no extra pass)
                    global_ids = shard_offset + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
                    v, i = top_k(cos, cand, jnp.where(global_ids < layout.n_keys, 0.0, -jnp.inf))
                return v, i + c * chunk

            def step(carry, c):
                v, i = chunk_top(c)
                # Earlier chunks first: on ties the lower feature index wins, as in lax.top_k.
                v, pos = top_k(jnp.concatenate([carry[0], v], axis=1), cand)
                i = jnp.take_along_axis(jnp.concatenate([carry[1], i], 1), pos, axis=1)
                return (v, i), None

            if chunks == 1:
                best_v, best_i = chunk_top(0)
            else:
                init = (
                    jnp.full((rows, cand), -jnp.inf, jnp.float32),
                    jnp.zeros((rows, cand), jnp.int32),
                )
                init = jax.tree.map(lambda x: vary_over(x, (DATA, MODEL)), init)
                (best_v, best_i), _ = jax.lax.scan(step, init, jnp.arange(chunks))
            if dtype != jnp.float32:
                # Re-rank this shard's candidates by their fp32 cosines (its own key rows, no
                # communication), so the merge and the reported values are fp32.
                rows_of = jnp.take(keys, best_i, axis=0, mode="clip")
                exact = jnp.einsum("rd,rcd->rc", queries, rows_of)
                best_v = jnp.where(jnp.isfinite(best_v), exact, -jnp.inf)
            if exclude_self or dtype != jnp.float32:
                if exclude_self:
                    # The top cand of everything minus the query itself is the top cand - 1 of
                    # everything: mask the query if it is there, else drop the last.
                    is_self = best_i + shard_offset == row_ids[:, None]
                    best_v = jnp.where(is_self, -jnp.inf, best_v)
                best_v, pos = jax.lax.top_k(best_v, k)
                best_i = jnp.take_along_axis(best_i, pos, axis=1)
            sel = merge_shard_candidates(best_v, best_i, MODEL)
            values = jnp.where(sel.mask, sel.values, 0.0)
            ids = jnp.where(sel.mask, sel.indices + shard_offset, 0)
            values, ids = jax.lax.psum((values, ids), MODEL)
            # [block, k] on every device (small), so any process can write it: each data row
            # of the mesh fills its rows, a psum over data assembles them (replicated).
            offset = jax.lax.axis_index(DATA) * rows

            def assemble(x: jax.Array) -> jax.Array:
                full = jnp.zeros((layout.block, k), x.dtype)
                return jax.lax.psum(jax.lax.dynamic_update_slice(full, x, (offset, 0)), DATA)

            return assemble(ids), assemble(values)

        fn = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(
                logical_to_spec((BATCH, D_MODEL)),
                logical_to_spec((FEATURES, D_MODEL)),
                logical_to_spec(()),
            ),
            out_specs=(logical_to_spec((None, None)), logical_to_spec((None, None))),
        )
        return jax.jit(fn)

    def query_block(self, queries: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of ``queries`` (``[n <= block, d]`` unit rows, global ids from ``start``).

        Returns:
            ``(neighbors [n, k] int64, cosines [n, k] float32)``, best first.
        """
        n = queries.shape[0]
        if queries.shape[1] != self.d:
            raise ValueError(f"queries have d={queries.shape[1]}, keys d={self.d}")
        block = np.zeros((self.layout.block, self.d), np.float32)
        block[:n] = queries
        q = _global_array(block, self._query_sharding)
        s = _global_array(np.int32(start), self._scalar_sharding)
        ids, cos = self._fn(q, self._keys, s)
        ids = np.asarray(ids.addressable_data(0))[:n].astype(np.int64)
        return ids, np.asarray(cos.addressable_data(0))[:n]

    def compiled_text(self) -> str:
        """The compiled HLO of one block (tests assert nothing of ``F x F`` size appears)."""
        q = jax.ShapeDtypeStruct((self.layout.block, self.d), jnp.float32)
        q = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=self._query_sharding)
        s = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._scalar_sharding)
        return self._fn.lower(q, self._keys, s).compile().as_text()


def _global_array(host: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (multi-process safe)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def exact_knn(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    mesh: Mesh,
    *,
    block: int = 4096,
    key_chunk: int = 16384,
    compute_dtype: ComputeDtype = "float32",
    exclude_self: bool = False,
    rescore_factor: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """All of ``queries``' neighbours among ``keys`` at once (rows are normalised here).

    Returns:
        ``(neighbors [n, k] int64, cosines [n, k] float32)``.
    """
    knn = ShardedKnn(
        normalize_rows(keys),
        k,
        mesh,
        block=block,
        key_chunk=key_chunk,
        compute_dtype=compute_dtype,
        exclude_self=exclude_self,
        rescore_factor=rescore_factor,
    )
    q = normalize_rows(queries)
    parts = [knn.query_block(q[s:e], s) for s, e in block_ranges(len(q), knn.layout.block)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def block_ranges(n: int, block: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each block of ``block`` rows over ``n`` rows."""
    for start in range(0, n, block):
        yield start, min(start + block, n)


def brute_force_knn(
    queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Dense numpy reference (holds ``[n_queries, F_keys]``: tests and single queries only).

    Ties go to the lower index, like ``lax.top_k``.
    """
    q, kk = normalize_rows(queries), normalize_rows(keys)
    cos = q @ kk.T
    if exclude_self:
        np.fill_diagonal(cos, -np.inf)
    order = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(cos, order, axis=1)
