"""JumpReLU and BatchTopK over slots against dense autodiff references, overflow included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.sae import (
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUL1Config,
    cpu_kernels,
    get_architecture,
    variable_l0,
)
from dictlearn.sae import batchtopk as batchtopk_module
from dictlearn.sae import jumprelu as jumprelu_module
from dictlearn.sae.jumprelu import jumprelu, step
from dictlearn.sae.variable_l0 import select_slots
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram, unsharded_copy
from sharding import MeshConfig, make_mesh

D_MODEL, N_FEATURES, BATCH = 16, 256, 40
BANDWIDTH = 0.4


def _jumprelu_setup(bound: int):
    # Unit decoder rows (JumpReLU's default is 0.1): pre-activations of the thresholds' scale.
    cfg = JumpReLUConfig(
        n_features=N_FEATURES, bandwidth=BANDWIDTH, sparse_l0_bound=bound, decoder_init_norm=1.0
    )
    arch = get_architecture(cfg, D_MODEL)
    params = arch.init(jax.random.key(0), jnp.full(D_MODEL, 0.1))
    rng = np.random.default_rng(3)
    params["log_threshold"] = jnp.asarray(np.log(rng.uniform(1.5, 2.5, N_FEATURES)), jnp.float32)
    params["b_enc"] = jnp.asarray(rng.normal(scale=0.3, size=N_FEATURES), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (BATCH, D_MODEL))
    return arch, params, x


def _dense_jumprelu_loss(params, x, l0_coef):
    """JumpReLU as Gemma Scope states it, densely: the reference for the sparse step."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    threshold = jnp.exp(params["log_threshold"])
    x_hat = jumprelu(pre, threshold, BANDWIDTH) @ params["W_dec"] + params["b_dec"]
    recon = jnp.sum((x_hat - x) ** 2) / x.shape[0]
    l0 = jnp.sum(step(pre, threshold, BANDWIDTH)) / x.shape[0]
    return recon + l0_coef * l0, (pre, threshold)


def _sharded_loss_and_grads(arch, params, x, mesh_shape, dead=None):
    data, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])
    program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 10, BATCH, mesh, norm_scale=1.0)
    state = program.init(jax.random.key(0), jnp.zeros(D_MODEL))
    any_dead = dead is not None
    dead = jnp.zeros(N_FEATURES, bool) if dead is None else jnp.asarray(dead)
    batch = program.global_batch_array(np.asarray(x))

    def loss(p):
        return program._loss(p, state.arch_state, dead, batch, 1.0, any_dead=any_dead)

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, (metrics, fire, _)), grads = run(jax.device_put(params, program.param_shardings))
    return unsharded_copy((value, metrics, fire, grads))


def _assert_grads_equal(grads, ref_grads):
    for key, ref_grad in ref_grads.items():
        scale = np.max(np.abs(ref_grad))
        assert scale > 0, key
        np.testing.assert_allclose(grads[key], ref_grad, rtol=0, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize(
    ("mesh_shape", "bound", "rows_max", "overflows", "kernels", "dense_chunk"),
    [
        ((1, 1), 64, 64, False, "1", 1024),
        ((2, 4), 24, 64, False, "1", 1024),
        ((2, 4), 24, 64, False, "0", 1024),  # the XLA path GPUs and TPUs run
        ((1, 1), 4, 64, False, "1", 1024),  # overflowing tokens through dense rows
        ((2, 4), 4, 64, False, "1", 1024),
        ((2, 4), 4, 64, False, "0", 1024),
        ((1, 1), 4, 2, True, "1", 1024),  # more than the rows take: the dense step
        ((2, 4), 4, 2, True, "1", 1024),
        ((1, 1), 4, 2, True, "1", 8),  # the dense fallback in token chunks
        ((2, 4), 4, 2, True, "1", 8),
        ((1, 1), 0, 64, True, "1", 8),  # always dense, chunked
    ],
)
def test_jumprelu_loss_and_gradients_equal_the_dense_reference(
    monkeypatch: pytest.MonkeyPatch,
    mesh_shape: tuple[int, int],
    bound: int,
    rows_max: int,
    overflows: bool,
    kernels: str,
    dense_chunk: int,
) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, kernels)
    monkeypatch.setattr(variable_l0, "DENSE_CHUNK_TOKENS", dense_chunk)
    monkeypatch.setattr(jumprelu_module, "OVERFLOW_ROWS_PER_SHARD", rows_max)
    arch, params, x = _jumprelu_setup(bound)
    loss, metrics, fire, grads = _sharded_loss_and_grads(arch, params, x, mesh_shape)

    def ref(p):
        return _dense_jumprelu_loss(p, x, arch.config.l0_coef)

    (ref_loss, (pre, threshold)), ref_grads = jax.jit(jax.value_and_grad(ref, has_aux=True))(params)
    pre, threshold = np.asarray(pre), np.asarray(threshold)
    active = pre > threshold
    # The case is not degenerate: a few latents per token, and pairs just below the threshold
    # (inactive, yet in the estimator's window) that only the window walk can account for.
    assert 1 < active.sum(1).mean() < 20
    below = (pre <= threshold) & (pre > threshold - BANDWIDTH / 2)
    assert below.sum() > 10
    assert metrics["dense_fallback"] == float(overflows)
    if bound:
        # Tokens over the bound on some shard: the cases that test the rows or the fallback.
        assert (metrics["saturated_tokens"] > 0) == (bound == 4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], active.sum(1).mean(), rtol=1e-6)
    np.testing.assert_array_equal(fire, active.sum(0))
    _assert_grads_equal(grads, ref_grads)


