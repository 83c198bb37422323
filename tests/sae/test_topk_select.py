"""Two-stage sharded top-k, the BatchTopK cut-off and the sparse TopK gradients vs dense refs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import dictlearn.sae.topk_select as topk_select
from dictlearn.sae import TopKConfig, get_architecture
from dictlearn.sae.sparse import sparse_topk_forward
from dictlearn.sae.topk_select import (
    ACCELERATOR_MAX_BLOCK_K,
    BLOCK,
    accelerator_block,
    batch_threshold,
    blockwise_top_k,
    merge_shard_candidates,
    select_shard_winners,
    sharded_top_k,
    threshold_merge,
)
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram
from sharding import DATA, MODEL, MeshConfig, make_mesh


def _mesh(data: int, model: int):
    return make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])


def _run_sharded_topk(pre: np.ndarray, k: int, model: int):
    """Global (values, indices) of the sharded top-k, gathered back for comparison."""
    mesh = _mesh(1, model)
    n_local = pre.shape[1] // model

    def local(p):
        sel = sharded_top_k(p, k)
        offset = jax.lax.axis_index(MODEL) * n_local
        values = jnp.where(sel.mask, sel.values, 0.0)
        indices = jnp.where(sel.mask, sel.indices + offset, 0)
        # Each winner is owned by exactly one shard: summing over shards reassembles them.
        return jax.lax.psum(values, MODEL), jax.lax.psum(indices, MODEL)

    fn = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=PartitionSpec(None, MODEL),
            out_specs=PartitionSpec(),
        )
    )
    arr = jax.device_put(pre, NamedSharding(mesh, PartitionSpec(None, MODEL)))
    return jax.device_get(fn(arr))


@pytest.mark.parametrize("model", [1, 2, 8])
def test_sharded_top_k_equals_dense(model: int) -> None:
    pre = np.random.default_rng(0).normal(size=(16, 256)).astype(np.float32)
    values, indices = _run_sharded_topk(pre, 8, model)
    ref_values, ref_indices = jax.device_get(jax.lax.top_k(pre, 8))
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(indices, ref_indices)


def test_sharded_top_k_breaks_ties_like_dense() -> None:
    # Heavy ties: values in {0, 1, 2}; dense top_k prefers the lowest index among equals.
    pre = np.random.default_rng(1).integers(0, 3, size=(16, 64)).astype(np.float32)
    values, indices = _run_sharded_topk(pre, 8, 4)
    ref_values, ref_indices = jax.device_get(jax.lax.top_k(pre, 8))
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(indices, ref_indices)


def test_sharded_top_k_rejects_k_larger_than_a_shard() -> None:
    with pytest.raises(ValueError, match="exceeds the 8 features held by one shard"):
        _run_sharded_topk(np.zeros((2, 64), np.float32), 9, 8)


def _winners(pre: np.ndarray, k: int, model: int, merge) -> tuple[np.ndarray, np.ndarray]:
    """Run ``merge`` on each shard's local top ``min(k, n_local)``; the winners every shard
    marked, as (values, global indices) per row in dense top-k order (value, then index)."""
    mesh = _mesh(1, model)
    n_local = pre.shape[1] // model
    m = min(k, n_local)

    def local(p):
        values, indices = jax.lax.top_k(p, m)
        sel = merge(values, indices, k)
        offset = jax.lax.axis_index(MODEL) * n_local
        return sel.values, sel.indices + offset, sel.mask

    fn = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=PartitionSpec(None, MODEL),
            out_specs=PartitionSpec(None, MODEL),  # each shard's slots side by side
        )
    )
    arr = jax.device_put(pre, NamedSharding(mesh, PartitionSpec(None, MODEL)))
    values, indices, mask = (np.asarray(a) for a in jax.device_get(fn(arr)))
    out_values, out_indices = [], []
    for row in range(pre.shape[0]):
        v, i = values[row][mask[row]], indices[row][mask[row]]
        assert len(v) == k, f"row {row}: {len(v)} winners marked, expected {k}"
        # lax.top_k's order: descending by its total order on floats, ties by lower index.
        order = np.lexsort(
            (i, -np.asarray(topk_select._order_key(jnp.asarray(v))).astype(np.int64))
        )
        out_values.append(v[order])
        out_indices.append(i[order])
    return np.stack(out_values), np.stack(out_indices)


MERGES = {
    "gather": lambda v, i, k: merge_shard_candidates(v, i, MODEL, k),
    "threshold": lambda v, i, k: threshold_merge(v, i, k, MODEL),
}


def _merge_cases() -> np.ndarray:
    """Rows of every kind at one shape (one compile per test): normal; heavy ties (the lowest
    index must win); mostly -inf (AuxK's live latents); signed zeros (TopK puts -0 below +0)."""
    rng = np.random.default_rng(4)
    masked = rng.normal(size=(8, 256))
    masked[:, rng.random(256) < 0.9] = -np.inf
    return np.concatenate(
        [
            rng.normal(size=(8, 256)),
            rng.integers(0, 3, size=(8, 256)),
            masked,
            np.where(rng.random((8, 256)) < 0.5, 0.0, -0.0),
        ]
    ).astype(np.float32)


@pytest.mark.parametrize(
    ("merge", "model", "k"),
    [
        ("threshold", 8, 1),
        ("threshold", 8, 5),
        ("threshold", 8, 40),  # 40 > the 32 features of a shard: k exceeds the candidates
        ("threshold", 2, 40),
        ("gather", 8, 40),
    ],
)
def test_merged_winners_are_the_dense_top_k(merge: str, model: int, k: int) -> None:
    """Both merges mark exactly the dense top-k: equal indices, bit-equal values."""
    pre = _merge_cases()
    values, indices = _winners(pre, k, model, MERGES[merge])
    ref_values, ref_indices = jax.device_get(jax.lax.top_k(pre, k))
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(values.view(np.int32), np.asarray(ref_values).view(np.int32))


def test_select_shard_winners_gathers_only_small_exchanges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the budget the merge is the all-gather; over it the threshold search (no gather
    of candidates), with the same winners."""
    pre = _merge_cases()
    mesh = _mesh(1, 8)

    def gathers(k: int) -> list[tuple[int, ...]]:
        fn = jax.jit(
            jax.shard_map(
                lambda p: select_shard_winners(*jax.lax.top_k(p, k), k, MODEL).mask,
                mesh=mesh,
                in_specs=PartitionSpec(None, MODEL),
                out_specs=PartitionSpec(None, MODEL),
            )
        )
        return _all_gather_shapes(fn.lower(jnp.asarray(pre)).compile().as_text())

    rows = pre.shape[0]
    assert gathers(8) == [(rows, 64)]  # 8 x 8 = 64 candidates: gathered
    monkeypatch.setattr(topk_select, "GATHERED_CANDIDATES_MAX", 32)
    assert gathers(8) == [(8, rows)]  # only the per-shard tie counts
    by_threshold = _winners(pre, 8, 8, lambda v, i, k: select_shard_winners(v, i, k, MODEL))
    np.testing.assert_array_equal(by_threshold[1], jax.device_get(jax.lax.top_k(pre, 8))[1])


def top_k_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    normal = rng.normal(size=(32, 1024))
    masked = rng.normal(size=(32, 1024))
    masked[:, rng.random(1024) < 0.9] = -np.inf  # AuxK: most latents alive (masked out)
    return [
        normal,
        rng.integers(0, 3, size=(32, 512)),  # heavy ties: lowest index must win
        masked,
        np.where(rng.random((16, 512)) < 0.5, 0.0, -0.0),  # TopK orders -0 below +0
    ]


def _blockwise_cases() -> list[tuple[int, int, int]]:
    """(case, k, block) with the blockwise path taken: 8 is the CPU width, 4 and 64 use the
    reshape reduction that GPU and TPU get (``accelerator_block``)."""
    widths = [case.shape[1] for case in top_k_cases()]
    return [
        (case, k, block)
        for case, width in enumerate(widths)
        for block in (BLOCK, 4, 64)
        for k in (1, 4, 5, 32)
        if width // block >= 2 * k
    ]


@pytest.mark.parametrize(
    ("case", "k", "block"),
    # Large k (the variable-L0 slot bound, AuxK) goes blockwise on accelerators only.
    [*_blockwise_cases(), (0, 128, 4), (1, 64, 4), (2, 128, 4), (3, 64, 4)],
)
def test_blockwise_top_k_is_bitwise_lax_top_k(case: int, k: int, block: int) -> None:
    x = jnp.asarray(top_k_cases()[case], jnp.float32)
    assert x.shape[1] // block >= 2 * k  # the blockwise path, not its lax.top_k fallback
    values, indices = jax.jit(blockwise_top_k, static_argnums=(1, 2, 3))(
        x, k, block, ACCELERATOR_MAX_BLOCK_K
    )
    ref_values, ref_indices = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(
        np.asarray(values).view(np.int32), np.asarray(ref_values).view(np.int32)
    )


def test_accelerator_block_balances_the_two_top_ks() -> None:
    # The power of two nearest sqrt(n / k); never below the CPU width.
    assert accelerator_block(65_536, 32) == 64
    assert accelerator_block(1_048_576, 32) == 256
    assert accelerator_block(64, 32) == BLOCK


def test_blockwise_top_k_reads_the_matrix_once_and_never_sorts_it() -> None:
    """The bias add fuses into the block-max pass; no [B, F] sort, no TopK over all of F."""
    b, f = 64, 4096
    fn = jax.jit(lambda p, bias: blockwise_top_k(p + bias, 16))
    hlo = fn.lower(jnp.zeros((b, f)), jnp.zeros(f)).compile().as_text()
    entry = hlo.split("ENTRY")[1].splitlines()
    assert not [line for line in entry if f"= f32[{b},{f}]" in line and "parameter(" not in line]
    assert not re.search(rf"\[{b},{f}\][^=]*\bsort\(", hlo)
    assert "TopK" in hlo


def _sharded_threshold(pre: np.ndarray, n_select: int, candidates: int) -> float:
    mesh = _mesh(2, 4)
    spec = PartitionSpec(DATA, MODEL)
    fn = jax.jit(
        jax.shard_map(
            lambda p: batch_threshold(p, n_select, candidates, (DATA, MODEL)),
            mesh=mesh,
            in_specs=spec,
            out_specs=PartitionSpec(),
        )
    )
    return float(fn(jax.device_put(pre, NamedSharding(mesh, spec))))


@pytest.mark.parametrize("candidates", [16, 2])  # 2 forces the exact bisection fallback
def test_batch_threshold_is_the_exact_nth_largest(candidates: int) -> None:
    rng = np.random.default_rng(2)
    pre = rng.normal(size=(32, 64)).astype(np.float32)
    pre[3] += 3.0  # one token far above the rest: it holds many of the batch's winners
    n_select = 4 * 32
    expected = np.sort(pre.reshape(-1))[::-1][n_select - 1]
    assert _sharded_threshold(pre, n_select, candidates) == expected


def test_batch_threshold_handles_negative_values() -> None:
    pre = -np.abs(np.random.default_rng(3).normal(size=(16, 32))).astype(np.float32)
    expected = np.sort(pre.reshape(-1))[::-1][39]
    assert _sharded_threshold(pre, 40, 1) == expected


def test_sparse_topk_gradients_equal_dense_autodiff() -> None:
    """The custom sparse backward equals plain autodiff of a dense TopK SAE."""
    d, f, k, b = 8, 32, 4, 16
    arch = get_architecture(TopKConfig(n_features=f, k=k), d)
    params = arch.init(jax.random.key(0), jnp.ones(d) * 0.1)
    x = jax.random.normal(jax.random.key(1), (b, d))
    target = jax.random.normal(jax.random.key(2), (b, d))
    mesh = _mesh(1, 1)

    def sparse_loss(p):
        def local(p, x):
            pre = jax.lax.stop_gradient((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
            sel = sharded_top_k(pre, k)
            _, partial = sparse_topk_forward(p, x, sel)
            x_hat = jax.lax.psum(partial, MODEL) + p["b_dec"]
            return jax.lax.psum(jnp.sum((x_hat - target) ** 2), DATA)

        rep = PartitionSpec()
        return jax.shard_map(local, mesh=mesh, in_specs=(rep, rep), out_specs=rep)(p, x)

    def dense_loss(p):
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(pre), k)
        mask = jnp.zeros_like(pre).at[jnp.arange(b)[:, None], idx].set(1.0)
        latents = jax.nn.relu(pre) * mask
        x_hat = latents @ p["W_dec"] + p["b_dec"]
        return jnp.sum((x_hat - target) ** 2)

    sparse_val, sparse_grads = jax.jit(jax.value_and_grad(sparse_loss))(params)
    dense_val, dense_grads = jax.jit(jax.value_and_grad(dense_loss))(params)
    np.testing.assert_allclose(sparse_val, dense_val, rtol=1e-6)
    for key in dense_grads:
        np.testing.assert_allclose(
            sparse_grads[key], dense_grads[key], rtol=1e-5, atol=1e-6, err_msg=key
        )


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    shapes = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*\w+\[([\d,]*)\][^=]*\ball-gather(-start)?\(", line)
        if match:
            shapes.append(tuple(int(s) for s in match.group(1).split(",") if s))
    return shapes


def test_compiled_sharded_step_never_gathers_the_feature_axis() -> None:
    """No all-gather in the compiled TopK step outputs anything near [batch, n_features]."""
    d, f, b = 32, 4096, 256
    mesh = _mesh(2, 4)
    # None: the trainer's step, which holds the no-AuxK, sparse-AuxK and compact-AuxK variants.
    for any_dead in (False, True, None):
        program = TrainProgram(
            get_architecture(TopKConfig(n_features=f, k=16, k_aux=64), d),
            OptimizerConfig(lr=4e-4),
            10,
            b,
            mesh,
            1.0,
        )
        hlo = (
            program.step_fn(any_dead)
            .lower(program.abstract_state(), program.abstract_batch())
            .compile()
            .as_text()
        )
        shapes = _all_gather_shapes(hlo)
        assert shapes, "expected the top-k candidate all-gather in the compiled step"
        local_batch = b // mesh.shape[DATA]
        for shape in shapes:
            size = int(np.prod(shape))
            # The candidate exchange moves [local batch, k * model]; the dense matrix would
            # be [local batch, n_features] (or larger).
            assert f not in shape and size < local_batch * f // 4, shape
        # The top-k is XLA's TopK, not a full sort of the pre-activations.
        assert not re.search(rf"sort\([^)]*\[{local_batch},{f // 4}\]", hlo)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("SORTED_CHUNK_ELEMENTS", 8 * 16),  # 8 pairs per chunk: many chunks, a partial last one
        ("_INT32_MAX", 500),  # too small for packed keys: the key-value sort path
    ],
)
def test_sparse_backward_variants_agree(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: int
) -> None:
    """Chunking the sorted walk differently, or sorting by key-value pairs, changes nothing.

    The pairs are added in the same order either way, and the key-value sort changes no bit.
    With another chunk size one element of b_enc came out 1 ulp apart after the AuxK step (the
    cause is not pinned down; XLA compiles the per-chunk ops for the chunk's shape), so that
    variant is held to float32 rounding: a lost or doubled chunk is off by whole gradients.
    """
    import dictlearn.sae.sparse as sparse

    monkeypatch.setenv("DICTLEARN_CPU_KERNELS", "0")  # the XLA walk, not the CPU kernel
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    finals = []
    for patched in (False, True):
        if patched:
            monkeypatch.setattr(sparse, setting, value)
        program = TrainProgram(
            get_architecture(TopKConfig(n_features=64, k=4, k_aux=8, dead_window_tokens=64), 16),
            OptimizerConfig(lr=4e-4, warmup_steps=0),
            10,
            64,
            _mesh(2, 4),
            1.0,
        )
        state = program.init(jax.random.key(0), jnp.zeros(16))
        for _ in range(3):  # the third step runs AuxK (latents die after one batch)
            state, metrics = program.train_step(state, program.global_batch_array(x))
        assert metrics["aux_loss"] > 0
        finals.append(jax.device_get(state.params))
    # Per device: 32 tokens x k 4 = 128 pairs (AuxK: 256), 16 latents.
    if setting == "SORTED_CHUNK_ELEMENTS":
        assert sparse.sorted_chunk(128, 16) == 8
    else:
        assert sparse._INT32_MAX < 32 * (16 + 4)  # the key-value sort really ran
    for key in finals[0]:
        if setting == "SORTED_CHUNK_ELEMENTS":
            np.testing.assert_allclose(
                finals[0][key], finals[1][key], rtol=1e-6, atol=1e-9, err_msg=key
            )
        else:
            np.testing.assert_array_equal(finals[0][key], finals[1][key], err_msg=key)


@pytest.mark.parametrize("int32_max", [None, 10])  # packed int32 keys, then key-value sort
def test_pairs_by_latent_sorts_active_pairs_first(
    monkeypatch: pytest.MonkeyPatch, int32_max: int | None
) -> None:
    """Both sort paths put active pairs first, by (latent, token), and permute slots alike."""
    import dictlearn.sae.sparse as sparse

    rng = np.random.default_rng(5)
    batch, k, n_features = 6, 3, 10
    if int32_max is not None:
        monkeypatch.setattr(sparse, "_INT32_MAX", int32_max)
        assert batch * (n_features + k) > int32_max  # the key-value sort really runs
    indices = np.stack([rng.choice(n_features, k, replace=False) for _ in range(batch)])
    active = rng.random((batch, k)) < 0.6
    payload = rng.normal(size=(batch, k)).astype(np.float32)
    expected = sorted(
        (int(indices[b, j]), b, float(payload[b, j]))
        for b in range(batch)
        for j in range(k)
        if active[b, j]
    )
    pairs = sparse.pairs_by_latent(jnp.asarray(indices, jnp.int32), jnp.asarray(active), n_features)
    moved = pairs.to_sorted(jnp.asarray(payload))
    n = int(pairs.n_active)
    assert n == len(expected)
    got = list(
        zip(
            np.asarray(pairs.latents[:n]).tolist(),
            np.asarray(pairs.tokens[:n]).tolist(),
            np.asarray(moved[:n]).tolist(),
            strict=True,
        )
    )
    assert got == expected
    assert np.all(np.asarray(pairs.latents[n:]) == n_features)
    assert np.all((np.asarray(pairs.tokens) >= 0) & (np.asarray(pairs.tokens) < batch))


def test_compiled_batchtopk_step_has_no_full_sort() -> None:
    """XLA on CPU can silently turn a top_k into a sort of all [batch, features] (30x slower)."""
    from dictlearn.sae import BatchTopKConfig

    d, f, b = 32, 4096, 256
    mesh = _mesh(2, 4)
    program = TrainProgram(
        get_architecture(BatchTopKConfig(n_features=f, k=16), d),
        OptimizerConfig(lr=4e-4),
        10,
        b,
        mesh,
        1.0,
    )
    hlo = program.step_fn().lower(program.abstract_state(), program.abstract_batch()).compile()
    local = rf"\[{b // 2},{f // 4}\]"
    assert not re.search(local + r"[^=]*\bsort\(", hlo.as_text())
    # XLA's TopK, or the CPU kernel's.
    assert "TopK" in hlo.as_text() or "dictlearn_top_k" in hlo.as_text()
