"""build_index end to end on arrays: parts + manifest, resume, refusals, approximate, queries."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from dictlearn.export import load_sae
from dictlearn.index import (
    Directions,
    IndexConfig,
    IndexMismatch,
    IndexStore,
    brute_force_knn,
    build_from_directions,
    query_neighbors,
)
from dictlearn.index.store import MANIFEST
from tests.index.conftest import write_sae


def _dirs(n: int, d: int, seed: int, name: str = "sae") -> Directions:
    rng = np.random.default_rng(seed)
    return Directions.from_weights(
        rng.standard_normal((n, d)).astype(np.float32), f"mem://{name}", f"digest-{seed}"
    )


def _config(out, **kw) -> IndexConfig:
    base = dict(sae="unused", out=str(out), k=4, block_size=50, key_chunk=32)
    base.update(kw)
    return IndexConfig.model_validate(base)


def _table(url: str) -> dict[str, np.ndarray]:
    store = IndexStore(url)
    manifest = store.manifest()
    table = pq.ParquetDataset([f"{url}/{p}" for p in manifest.parts]).read()
    return {name: table[name].to_numpy() for name in table.column_names}


def test_build_writes_parts_and_manifest_matching_brute_force(tmp_path) -> None:
    q = _dirs(173, 12, seed=0)
    result = build_from_directions(_config(tmp_path / "idx"), q)
    m = result.manifest
    assert (result.parts_written, result.parts_skipped) == (4, 0)
    assert (m.n_features, m.k, m.metric, m.method, m.digest) == (
        173,
        4,
        "decoder",
        "exact",
        "digest-0",
    )
    assert m.parts == [f"parts/part-{b:06d}.parquet" for b in range(4)]
    t = _table(str(tmp_path / "idx"))
    ref_ids, ref_cos = brute_force_knn(q.vectors, q.vectors, 4, exclude_self=True)
    np.testing.assert_array_equal(t["feature"], np.repeat(np.arange(173), 4))
    np.testing.assert_array_equal(t["rank"], np.tile(np.arange(4), 173))
    np.testing.assert_array_equal(t["neighbor"], ref_ids.reshape(-1))
    np.testing.assert_allclose(t["cosine"], ref_cos.reshape(-1), rtol=1e-5, atol=1e-6)
    # Already complete: nothing recomputed.
    again = build_from_directions(_config(tmp_path / "idx"), q)
    assert (again.parts_written, again.parts_skipped) == (0, 4)


def test_resume_recomputes_only_the_missing_part(tmp_path) -> None:
    q = _dirs(173, 12, seed=0)
    out = tmp_path / "idx"
    build_from_directions(_config(out), q)
    before = _table(str(out))
    (out / "parts" / "part-000002.parquet").unlink()
    (out / MANIFEST).unlink()  # as if killed before the commit
    assert IndexStore(str(out)).manifest() is None
    result = build_from_directions(_config(out), q)
    assert (result.parts_written, result.parts_skipped) == (1, 3)
    after = _table(str(out))
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize("committed", [True, False])
def test_rerun_with_another_sae_or_k_is_refused(tmp_path, committed: bool) -> None:
    out = tmp_path / "idx"
    build_from_directions(_config(out), _dirs(173, 12, seed=0))
    if not committed:
        (out / MANIFEST).unlink()
    with pytest.raises(IndexMismatch, match="digest="):
        build_from_directions(_config(out), _dirs(173, 12, seed=9))
    with pytest.raises(IndexMismatch, match=r"k=4.*k=5"):
        build_from_directions(_config(out, k=5), _dirs(173, 12, seed=0))


def test_cross_sae_index(tmp_path) -> None:
    a, b = _dirs(60, 12, seed=1, name="a"), _dirs(250, 12, seed=2, name="b")
    result = build_from_directions(_config(tmp_path / "x", k=6), a, b)
    assert result.manifest.cross and result.manifest.keys_source == "mem://b"
    t = _table(str(tmp_path / "x"))
    ref_ids, _ = brute_force_knn(a.vectors, b.vectors, 6)
    np.testing.assert_array_equal(t["neighbor"], ref_ids.reshape(-1))
    # The query answers from the index name SAE B's features.
    got = query_neighbors(str(tmp_path / "x"), feature=7, k=3)
    np.testing.assert_array_equal(got.neighbors, ref_ids[7, :3])
    assert got.keys_source == "mem://b"


def test_cross_sae_of_another_width_is_refused_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="d_in=13"):
        build_from_directions(
            _config(tmp_path / "x"), _dirs(60, 12, seed=1), _dirs(70, 13, seed=2, name="b")
        )
    assert not (tmp_path / "x").exists()


def test_approximate_index_recall_and_vector_query(tmp_path) -> None:
    q = _dirs(500, 16, seed=3)
    result = build_from_directions(_config(tmp_path / "ann", method="approximate", k=5), q)
    assert result.manifest.ann_file == "ann.faiss"
    t = _table(str(tmp_path / "ann"))
    ref_ids, _ = brute_force_knn(q.vectors, q.vectors, 5, exclude_self=True)
    ids = t["neighbor"].reshape(500, 5)
    assert not (ids == np.arange(500)[:, None]).any()
    recall = np.mean([len(set(a) & set(r)) / 5 for a, r in zip(ids, ref_ids, strict=True)])
    assert recall > 0.95
    # A direction equal to feature 42 finds feature 42 first (from the stored HNSW graph).
    got = query_neighbors(str(tmp_path / "ann"), vector=q.vectors[42] * 3.0, k=3)
    assert got.neighbors[0] == 42 and not got.exact
    assert got.cosines[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fmt", ["native", "saelens", "gemmascope"])
def test_queries_against_an_sae_and_an_exact_index(tmp_path, fmt: str) -> None:
    sae = write_sae(tmp_path / "sae", 90, 8, seed=4, fmt=fmt)
    w = load_sae(sae)
    q = Directions.from_weights(w.W_dec, sae, w.digest)
    build_from_directions(_config(tmp_path / "idx", sae=sae), q)
    ref_ids, ref_cos = brute_force_knn(w.W_dec, w.W_dec, 4, exclude_self=True)
    for target in (str(tmp_path / "idx"), sae):
        got = query_neighbors(target, feature=11, k=4)
        np.testing.assert_array_equal(got.neighbors, ref_ids[11])
        np.testing.assert_allclose(got.cosines, ref_cos[11], rtol=1e-5)
    # By vector on an exact index: the source SAE is re-read (digest checked) and scanned.
    got = query_neighbors(str(tmp_path / "idx"), vector=w.W_dec[11], k=2)
    assert list(got.neighbors) == [11, ref_ids[11, 0]]
    # Encoder directions differ from decoder ones.
    enc = query_neighbors(sae, feature=11, k=4, metric="encoder")
    ref_enc, _ = brute_force_knn(w.W_enc.T, w.W_enc.T, 4, exclude_self=True)
    np.testing.assert_array_equal(enc.neighbors, ref_enc[11])


def test_build_and_query_on_an_fsspec_url() -> None:
    q = _dirs(70, 8, seed=7)
    url = "memory://index-test/idx"
    result = build_from_directions(_config(url, k=3), q)
    assert result.parts_written == 2
    ref_ids, _ = brute_force_knn(q.vectors, q.vectors, 3, exclude_self=True)
    got = query_neighbors(url, feature=65, k=3)
    np.testing.assert_array_equal(got.neighbors, ref_ids[65])