@pytest.mark.parametrize("scope", ["dead", "batch"])
@pytest.mark.parametrize(("mesh_shape", "bound"), [((1, 1), 64), ((2, 4), 24), ((2, 4), 4)])
def test_jumprelu_dead_latent_pull_equals_the_dense_pre_activation_loss(
    mesh_shape: tuple[int, int], bound: int, scope: str
) -> None:
    """``revive_coef``'s closed form (from the batch mean) is Anthropic's pre-activation loss
    ``mean_t Σ relu(threshold - pre)`` over the latents that fired on no token of the batch
    (``revive_scope`` dead: only those also counted dead), stated densely here, in value and in
    every gradient (b_dec's excluded by design), on the sparse path, sharded, and on the dense
    fallback (bound 4)."""
    coef = 0.3
    arch, params, x = _jumprelu_setup(bound)
    update = {"revive_coef": coef, "revive_scope": scope}
    arch = get_architecture(arch.config.model_copy(update=update), D_MODEL)
    dead = np.zeros(N_FEATURES, bool)
    dead[::3] = True
    loss, metrics, _, grads = _sharded_loss_and_grads(arch, params, x, mesh_shape, dead)

    def ref(p):
        loss, (pre, threshold) = _dense_jumprelu_loss(p, x, arch.config.l0_coef)
        silent = ~jnp.any(pre > threshold, axis=0)
        if scope == "dead":
            silent = silent & jnp.asarray(dead)
        no_b_dec = p | {"b_dec": jax.lax.stop_gradient(p["b_dec"])}
        pre_for_pull = (x - no_b_dec["b_dec"]) @ p["W_enc"] + p["b_enc"]
        gaps = jnp.where(silent, jax.nn.relu(threshold - pre_for_pull), 0.0)
        pull = coef * jnp.sum(gaps) / x.shape[0]
        return loss + pull, (pull, silent)

    (ref_loss, (ref_pull, silent)), ref_grads = jax.jit(jax.value_and_grad(ref, has_aux=True))(
        params
    )
    silent = np.asarray(silent)
    # Dead latents of both kinds: silent in the batch (pulled) and firing in it (left alone).
    assert silent.sum() > 10 and (dead & ~silent).sum() > 3
    if scope == "batch":
        # ... and live latents silent in the batch, which only this scope pulls.
        assert (silent & ~dead).sum() > 3
    assert float(ref_pull) > 0
    np.testing.assert_allclose(metrics["revive_loss"], ref_pull, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _assert_grads_equal(grads, ref_grads)


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("chunk", [BATCH, 7])
def test_slots_hold_exactly_the_candidates_and_count_flags_overflow(
    monkeypatch: pytest.MonkeyPatch, kernels: str, chunk: int
) -> None:
    """Native kernel and XLA path: the candidate set, exact pre-activations, overflow flags."""
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, kernels)
    _, params, x = _jumprelu_setup(64)
    bias = params["b_enc"] - jnp.exp(params["log_threshold"]) + 0.5
    bound = 24
    slots = jax.jit(lambda p, x, b: select_slots(p, x, bound, b, chunk))(params, x, bias)
    unbiased = np.asarray((x - params["b_dec"]) @ params["W_enc"])
    pre = unbiased + np.asarray(params["b_enc"])
    candidates = unbiased + np.asarray(bias) > 0
    n_candidates = candidates.sum(1)
    assert (n_candidates > bound).any() and (n_candidates <= bound).sum() > BATCH // 2
    np.testing.assert_array_equal(np.asarray(slots.count) > bound, n_candidates > bound)
    for row in np.flatnonzero(n_candidates <= bound):
        assert slots.count[row] == n_candidates[row]
        used = np.isfinite(np.asarray(slots.pre[row]))
        assert used.sum() == n_candidates[row]
        got = np.asarray(slots.indices[row])[used]
        np.testing.assert_array_equal(np.sort(got), np.flatnonzero(candidates[row]))
        np.testing.assert_allclose(slots.pre[row][used], pre[row, got], rtol=1e-6)


