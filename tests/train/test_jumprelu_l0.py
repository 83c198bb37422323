"""JumpReLU's ``init_l0``: thresholds set from the first batch's pre-activations, sharded."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.sae import JumpReLUConfig, get_architecture
from dictlearn.sae import jumprelu as jumprelu_module
from dictlearn.tracking import read_metrics
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram, unsharded_copy
from dictlearn.train.trainer import main, run_dir_of
from sharding import MeshConfig, make_mesh
from tests.train.helpers import assert_trees_equal, make_planted, tiny_config, with_overrides

D_MODEL, N_FEATURES, BATCH = 16, 256, 64
INIT_L0 = 16.0  # fires on 16 / 256 of the 64 tokens: 4 each
FIRES = 4


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4), (4, 2)])
def test_each_latent_fires_on_init_l0_over_n_features_of_the_first_batch(
    mesh_shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of 16 latents (64 rows x 16), so the sharded slices are cut into several.
    monkeypatch.setattr(jumprelu_module, "QUANTILE_CHUNK_ELEMENTS", BATCH * 16)
    cfg = JumpReLUConfig(n_features=N_FEATURES, init_l0=INIT_L0, decoder_init_norm=1.0)
    arch = get_architecture(cfg, D_MODEL)
    data, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, model=model), jax.devices()[: data * model])
    program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 10, BATCH, mesh, norm_scale=0.5)
    state = program.init(jax.random.key(0), jnp.full(D_MODEL, 0.3))
    # A latent no token reaches: its threshold stays at init_threshold, never below.
    state = state._replace(params=state.params | {"b_enc": state.params["b_enc"].at[7].set(-50.0)})
    batch = jax.random.normal(jax.random.key(1), (BATCH, D_MODEL)) + 1.0
    initialised = program.initialise_from_data(state, program.global_batch_array(batch))

    before = unsharded_copy(state.params)
    after = unsharded_copy(initialised.params)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_array_equal(after[name], before[name])
    p = {k: np.asarray(v, np.float64) for k, v in before.items()}
    pre = (np.asarray(batch, np.float64) * 0.5 - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    quantile = np.sort(pre, axis=0)[-(FIRES + 1)]  # the (FIRES + 1)-th largest per latent
    threshold = np.exp(np.asarray(after["log_threshold"], np.float64))
    # Never below init_threshold (a threshold is positive): where the quantile is, the latent
    # fires on its positive pre-activations only, fewer than FIRES tokens.
    np.testing.assert_allclose(
        threshold, np.maximum(quantile, cfg.init_threshold), rtol=1e-5, atol=1e-9
    )
    assert quantile[7] < 0 and (quantile > 0.01).sum() > N_FEATURES // 2
    # FIRES tokens above the threshold, the (FIRES + 1)-th at it (up to float32 rounding).
    set_by_data = quantile > cfg.init_threshold
    above = np.sum(pre > threshold * (1 + 1e-5) + 1e-6, axis=0)
    at_or_above = np.sum(pre >= threshold * (1 - 1e-5) - 1e-6, axis=0)
    np.testing.assert_array_equal(above[set_by_data], FIRES)
    np.testing.assert_array_equal(at_or_above[set_by_data], FIRES + 1)
    assert np.all(above[~set_by_data] <= FIRES)
    # The optimizer starts from the new parameters (Adam's moments: zeros of their shapes).
    assert_trees_equal(initialised.opt_state, program.optimizer.init(initialised.params))


def test_a_run_with_init_l0_starts_at_that_l0(tmp_path: Path) -> None:
    url = str(tmp_path / "data")
    make_planted(url)
    base = tiny_config(
        tmp_path,
        url,
        sae={"architecture": "jumprelu", "l0_coef": 0.01},
        mesh={"data": 4, "model": 2},
        train={"steps": 2, "log_every": 1},
        checkpoint={"every_steps": 2, "async_save": False},
    )
    from_data = with_overrides(base, "run.name=from-data", "sae.init_l0=8")
    main(base)
    main(from_data)

    def first_l0(config) -> float:
        return next(r["l0"] for r in read_metrics(run_dir_of(config)) if r.get("step") == 1)

    # 64 latents each firing on 8 of the first batch's 64 tokens: L0 8 on step 0's batch
    # (a latent may gain its (8 + 1)-th token back by one ulp of the step's own matmul).
    assert 8.0 <= first_l0(from_data) <= 9.0
    assert first_l0(base) > 16.0  # threshold 0.001 for every latent: about half fire


def test_the_l0_weight_follows_the_clipped_dual_update() -> None:
    cfg = JumpReLUConfig(
        n_features=N_FEATURES,
        decoder_init_norm=1.0,
        init_threshold=0.5,
        bandwidth=0.5,
        target_l0=30.0,
        l0_coef_rate=0.2,
        l0_coef=0.5,
    )
    mesh = make_mesh(MeshConfig(data=2, model=4), jax.devices()[:8])
    program = TrainProgram(
        get_architecture(cfg, D_MODEL), OptimizerConfig(lr=1e-2), 10, BATCH, mesh, 1.0
    )
    state = program.init(jax.random.key(0), jnp.zeros(D_MODEL))
    assert float(state.arch_state["l0_coef"]) == 0.5
    rng = np.random.default_rng(0)
    expected, seen_l0 = 0.5, []
    for _ in range(6):
        batch = rng.normal(size=(BATCH, D_MODEL)).astype(np.float32) * rng.uniform(0.2, 3.0)
        state, metrics = program.train_step(state, program.global_batch_array(batch))
        l0 = float(metrics["l0"])
        assert float(metrics["l0_coef"]) == pytest.approx(expected, rel=1e-6)  # the step's weight
        seen_l0.append(l0)
        expected *= np.exp(0.2 * np.clip(np.log(l0 / 30.0), -1.0, 1.0))
        assert float(state.arch_state["l0_coef"]) == pytest.approx(expected, rel=1e-5)
    # Batches of several scales: the L0s fall on both sides of the target, clipped and not.
    log_ratio = np.abs(np.log(np.asarray(seen_l0) / 30.0))
    assert min(seen_l0) < 30.0 < max(seen_l0)
    assert np.any(log_ratio > 1.0) and np.any(log_ratio < 1.0), seen_l0


def test_without_a_target_the_state_is_empty_and_the_weight_is_l0_coef() -> None:
    arch = get_architecture(JumpReLUConfig(n_features=N_FEATURES), D_MODEL)
    assert arch.state_axes() == {} and arch.init_state() == {}
