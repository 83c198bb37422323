"""The native CPU kernels against the XLA implementations they replace on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.sae import TopKConfig, cpu_kernels, get_architecture
from dictlearn.sae.sparse import walk_pairs_by_latent
from dictlearn.sae.topk_select import top_k
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram
from sharding import MeshConfig, make_mesh
from tests.sae.test_topk_select import top_k_cases


@pytest.fixture(autouse=True)
def _require_kernels() -> None:
    # The machines this project runs CI on have a C++ compiler; a build failure is a failure.
    assert cpu_kernels.enabled(), "the CPU kernels did not build (see the warning above)"


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    specials = rng.normal(size=(8, 256))
    specials[0, 3] = np.nan  # TopK's order puts NaN above +inf
    specials[1, :] = np.nan
    specials[2, 5] = np.inf
    specials[3, :] = -np.inf
    specials[4, 10:20] = 7.0  # a tie at the cut-off
    return [*top_k_cases(), specials, rng.normal(size=(5, 37))]  # odd width: scalar tails


def _bits(a: jax.Array) -> np.ndarray:
    return np.asarray(a).view(np.int32)


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("k", [1, 5, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_top_k_kernel_is_bitwise_lax_top_k(case: int, k: int, with_bias: bool) -> None:
    x = jnp.asarray(_cases()[case], jnp.float32)
    k = min(k, x.shape[1])
    bias = (
        jnp.asarray(np.random.default_rng(case).normal(size=x.shape[1]), jnp.float32)
        if with_bias
        else None
    )
    values, indices = jax.jit(cpu_kernels.top_k, static_argnums=1)(x, k, bias)
    ref_values, ref_indices = jax.lax.top_k(x if bias is None else x + bias, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(_bits(values), _bits(ref_values))


def test_top_k_dispatches_to_the_kernel_on_cpu_and_never_stores_the_biased_matrix() -> None:
    b, f = 64, 4096
    fn = jax.jit(lambda p, bias: top_k(p, 16, bias))
    hlo = fn.lower(jnp.zeros((b, f)), jnp.zeros(f)).compile().as_text()
    assert "dictlearn_top_k" in hlo
    assert "TopK" not in hlo
    entry = hlo.split("ENTRY")[1].splitlines()
    assert not [line for line in entry if f"= f32[{b},{f}]" in line and "parameter(" not in line]


def test_disabling_the_kernels_selects_the_xla_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = jax.random.normal(jax.random.key(0), (32, 1024))
    bias = jax.random.normal(jax.random.key(1), (1024,))
    with_kernel = jax.jit(lambda p, b: top_k(p, 8, b))
    kernel_out = with_kernel(x, bias)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    without = jax.jit(lambda p, b: top_k(p, 8, b))
    assert "dictlearn_top_k" not in without.lower(x, bias).compile().as_text()
    for got, want in zip(without(x, bias), kernel_out, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _pairs(batch: int, d: int, n_features: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    dense = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    # Distinct latents per token, as a top-k gives. Latent 3 fires on half the tokens (a long
    # segment), the rest rarely; ~20 % of the slots are inactive.
    others = np.setdiff1d(np.arange(n_features), [3])
    indices = np.stack([rng.choice(others, k, replace=False) for _ in range(batch)])
    indices[: batch // 2, 0] = 3
    active = rng.random((batch, k)) < 0.8
    return (
        dense(batch, d),
        dense(batch, d),
        dense(n_features, d),
        dense(batch, k),
        dense(batch, k),
        jnp.asarray(indices, jnp.int32),
        jnp.asarray(active),
    )


@pytest.mark.parametrize(("batch", "d", "n_features", "k"), [(64, 40, 200, 8), (33, 17, 70, 5)])
def test_sparse_backward_kernel_equals_the_xla_walk(
    batch: int, d: int, n_features: int, k: int
) -> None:
    """Same sums, in another order: equal to float32 rounding (the walk uses other chunks)."""
    args = _pairs(batch, d, n_features, k, seed=batch)
    got = jax.jit(cpu_kernels.sparse_backward)(*args)
    want = jax.jit(walk_pairs_by_latent)(*args)
    for name, g, w in zip(("W_dec", "W_enc", "b_enc"), got, want, strict=True):
        assert g.shape == w.shape, name
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    # Latents no active pair touches get exactly zero gradient.
    untouched = np.setdiff1d(np.arange(n_features), np.asarray(args[5])[np.asarray(args[6])])
    assert untouched.size
    assert not np.asarray(got[0])[untouched].any()
    assert not np.asarray(got[1])[:, untouched].any()


@pytest.mark.parametrize("chunk_elements", [40, 1 << 26])  # one pair per chunk; all in one
def test_walk_chunk_size_changes_only_rounding(chunk_elements: int) -> None:
    """GPU and TPU walk in 256 MiB chunks, CPU in cache-sized ones: the same gradients."""
    args = _pairs(64, 40, 200, 8, seed=5)
    want = jax.jit(cpu_kernels.sparse_backward)(*args)
    got = jax.jit(functools.partial(walk_pairs_by_latent, chunk_elements=chunk_elements))(*args)
    for name, g, w in zip(("W_dec", "W_enc", "b_enc"), got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def test_sparse_backward_kernel_is_reproducible() -> None:
    """Each output row is summed by one thread in a fixed order: bit-identical reruns."""
    args = _pairs(512, 64, 300, 16, seed=3)
    fn = jax.jit(cpu_kernels.sparse_backward)
    first, second = fn(*args), fn(*args)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_train_step_with_kernels_matches_the_xla_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps on a 2x4 mesh (AuxK on the third), kernels vs pure XLA."""
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    mesh = make_mesh(MeshConfig(data=2, model=4), jax.devices()[:8])
    finals = []
    for setting in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.DISABLE_ENV, setting)
        program = TrainProgram(
            get_architecture(TopKConfig(n_features=64, k=4, k_aux=8, dead_window_tokens=64), 16),
            OptimizerConfig(lr=4e-4, warmup_steps=0),
            10,
            64,
            mesh,
            1.0,
        )
        hlo = program.step_fn().lower(program.abstract_state(), program.abstract_batch())
        assert ("dictlearn_sparse_backward" in hlo.compile().as_text()) == (setting == "1")
        state = program.init(jax.random.key(0), jnp.zeros(16))
        for _ in range(3):
            state, metrics = program.train_step(state, program.global_batch_array(x))
        assert metrics["aux_loss"] > 0
        finals.append(jax.device_get(state.params))
    for key in finals[0]:
        np.testing.assert_allclose(finals[0][key], finals[1][key], rtol=1e-5, atol=1e-6)


def test_build_names_a_missing_compiler(tmp_path) -> None:
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C\\+\\+ compiler 'no-such-cxx'"):
        cpu_kernels.build(compiler="no-such-cxx", cache_dir=tmp_path)


def test_build_reports_compiler_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    with pytest.raises(cpu_kernels.KernelBuildError, match=r"compiling broken\.cc failed"):
        cpu_kernels.build(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind


def test_build_caches_the_library(tmp_path) -> None:
    first = cpu_kernels.build(cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build(cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