@pytest.mark.parametrize(
    ("target_l0", "bound", "resolved"),
    [
        (None, None, 256),
        (32.0, None, 128),
        (8.0, None, 128),  # never under 128
        (33.0, None, 256),
        (1000.0, None, 256),  # never over 256
        (32.0, 64, 64),  # a bound set by hand is kept
        (None, 0, 0),
    ],
)
def test_jumprelu_l0_bound_follows_the_target(
    target_l0: float | None, bound: int | None, resolved: int
) -> None:
    cfg = JumpReLUConfig(n_features=N_FEATURES, target_l0=target_l0, sparse_l0_bound=bound)
    assert cfg.l0_bound == resolved


@pytest.mark.parametrize("target_l0", [None, 32.0])
def test_jumprelu_step_runs_with_the_resolved_bound(target_l0: float | None) -> None:
    """With ~190 of 256 latents candidates per token, a target of 32 (bound 128) sends tokens
    through dense rows and no target (bound 256) does not; the loss is exact either way."""
    cfg = JumpReLUConfig(
        n_features=N_FEATURES, bandwidth=BANDWIDTH, decoder_init_norm=1.0, target_l0=target_l0
    )
    arch = get_architecture(cfg, D_MODEL)
    params = arch.init(jax.random.key(0), jnp.zeros(D_MODEL))
    params["log_threshold"] = jnp.full(N_FEATURES, np.log(2.0), jnp.float32)
    params["b_enc"] = jnp.full(N_FEATURES, 2.2, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (BATCH, D_MODEL))
    loss, metrics, _, _ = _sharded_loss_and_grads(arch, params, x, (1, 1))
    ref_loss, (pre, threshold) = _dense_jumprelu_loss(params, x, cfg.l0_coef)
    candidates = (np.asarray(pre) > np.asarray(threshold) - BANDWIDTH).sum(1)
    assert (candidates > 128).sum() > BATCH // 2 and candidates.max() < 256
    assert (metrics["saturated_tokens"] > 0) == (target_l0 is not None)
    assert metrics["dense_fallback"] == 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


K = 4
K_AUX = 8
AUX_COEF = 0.5


def _batchtopk_setup(candidates: int, aux_gradient: str = "straight_through"):
    cfg = BatchTopKConfig(
        n_features=N_FEATURES,
        k=K,
        candidates_per_token=candidates,
        k_aux=K_AUX,
        aux_coef=AUX_COEF,
        aux_gradient=aux_gradient,
    )
    arch = get_architecture(cfg, D_MODEL)
    params = arch.init(jax.random.key(0), jnp.full(D_MODEL, 0.1))
    params["b_enc"] = jnp.asarray(
        np.random.default_rng(4).normal(scale=0.3, size=N_FEATURES), jnp.float32
    )
    x = jax.random.normal(jax.random.key(1), (BATCH, D_MODEL))
    return arch, params, x


