"""Planted-dictionary datasets and the recovery score."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from dictlearn.data import (
    ActivationDataset,
    PlantedConfig,
    load_planted_truth,
    recovery_score,
    write_planted_dataset,
)
from dictlearn.data import planted as planted_module

CFG = PlantedConfig(
    d_model=32, n_features=64, n_tokens=40_000, mean_active=4, seed=3, shard_tokens=16_384
)


def test_recovery_score() -> None:
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((50, 32))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    assert recovery_score(truth, truth) == pytest.approx(1.0, abs=1e-6)
    # Rescaled, shuffled, with extra and dead latents: still every feature found.
    decoder = np.concatenate([3.0 * truth[rng.permutation(50)], rng.standard_normal((30, 32))])
    decoder[-1] = 0.0
    assert recovery_score(decoder, truth) == pytest.approx(1.0, abs=1e-6)
    assert recovery_score(rng.standard_normal((200, 32)), truth) < 0.5
    assert recovery_score(-truth, truth) < 0.5  # opposite directions do not count
    # Half the features found exactly, the other half by random rows.
    half = recovery_score(np.concatenate([truth[:25], rng.standard_normal((25, 32))]), truth)
    assert 0.5 < half < 0.8
    with pytest.raises(ValueError, match="equal d"):
        recovery_score(truth[:, :16], truth)


def test_recovery_score_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    decoder, truth = rng.standard_normal((300, 16)), rng.standard_normal((100, 16))
    whole = recovery_score(decoder, truth)
    monkeypatch.setattr(planted_module, "_SCORE_BLOCK_ENTRIES", 700)  # blocks of 2 features
    assert recovery_score(decoder, truth) == pytest.approx(whole, abs=1e-7)


def test_planted_dataset(tmp_path: Path) -> None:
    url = str(tmp_path / "p")
    truth = write_planted_dataset(url, CFG)
    ds = ActivationDataset.open(url)
    ds.validate(deep=True)
    assert (ds.n_tokens, ds.d_model, ds.num_shards) == (40_000, 32, 3)
    assert (ds.manifest.source_model, ds.manifest.hook) == ("planted", "planted")
    assert truth.directions.shape == (64, 32)
    np.testing.assert_allclose(np.linalg.norm(truth.directions, axis=1), 1.0, rtol=1e-6)
    assert np.linalg.norm(truth.offset) == pytest.approx(CFG.offset_scale, rel=1e-6)
    assert truth.frequencies.sum() == pytest.approx(CFG.mean_active)
    assert truth.frequencies[0] > truth.frequencies[-1]  # Zipf-ish

    loaded = load_planted_truth(url)
    np.testing.assert_array_equal(loaded.directions, truth.directions)
    np.testing.assert_array_equal(loaded.offset, truth.offset)
    np.testing.assert_array_equal(loaded.frequencies, truth.frequencies)

    # The data follows the model: E[x] = offset + sum_i p_i E[a] d_i (lognormal E[a] = e^{s^2/2}).
    mean_magnitude = math.exp(planted_module._LOGNORMAL_SIGMA**2 / 2)
    expected_mean = truth.offset + mean_magnitude * truth.frequencies @ truth.directions
    np.testing.assert_allclose(ds.mean, expected_mean, atol=0.03)


def test_rows_follow_the_planted_model(tmp_path: Path) -> None:
    """With fewer features than dimensions, least squares recovers each row's coefficients."""
    cfg = PlantedConfig(
        d_model=48, n_features=16, n_tokens=20_000, mean_active=3, noise_std=0.05, seed=1
    )
    truth = write_planted_dataset(str(tmp_path), cfg)
    rows = ActivationDataset.open(str(tmp_path)).read_rows(0, 0, 20_000)
    coefficients, *_ = np.linalg.lstsq(truth.directions.T, (rows - truth.offset).T, rcond=None)
    active = coefficients.T > 0.2  # noise on a coefficient has std ~0.05 * 0.5 here
    np.testing.assert_allclose(active.mean(0), truth.frequencies, atol=0.02)
    assert active.sum(1).mean() == pytest.approx(cfg.mean_active, rel=0.05)
    assert coefficients.min() > -0.15  # magnitudes are non-negative, up to noise
    residual = rows - truth.offset - coefficients.T @ truth.directions
    signal_rms = math.sqrt(cfg.mean_active * math.exp(2 * planted_module._LOGNORMAL_SIGMA**2) / 48)
    # Least squares removes 16 of 48 noise dimensions from the residual.
    expected = cfg.noise_std * signal_rms * math.sqrt(32 / 48)
    assert residual.std() == pytest.approx(expected, rel=0.05)


def test_planted_is_deterministic_and_skips_finished_work(tmp_path: Path) -> None:
    write_planted_dataset(str(tmp_path / "a"), CFG)
    write_planted_dataset(str(tmp_path / "b"), CFG)
    for name in ("shard-00000.bin", "shard-00002.bin"):
        assert (tmp_path / "a" / "shards" / name).read_bytes() == (
            tmp_path / "b" / "shards" / name
        ).read_bytes()
    shard = tmp_path / "a" / "shards" / "shard-00001.bin"
    before = shard.stat().st_mtime_ns
    write_planted_dataset(str(tmp_path / "a"), CFG)
    assert shard.stat().st_mtime_ns == before
    # A different config at the same URL is regenerated.
    write_planted_dataset(str(tmp_path / "a"), CFG.model_copy(update={"seed": 4}))
    assert load_planted_truth(str(tmp_path / "a")).directions[0] @ np.ones(32) != pytest.approx(
        load_planted_truth(str(tmp_path / "b")).directions[0] @ np.ones(32)
    )


def test_bfloat16_and_uniform_frequencies(tmp_path: Path) -> None:
    cfg = CFG.model_copy(
        update={"dtype": "bfloat16", "frequency_exponent": 0.0, "heavy_tail": False}
    )
    truth = write_planted_dataset(str(tmp_path), cfg)
    assert ActivationDataset.open(str(tmp_path)).manifest.dtype == "bfloat16"
    np.testing.assert_allclose(truth.frequencies, cfg.mean_active / cfg.n_features)


def test_impossible_frequencies_rejected() -> None:
    with pytest.raises(ValidationError, match=r"probability .* >= 1"):
        PlantedConfig(d_model=8, n_features=10, n_tokens=100, mean_active=8)
    with pytest.raises(ValidationError, match="extra"):
        PlantedConfig(d_model=8, n_features=10, n_tokens=100, mean_active=1, typo=1)
