"""Exact sharded kNN against a dense numpy brute force, on several meshes."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from dictlearn.index.exact import ShardedKnn, brute_force_knn, exact_knn, normalize_rows
from sharding import MeshConfig, make_mesh


def _mesh(data: int, model: int):
    return make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])


def _directions(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    # A few near-duplicates, so the nearest neighbour of those is far closer than self-noise.
    x[10] = x[3] + 0.05 * rng.standard_normal(d)
    x[n - 1] = x[3] + 0.05 * rng.standard_normal(d)
    return x


def _assert_same_neighbors(ids, cos, ref_ids, ref_cos) -> None:
    np.testing.assert_allclose(cos, ref_cos, rtol=1e-5, atol=1e-6)
    # Indices must agree wherever the reference cosine is not (numerically) tied with another.
    gaps = np.diff(ref_cos, axis=1)
    tied = np.zeros_like(ref_cos, dtype=bool)
    tied[:, 1:] |= np.abs(gaps) < 1e-6
    tied[:, :-1] |= np.abs(gaps) < 1e-6
    assert (ids == ref_ids)[~tied].all()
    assert tied.mean() < 0.01  # the comparison is not vacuous


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4), (1, 8)])
def test_self_index_matches_brute_force(data: int, model: int) -> None:
    # 301 features: padding on every shard; key_chunk 16 -> several chunks per shard.
    x = _directions(301, 24, seed=0)
    ref_ids, ref_cos = brute_force_knn(x, x, 5, exclude_self=True)
    ids, cos = exact_knn(x, x, 5, _mesh(data, model), block=64, key_chunk=16, exclude_self=True)
    _assert_same_neighbors(ids, cos, ref_ids, ref_cos)
    assert not (ids == np.arange(301)[:, None]).any()  # never itself
    assert set(ids[3, :2]) == {10, 300}


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4)])
def test_cross_index_matches_brute_force(data: int, model: int) -> None:
    a = _directions(130, 16, seed=1)
    b = _directions(517, 16, seed=2)
    ref_ids, ref_cos = brute_force_knn(a, b, 7)
    ids, cos = exact_knn(a, b, 7, _mesh(data, model), block=32, key_chunk=40)
    _assert_same_neighbors(ids, cos, ref_ids, ref_cos)


def test_bf16_recall_and_fp32_cosines() -> None:
    x = _directions(2048, 64, seed=3)
    ref_ids, _ = brute_force_knn(x, x, 10, exclude_self=True)
    ids, cos = exact_knn(
        x,
        x,
        10,
        _mesh(2, 4),
        block=256,
        key_chunk=128,
        compute_dtype="bfloat16",
        exclude_self=True,
    )
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids, strict=True)])
    assert recall >= 0.999
    # Reported cosines are the fp32 cosines of the returned neighbours.
    u = normalize_rows(x)
    np.testing.assert_allclose(cos, np.einsum("nd,nkd->nk", u, u[ids]), rtol=1e-5, atol=1e-6)


def test_compiled_block_never_holds_the_full_row() -> None:
    n, block, chunk = 4096, 256, 128
    x = _directions(n, 16, seed=4)
    knn = ShardedKnn(
        normalize_rows(x), 5, _mesh(2, 4), block=block, key_chunk=chunk, exclude_self=True
    )
    text = knn.compiled_text()
    shapes = [tuple(int(v) for v in m.split(",")) for m in re.findall(r"f32\[(\d+,\d+)\]", text)]
    largest = max(a * b for a, b in shapes)
    # Per device: its block rows x one key chunk, nothing of [block, F] or [F, F] size.
    assert largest <= (block // 2) * chunk
    assert all(n not in shape for shape in shapes)


def test_k_larger_than_features_is_an_error() -> None:
    x = _directions(300, 8, seed=5)
    with pytest.raises(ValueError, match="k=300"):
        exact_knn(x[:20], x[:20], 300, _mesh(1, 1), exclude_self=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_other_feature_as_neighbor(dtype: str) -> None:
    # k = F - 1: the self-match must be dropped even when every candidate is kept.
    x = _directions(20, 8, seed=6)[:20]
    ref_ids, ref_cos = brute_force_knn(x, x, 19, exclude_self=True)
    ids, cos = exact_knn(x, x, 19, _mesh(1, 1), compute_dtype=dtype, exclude_self=True)
    _assert_same_neighbors(ids, cos, ref_ids, ref_cos)