def _dense_batchtopk_loss(params, x, dead=None, aux_gradient="straight_through"):
    """BatchTopK as Bussmann et al. state it, densely: the reference for the sparse step; with
    ``dead``, plus AuxK over the dead latents as Gao et al. state it."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    relu_pre = jax.nn.relu(jax.lax.stop_gradient(pre))
    cutoff = jnp.sort(relu_pre.reshape(-1))[-K * x.shape[0]]
    active = (relu_pre >= cutoff) & (relu_pre > 0)
    x_hat = jnp.where(active, pre, 0.0) @ params["W_dec"] + params["b_dec"]
    recon = jnp.sum((x_hat - x) ** 2) / x.shape[0]
    if dead is None:
        return recon, (active, cutoff, 0.0)
    residual = jax.lax.stop_gradient(x - x_hat)
    aux_activation = jax.nn.relu(pre)
    if aux_gradient == "straight_through":
        aux_activation = pre + jax.lax.stop_gradient(aux_activation - pre)
    _, picked = jax.lax.top_k(jax.lax.stop_gradient(jnp.where(dead, pre, -jnp.inf)), K_AUX)
    keep = jnp.zeros(pre.shape, bool).at[jnp.arange(x.shape[0])[:, None], picked].set(True)
    aux_hat = jnp.where(keep & dead, aux_activation, 0.0) @ params["W_dec"]
    aux_err = jnp.sum((aux_hat - residual) ** 2)
    aux_metric = aux_err / jnp.sum((residual - residual.mean(0)) ** 2)
    return recon + AUX_COEF * aux_err / x.shape[0], (active, cutoff, aux_metric)


@pytest.mark.parametrize(
    ("mesh_shape", "candidates", "path", "aux"),
    [
        # "slots": no token has all its candidates selected; "rows": some do and take dense
        # rows of their own; "dense": more than the rows bound (1 here) do, the step is dense.
        ((1, 1), 32, "slots", None),
        ((2, 4), 32, "slots", None),
        ((1, 1), 8, "rows", None),  # one device, 40 tokens: 4 candidates saturate over 32
        ((2, 4), 4, "rows", None),
        ((1, 1), 4, "dense", None),
        ((2, 4), 4, "dense", None),
        # AuxK over every 5th latent counted dead, on every path and both AuxK gradients.
        ((1, 1), 32, "slots", "straight_through"),
        ((2, 4), 32, "slots", "straight_through"),
        ((2, 4), 32, "slots", "relu"),
        ((2, 4), 4, "rows", "straight_through"),
        ((2, 4), 4, "dense", "straight_through"),
    ],
)
def test_batchtopk_loss_and_gradients_equal_the_dense_reference(
    monkeypatch: pytest.MonkeyPatch,
    mesh_shape: tuple[int, int],
    candidates: int,
    path: str,
    aux: str | None,
) -> None:
    if path == "dense":
        monkeypatch.setattr(batchtopk_module, "SATURATED_TOKENS_PER_SHARD", 1)
    arch, params, x = _batchtopk_setup(candidates, aux or "straight_through")
    dead = None if aux is None else np.arange(N_FEATURES) % 5 == 0
    loss, metrics, fire, grads = _sharded_loss_and_grads(arch, params, x, mesh_shape, dead)
    (ref_loss, (active, cutoff, ref_aux)), ref_grads = jax.jit(
        jax.value_and_grad(
            lambda p: _dense_batchtopk_loss(p, x, dead, aux or "straight_through"), has_aux=True
        )
    )(params)
    if aux is not None:
        assert ref_aux > 0
        np.testing.assert_allclose(metrics["aux_loss"], ref_aux, rtol=1e-5)
        # The AuxK term is really in the loss (the check could not pass without it).
        assert abs(float(_dense_batchtopk_loss(params, x)[0]) - ref_loss) > 1e-3 * ref_loss
    else:
        assert metrics["aux_loss"] == 0.0
    active = np.asarray(active)
    # Token-shards with at least as many selected latents as candidates: each must be caught
    # (the step takes its dense row, or runs densely); the step counts a few more, whose last
    # candidate is at or above the candidates' own cut-off.
    data, model = mesh_shape
    m = candidates or 4 * K
    per_device = (active.reshape(data, BATCH // data, model, -1).sum(3) >= m).sum(1)
    assert (per_device.sum() > 0) == (path != "slots")
    assert metrics["saturated_tokens"] >= per_device.sum()
    assert metrics["dense_fallback"] == float(path == "dense")
    if path == "rows":
        assert per_device.max() > 1  # so the "dense" case's bound of 1 really overflows
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], active.sum(1).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["batch_threshold"], cutoff, rtol=1e-6)
    np.testing.assert_array_equal(fire, active.sum(0))
    _assert_grads_equal(grads, ref_grads)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_batchtopk_evaluation_uses_the_exported_threshold(mesh_shape: tuple[int, int]) -> None:
    """The held-out evaluation scores what export ships: a JumpReLU at the learned threshold."""
    arch, params, x = _batchtopk_setup(0)
    data, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])
    program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 10, BATCH, mesh, norm_scale=1.0)
    state = program.init(jax.random.key(0), jnp.zeros(D_MODEL))
    threshold = 1.0
    state = state._replace(
        params=jax.device_put(params, program.param_shardings),
        arch_state=jax.device_put(
            {"threshold": jnp.float32(threshold), "threshold_initialised": jnp.bool_(True)},
            program.arch_state_shardings,
        ),
    )
    metrics = unsharded_copy(program.eval_step(state, program.global_batch_array(np.asarray(x))))

    pre = np.asarray((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
    latents = np.where(pre > threshold, pre, 0.0)
    np.testing.assert_allclose(latents, arch.encode(params, x, state.arch_state), rtol=1e-6)
    x_hat = latents @ np.asarray(params["W_dec"]) + np.asarray(params["b_dec"])
    recon = np.sum((x_hat - np.asarray(x)) ** 2) / BATCH
    np.testing.assert_allclose(metrics["recon_loss"], recon, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], (pre > threshold).sum(1).mean(), rtol=1e-6)
    # ... which is not what the training-time batch selection scores on these rows.
    train_recon, (active, _, _) = _dense_batchtopk_loss(params, x)
    assert abs(float(train_recon) - recon) > 1e-2 * recon
    assert metrics["l0"] != np.asarray(active).sum(1).mean()


def _dense_relu_l1_loss(params, x, l1_coef):
    latents = jax.nn.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
    x_hat = latents @ params["W_dec"] + params["b_dec"]
    l1 = jnp.sum(latents @ jnp.linalg.norm(params["W_dec"], axis=1)) / x.shape[0]
    return jnp.sum((x_hat - x) ** 2) / x.shape[0] + l1_coef * l1, latents > 0


@pytest.mark.parametrize(
    ("mesh_shape", "bound", "overflows", "dense_chunk"),
    [
        ((1, 1), 64, False, 1024),
        ((2, 4), 24, False, 1024),
        ((1, 1), 4, True, 1024),
        ((2, 4), 4, True, 1024),
        ((2, 4), 4, True, 8),  # the dense fallback in token chunks
    ],
)
def test_relu_l1_loss_and_gradients_equal_the_dense_reference(
    monkeypatch: pytest.MonkeyPatch,
    mesh_shape: tuple[int, int],
    bound: int,
    overflows: bool,
    dense_chunk: int,
) -> None:
    monkeypatch.setattr(variable_l0, "DENSE_CHUNK_TOKENS", dense_chunk)
    arch = get_architecture(ReLUL1Config(n_features=N_FEATURES, sparse_l0_bound=bound), D_MODEL)
    params = arch.init(jax.random.key(0), jnp.full(D_MODEL, 0.1))
    # A trained ReLU SAE's sparsity: most pre-activations negative.
    params["b_enc"] = jnp.asarray(
        np.random.default_rng(5).normal(-0.25, 0.05, size=N_FEATURES), jnp.float32
    )
    x = jax.random.normal(jax.random.key(1), (BATCH, D_MODEL))
    loss, metrics, fire, grads = _sharded_loss_and_grads(arch, params, x, mesh_shape)
    (ref_loss, active), ref_grads = jax.jit(
        jax.value_and_grad(lambda p: _dense_relu_l1_loss(p, x, arch.config.l1_coef), has_aux=True)
    )(params)
    active = np.asarray(active)
    assert 1 < active.sum(1).mean() < 20
    assert metrics["dense_fallback"] == float(overflows)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], active.sum(1).mean(), rtol=1e-6)
    np.testing.assert_array_equal(fire, active.sum(0))
    _assert_grads_equal(grads, ref_grads)


@pytest.mark.parametrize("name", ["jumprelu", "relu_l1"])
def test_dense_fallback_memory_does_not_grow_with_the_batch(name: str) -> None:
    """The dense fallback is compiled into every step; in token chunks its buffers are
    ``[chunk, n_local]``, so the step's planned temporaries barely change from 1,024 to 8,192
    tokens (unchunked, JumpReLU's grew by ~5 ``[batch, n_local]`` float32 buffers)."""
    n_features = 8192
    configs = {
        "jumprelu": JumpReLUConfig(n_features=n_features, init_threshold=2.0),
        "relu_l1": ReLUL1Config(n_features=n_features),
    }
    mesh = make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
    temp = {}
    for batch in (1024, 8192):
        program = TrainProgram(
            get_architecture(configs[name], D_MODEL), OptimizerConfig(lr=1e-4), 10, batch, mesh, 1.0
        )
        compiled = (
            program.step_fn(any_dead=False)
            .lower(program.abstract_state(), program.abstract_batch())
            .compile()
        )
        temp[batch] = compiled.memory_analysis().temp_size_in_bytes
    buffer = (8192 - 1024) * n_features * 4  # one [batch, n_features] float32 buffer's growth
    assert temp[8192] - temp[1024] < buffer / 2, temp
