"""A bf16 dataset's rows travel to the devices as bf16 and train exactly as float32 rows would."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.train.trainer import _stream, build_program, main, open_dataset
from tests.train.helpers import make_planted, tiny_config


def test_bf16_rows_train_exactly_as_their_float32_widening(tmp_path: Path) -> None:
    make_planted(tmp_path / "data", dtype="bfloat16")
    config = tiny_config(tmp_path, tmp_path / "data")
    dataset = open_dataset(config)
    program = build_program(config, dataset)
    with _stream(config, dataset, "train", position=0) as stream:
        rows = [next(stream) for _ in range(4)]
    assert all(r.dtype == jnp.bfloat16 for r in rows)  # the trainer's stream keeps bf16
    as_bf16 = [program.global_batch_array(r) for r in rows]
    as_f32 = [program.global_batch_array(r.astype(np.float32)) for r in rows]
    assert as_bf16[0].dtype == jnp.bfloat16 and as_f32[0].dtype == jnp.float32
    assert as_bf16[0].sharding == as_f32[0].sharding

    mean = jnp.asarray(dataset.mean)
    states = [program.init(jax.random.key(0), mean) for _ in range(2)]
    for batch_bf16, batch_f32 in zip(as_bf16, as_f32, strict=True):
        states[0], m_bf16 = program.train_step(states[0], batch_bf16)
        states[1], m_f32 = program.train_step(states[1], batch_f32)
        assert jax.device_get(m_bf16) == jax.device_get(m_f32)
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_equal(
        jax.device_get(program.eval_step(states[0], as_bf16[0])),
        jax.device_get(program.eval_step(states[0], as_f32[0])),
    )


def test_a_run_on_a_bf16_dataset_trains_and_evaluates(tmp_path: Path) -> None:
    make_planted(tmp_path / "data", dtype="bfloat16")
    config = tiny_config(
        tmp_path,
        tmp_path / "data",
        data={"path": str(tmp_path / "data"), "eval_fraction": 0.1},
        train={"batch_size": 64, "steps": 6, "log_every": 2, "eval_every": 3, "eval_batches": 2},
    )
    result = main(config)
    assert result.steps == 6
