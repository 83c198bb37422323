"""AuxK revives dead latents (planted dead, nothing but AuxK reaches them), in TopK and BatchTopK."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dictlearn.data import ActivationDataset, BatchStream
from dictlearn.sae import BatchTopKConfig, TopKConfig, get_architecture
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.step import TrainProgram
from sharding import MeshConfig, make_mesh
from tests.train.helpers import make_planted

D_MODEL, N_FEATURES, BATCH, STEPS = 16, 64, 128, 100


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url, d_model=D_MODEL)
    return url


def _dead_fraction_after_training(
    planted_url: str, architecture: str, aux_coef: float
) -> list[float]:
    """Train on planted rows with half the latents planted dead; the dead fraction every 20
    steps. The planted half has its encoder columns 50x weaker than the rest: they never win
    the top-k, so nothing but AuxK's loss ever gives them a gradient."""
    config_cls = {"topk": TopKConfig, "batchtopk": BatchTopKConfig}[architecture]
    config = config_cls(
        n_features=N_FEATURES, k=4, k_aux=32, aux_coef=aux_coef, dead_window_tokens=5 * BATCH
    )
    mesh = make_mesh(MeshConfig(data=1, model=2), jax.devices()[:2])
    program = TrainProgram(
        get_architecture(config, D_MODEL),
        OptimizerConfig(lr=3e-3, warmup_steps=0),
        STEPS,
        BATCH,
        mesh,
        norm_scale=1.0,
    )
    dataset = ActivationDataset.open(planted_url)
    state = program.init(jax.random.key(0), jnp.asarray(dataset.mean))
    weak = state.params["W_enc"].at[:, N_FEATURES // 2 :].multiply(0.02)
    state = state._replace(params=state.params | {"W_enc": weak})
    fractions = []
    with BatchStream(dataset, global_batch=BATCH, seed=0) as stream:
        for step in range(1, STEPS + 1):
            batch = program.global_batch_array(next(stream) * dataset.norm_scale)
            state, metrics = program.train_step(state, batch)
            if step % 20 == 0:
                fractions.append(float(metrics["dead_fraction"]))
    return fractions


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_auxk_revives_dead_latents(planted_url: str, architecture: str) -> None:
    without = _dead_fraction_after_training(planted_url, architecture, aux_coef=0.0)
    with_aux = _dead_fraction_after_training(planted_url, architecture, aux_coef=1 / 32)
    # Without AuxK the planted half stays dead (nothing else reaches it), a few more may die.
    assert all(f >= 0.45 for f in without), without
    # With it (1/32) they come back: measured 0.47 -> 0.23 (TopK), 0.48 -> 0.16 (BatchTopK)
    # by step 100.
    assert with_aux[0] >= 0.3, with_aux  # they did die first
    assert with_aux[-1] <= without[-1] - 0.15, (with_aux, without)
