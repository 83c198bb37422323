"""The sharded train step equals the single-device one (the reference) for every architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dictlearn.sae.topk_select as topk_select
from dictlearn.sae import (
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUL1Config,
    TopKConfig,
    get_architecture,
)
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram, unsharded_copy
from sharding import MeshConfig, make_mesh

D_MODEL, N_FEATURES, BATCH = 16, 64, 32

CONFIGS = {
    "topk": TopKConfig(n_features=N_FEATURES, k=4, k_aux=8, dead_window_tokens=BATCH),
    "batchtopk": BatchTopKConfig(n_features=N_FEATURES, k=4, k_aux=8, dead_window_tokens=BATCH),
    # Unit decoder rows (not JumpReLU's default 0.1): pre-activations reach the 0.5 threshold.
    "jumprelu": JumpReLUConfig(
        n_features=N_FEATURES, init_threshold=0.5, bandwidth=0.5, decoder_init_norm=1.0
    ),
    # The L0 penalty's weight steered towards a target: arch state updated from the step's L0.
    "jumprelu_steered": JumpReLUConfig(
        n_features=N_FEATURES,
        init_threshold=0.5,
        bandwidth=0.5,
        decoder_init_norm=1.0,
        target_l0=4.0,
        l0_coef_rate=0.3,
    ),
    "relu_l1": ReLUL1Config(n_features=N_FEATURES),
    "topk_bf16": TopKConfig(
        n_features=N_FEATURES, k=4, k_aux=8, dead_window_tokens=BATCH, encoder_dtype="bfloat16"
    ),
    "jumprelu_bf16": JumpReLUConfig(
        n_features=N_FEATURES,
        init_threshold=0.5,
        bandwidth=0.5,
        decoder_init_norm=1.0,
        encoder_dtype="bfloat16",
    ),
}
MESHES = {"1x1": (MeshConfig(data=1, model=1), 1), "2x4": (MeshConfig(data=2, model=4), 8)}


def _program(name: str, mesh_name: str) -> TrainProgram:
    mesh_config, n_devices = MESHES[mesh_name]
    mesh = make_mesh(mesh_config, jax.devices()[:n_devices])
    arch = get_architecture(CONFIGS[name], D_MODEL)
    return TrainProgram(
        arch, OptimizerConfig(lr=4e-4, warmup_steps=0), 10, BATCH, mesh, norm_scale=0.7
    )


def _batch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, D_MODEL)).astype(np.float32)


def _loss_and_grads(
    program: TrainProgram, dead: np.ndarray, any_dead: bool, few_dead: bool = False
):
    state = program.init(jax.random.key(0), jnp.asarray(_batch(0).mean(0)))
    x = program.global_batch_array(_batch(1) * program.norm_scale)

    @jax.jit
    def run(params):
        def loss(p):
            return program._loss(
                p,
                state.arch_state,
                jnp.asarray(dead),
                x,
                1.0,
                any_dead,
                few_dead=few_dead,
            )

        return jax.value_and_grad(loss, has_aux=True)(params)

    (loss, (metrics, fire_counts, _)), grads = run(state.params)
    return unsharded_copy((loss, metrics, fire_counts, grads))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_metrics_and_gradients_match_single_device(name: str) -> None:
    dead = np.zeros(N_FEATURES, bool)
    dead[::5] = True  # exercises AuxK for topk and batchtopk
    with_auxk = name.startswith(("topk", "batchtopk"))
    any_dead = with_auxk
    ref = _loss_and_grads(_program(name, "1x1"), dead, any_dead)
    sharded = _loss_and_grads(_program(name, "2x4"), dead, any_dead)
    for key, ref_grad in ref[3].items():
        assert np.max(np.abs(ref_grad)) > 0, f"gradient of {key} is identically zero"
    # Sharded sums add the same terms in another order: equal up to float32 rounding.
    _assert_same_loss_and_grads(sharded, ref)
    if with_auxk:
        assert ref[1]["aux_loss"] > 0


def _assert_same_loss_and_grads(result, reference) -> None:
    """``_loss_and_grads`` results equal up to float32 rounding; firing counts exactly."""
    (ref_loss, ref_metrics, ref_fire, ref_grads), (loss, metrics, fire, grads) = reference, result
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(fire, ref_fire)
    for key, ref_grad in ref_grads.items():
        scale = np.max(np.abs(ref_grad))
        np.testing.assert_allclose(grads[key], ref_grad, rtol=0, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("name", ["topk", "jumprelu", "batchtopk", "relu_l1"])
def test_bfloat16_encoder_matmul_is_what_the_step_runs(name: str) -> None:
    """``encoder_dtype: bfloat16`` puts a bf16 x bf16 -> f32 matmul of the encoder's shape into
    the step (the float32 default has none), and changes the loss only by bf16 rounding."""
    config = CONFIGS[name]
    results = {}
    for dtype in ("float32", "bfloat16"):
        mesh = make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1])
        arch = get_architecture(config.model_copy(update={"encoder_dtype": dtype}), D_MODEL)
        program = TrainProgram(arch, OptimizerConfig(lr=4e-4), 10, BATCH, mesh, norm_scale=0.7)
        text = (
            program.step_fn(any_dead=False)
            .lower(program.abstract_state(), program.abstract_batch())
            .as_text()
        )
        bf16_dots = [
            line
            for line in text.splitlines()
            if "dot_general" in line and f"tensor<{D_MODEL}x{N_FEATURES}xbf16>" in line
        ]
        assert bool(bf16_dots) == (dtype == "bfloat16"), bf16_dots
        results[dtype] = _loss_and_grads(program, np.zeros(N_FEATURES, bool), any_dead=False)
    loss32, loss16 = results["float32"][0], results["bfloat16"][0]
    assert loss16 != loss32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


@pytest.mark.parametrize("gathered_max", [None, 1])  # 1: the threshold-search merge
def test_topk_with_k_and_k_aux_above_a_shard_matches_single_device(
    monkeypatch: pytest.MonkeyPatch, gathered_max: int | None
) -> None:
    """k 20 and k_aux 24 over 4 shards of 16 latents, 40 of them dead (two whole shards): the
    sharded loss picks the same k_aux dead latents per token as the single-device one."""
    if gathered_max is not None:
        monkeypatch.setattr(topk_select, "GATHERED_CANDIDATES_MAX", gathered_max)
    dead = np.zeros(N_FEATURES, bool)
    dead[:40] = True
    config = TopKConfig(n_features=N_FEATURES, k=20, k_aux=24)
    results = []
    for mesh_name in MESHES:
        mesh_config, n_devices = MESHES[mesh_name]
        program = TrainProgram(
            get_architecture(config, D_MODEL),
            OptimizerConfig(lr=4e-4, warmup_steps=0),
            10,
            BATCH,
            make_mesh(mesh_config, jax.devices()[:n_devices]),
            norm_scale=0.7,
        )
        results.append(_loss_and_grads(program, dead, any_dead=True))
    (ref_loss, ref_metrics, ref_fire, ref_grads), (loss, metrics, fire, grads) = results
    assert ref_metrics["aux_loss"] > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for key in ("aux_loss", "l0", "fvu"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(fire, ref_fire)
    for key, ref_grad in ref_grads.items():
        scale = np.max(np.abs(ref_grad))
        np.testing.assert_allclose(grads[key], ref_grad, rtol=0, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("name", ["topk", "jumprelu", "jumprelu_steered", "relu_l1"])
def test_three_train_steps_match_single_device(name: str) -> None:
    """Whole steps (Adam, decoder projection, dead-latent counters, AuxK switching on).

    BatchTopK is left to the gradient test above: one of its latents gets a first gradient
    near Adam's eps, and Adam's first update lr*g/(|g|+eps) turns float32 rounding in that
    gradient into a ~1e-5 parameter difference, which says nothing about the sharding.
    """
    finals = []
    for mesh_name in MESHES:
        program = _program(name, mesh_name)
        state = program.init(jax.random.key(0), jnp.asarray(_batch(0).mean(0)))
        for step in range(3):
            state, metrics = program.train_step(state, program.global_batch_array(_batch(step)))
        finals.append((unsharded_copy(state), unsharded_copy(metrics)))
    (ref_state, ref_metrics), (state, metrics) = finals
    for key in ref_state.params:
        np.testing.assert_allclose(
            state.params[key], ref_state.params[key], rtol=0, atol=1e-6, err_msg=key
        )
    np.testing.assert_array_equal(state.tokens_since_fired, ref_state.tokens_since_fired)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    assert state.arch_state.keys() == ref_state.arch_state.keys()
    for key in ref_state.arch_state:
        np.testing.assert_allclose(
            state.arch_state[key], ref_state.arch_state[key], rtol=1e-6, err_msg=key
        )
    if name == "jumprelu_steered":  # the L0 (14-16 of 64) is above 4: the weight rose
        assert ref_state.arch_state["l0_coef"] > CONFIGS[name].l0_coef
    if name == "topk":
        assert ref_metrics["dead_fraction"] > 0 and ref_metrics["aux_loss"] > 0


def test_params_are_sharded_on_the_feature_axis() -> None:
    program = _program("topk", "2x4")
    state = program.init(jax.random.key(0), jnp.zeros(D_MODEL))
    w_enc, w_dec = state.params["W_enc"], state.params["W_dec"]
    assert w_enc.sharding.shard_shape(w_enc.shape) == (D_MODEL, N_FEATURES // 4)
    assert w_dec.sharding.shard_shape(w_dec.shape) == (N_FEATURES // 4, D_MODEL)
    mu = state.opt_state[1][0].mu["W_dec"]
    assert mu.sharding.shard_shape(mu.shape) == (N_FEATURES // 4, D_MODEL)


def _all_reduced_shapes(program: TrainProgram) -> list[str]:
    hlo = (
        program.step_fn(any_dead=False)
        .lower(program.abstract_state(), program.abstract_batch())
        .compile()
        .as_text()
    )
    # "%name = <result shapes> all-reduce(...": the result shapes of every all-reduce.
    return [
        line.split(" = ", 1)[1].split(" all-reduce(", 1)[0]
        for line in hlo.splitlines()
        if " all-reduce(" in line
    ]


@pytest.mark.parametrize("mesh_name", ["1x1", "1x4", "2x4"])
def test_parameter_gradients_are_all_reduced_only_across_data_replicas(mesh_name: str) -> None:
    """With one data replica there is nothing to sum: no all-reduce of a W_enc/W_dec gradient.

    XLA:CPU keeps a one-participant all-reduce as a full copy; the 2x4 case shows the check
    sees the real one.
    """
    mesh_configs = {**MESHES, "1x4": (MeshConfig(data=1, model=4), 4)}
    mesh_config, n_devices = mesh_configs[mesh_name]
    program = TrainProgram(
        get_architecture(CONFIGS["topk"], D_MODEL),
        OptimizerConfig(lr=4e-4),
        10,
        BATCH,
        make_mesh(mesh_config, jax.devices()[:n_devices]),
        norm_scale=1.0,
    )
    n_local = N_FEATURES // mesh_config.model
    weight_shapes = {f"f32[{D_MODEL},{n_local}]", f"f32[{n_local},{D_MODEL}]"}
    reduced = " ".join(_all_reduced_shapes(program))
    weights_reduced = any(shape in reduced for shape in weight_shapes)
    assert weights_reduced == (mesh_config.data > 1), reduced


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("n_dead", [3, 20, 32])
@pytest.mark.parametrize("name", ["topk", "batchtopk", "topk_bf16"])
def test_compact_auxk_equals_the_sparse_variant(name: str, n_dead: int, mesh_name: str) -> None:
    """With few dead latents AuxK runs as dense matmuls over them: the same loss, metrics and
    gradients as the per-token sparse variant, with fewer dead latents than ``k_aux`` (8), more,
    and as many as the compact variant holds (32 = 4 x k_aux)."""
    program = _program(name, mesh_name)
    assert program.arch.dense_dead_capacity == 32
    dead = np.zeros(N_FEATURES, bool)
    dead[np.random.default_rng(n_dead).permutation(N_FEATURES)[:n_dead]] = True
    sparse = _loss_and_grads(program, dead, any_dead=True)
    compact = _loss_and_grads(program, dead, any_dead=True, few_dead=True)
    assert sparse[1]["aux_loss"] > 0
    _assert_same_loss_and_grads(compact, sparse)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_train_step_switches_to_compact_auxk_with_the_same_result(mesh_name: str) -> None:
    """The trainer's step (its variant picked on the device) with 20 dead latents, within the
    compact variant's 32, gives the state of the step compiled with the sparse variant."""
    program = _program("topk", mesh_name)
    dead = np.zeros(N_FEATURES, bool)
    dead[np.random.default_rng(3).permutation(N_FEATURES)[:20]] = True
    finals = []
    for step in (program.step_fn(), program.step_fn(any_dead=True)):
        state = program.init(jax.random.key(0), jnp.asarray(_batch(0).mean(0)))
        since = np.where(dead, program.dead_window, 0).astype(np.int32)
        state = state._replace(
            tokens_since_fired=jax.device_put(since, state.tokens_since_fired.sharding)
        )
        state, metrics = step(state, program.global_batch_array(_batch(1)))
        finals.append((unsharded_copy(state), unsharded_copy(metrics)))
    (ref_state, ref_metrics), (state, metrics) = finals
    assert ref_metrics["aux_loss"] > 0
    for key in ("loss", "aux_loss", "fvu"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    for key in ref_state.params:
        np.testing.assert_allclose(
            state.params[key], ref_state.params[key], rtol=0, atol=1e-6, err_msg=key
        )
    np.testing.assert_array_equal(state.tokens_since_fired, ref_state.tokens_since_fired)
