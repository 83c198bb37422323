"""TopK's chunked encoder + top-k, and its loss (AuxK included) against a dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn.sae.topk as topk_module
from dictlearn.sae import TopKConfig, get_architecture
from dictlearn.sae.topk import local_top_k_candidates
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram, unsharded_copy
from sharding import MeshConfig, make_mesh

D_MODEL, N_FEATURES, BATCH, K, K_AUX = 16, 64, 40, 4, 8


def _params_and_batch(aux_gradient: str = "relu", encoder_dtype: str = "float32"):
    config = TopKConfig(
        n_features=N_FEATURES,
        k=K,
        k_aux=K_AUX,
        aux_gradient=aux_gradient,
        encoder_dtype=encoder_dtype,
    )
    arch = get_architecture(config, D_MODEL)
    params = arch.init(jax.random.key(0), jnp.full(D_MODEL, 0.1))
    # A spread-out b_enc, so the top-k really depends on it.
    params["b_enc"] = jnp.linspace(-0.5, 0.5, N_FEATURES, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (BATCH, D_MODEL))
    dead = np.zeros(N_FEATURES, bool)
    dead[3::4] = True
    return arch, params, x, jnp.asarray(dead)


@pytest.mark.parametrize("chunk_tokens", [BATCH, 8, 7, 1])
def test_chunked_candidates_equal_one_dense_top_k(chunk_tokens: int) -> None:
    """Any chunking (7 pads the last chunk) gives the dense top-k of both requests."""
    _, params, x, dead = _params_and_batch()
    masked_bias = jnp.where(dead, params["b_enc"], -jnp.inf)
    requests = [(K, params["b_enc"]), (K_AUX, masked_bias)]
    got = jax.jit(lambda p, x: local_top_k_candidates(p, x, requests, chunk_tokens))(params, x)

    pre = np.asarray((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
    dense = [
        jax.lax.top_k(pre, K),
        jax.lax.top_k(np.where(np.asarray(dead), pre, -np.inf), K_AUX),
    ]
    for (values, indices), (ref_values, ref_indices) in zip(got, dense, strict=True):
        assert values.shape == indices.shape == ref_values.shape
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_allclose(values, ref_values, rtol=1e-6, atol=1e-6)


def _dense_topk_loss(params, x, dead, aux_gradient="relu", encoder_dtype="float32"):
    """TopK + AuxK written densely, as the paper states it: the reference for the sparse path.
    ``aux_gradient="straight_through"``: AuxK's ReLU passes the gradient as the identity.
    ``encoder_dtype="bfloat16"``: the pre-activations take the bf16 matmul's values (inputs
    rounded to bf16, float32 sums) and the float32 formula's gradient."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    if encoder_dtype == "bfloat16":
        low = jnp.matmul(
            (x - params["b_dec"]).astype(jnp.bfloat16),
            params["W_enc"].astype(jnp.bfloat16),
            preferred_element_type=jnp.float32,
        )
        pre = pre + jax.lax.stop_gradient(low + params["b_enc"] - pre)
    rows = jnp.arange(x.shape[0])[:, None]

    def keep_top(scores, k, activation):
        values, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
        keep = jnp.zeros(scores.shape, bool).at[rows, idx].set(jnp.isfinite(values))
        return jnp.where(keep, activation, 0.0)

    x_hat = keep_top(pre, K, jax.nn.relu(pre)) @ params["W_dec"] + params["b_dec"]
    recon = jnp.sum((x_hat - x) ** 2) / x.shape[0]
    residual = jax.lax.stop_gradient(x - x_hat)
    aux_activation = jax.nn.relu(pre)
    if aux_gradient == "straight_through":
        aux_activation = pre + jax.lax.stop_gradient(aux_activation - pre)
    aux_hat = keep_top(jnp.where(dead, pre, -jnp.inf), K_AUX, aux_activation) @ params["W_dec"]
    centred = residual - residual.mean(0)
    aux_err = jnp.sum((aux_hat - residual) ** 2)
    # The loss adds the error in the reconstruction's units; the metric divides it by the
    # residual's variance.
    return recon, aux_err / x.shape[0], aux_err / jnp.sum(centred**2)


@pytest.mark.parametrize(
    ("mesh_shape", "chunk_tokens", "aux_gradient", "encoder_dtype"),
    [
        ((1, 1), 1024, "relu", "float32"),
        ((1, 1), 8, "relu", "float32"),
        ((2, 4), 8, "relu", "float32"),
        ((1, 1), 8, "straight_through", "float32"),
        ((2, 4), 8, "straight_through", "float32"),
        ((1, 1), 8, "straight_through", "bfloat16"),
        ((2, 4), 8, "relu", "bfloat16"),
    ],
)
def test_topk_loss_and_gradients_equal_the_dense_reference(
    monkeypatch: pytest.MonkeyPatch,
    mesh_shape: tuple[int, int],
    chunk_tokens: int,
    aux_gradient: str,
    encoder_dtype: str,
) -> None:
    monkeypatch.setattr(topk_module, "ENCODE_CHUNK_TOKENS", chunk_tokens)
    arch, params, x, dead = _params_and_batch(aux_gradient, encoder_dtype)
    data, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])
    program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 10, BATCH, mesh, norm_scale=1.0)
    state = program.init(jax.random.key(0), jnp.zeros(D_MODEL))
    sharded_params = jax.device_put(params, program.param_shardings)
    batch = program.global_batch_array(np.asarray(x))

    def sparse_loss(p):
        return program._loss(p, state.arch_state, dead, batch, 1.0, any_dead=True)

    (loss, (metrics, _, _)), grads = jax.jit(jax.value_and_grad(sparse_loss, has_aux=True))(
        sharded_params
    )

    def dense_loss(p, gradient=aux_gradient, dtype=encoder_dtype):
        recon, aux, aux_metric = _dense_topk_loss(p, x, dead, gradient, dtype)
        return recon + arch.config.aux_coef * aux, aux_metric

    (ref_loss, ref_aux), ref_grads = jax.jit(jax.value_and_grad(dense_loss, has_aux=True))(params)
    assert ref_aux > 0
    if encoder_dtype == "bfloat16":
        # The bf16 matmul really changes the loss (so the check cannot pass if it is ignored).
        float32_loss = jax.jit(lambda p: dense_loss(p, dtype="float32")[0])(params)
        assert abs(float32_loss - ref_loss) > 1e-4 * abs(ref_loss)
    if aux_gradient == "straight_through":
        # Some picked dead latents are below 0 here, so the two AuxK gradients really differ.
        relu_grads = jax.grad(lambda p: dense_loss(p, "relu")[0])(params)
        assert not np.allclose(relu_grads["W_enc"], ref_grads["W_enc"])
    np.testing.assert_allclose(metrics["aux_loss"], ref_aux, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    grads = unsharded_copy(grads)
    for key, ref_grad in ref_grads.items():
        scale = np.max(np.abs(ref_grad))
        assert scale > 0, key
        np.testing.assert_allclose(grads[key], ref_grad, rtol=0, atol=1e-5 * scale, err_msg=key)
