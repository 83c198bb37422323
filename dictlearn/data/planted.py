"""Synthetic activation datasets with a known ("planted") sparse dictionary.

Every row is ``offset + sum_i a_i * d_i + noise``: a few of ``n_features`` unit-norm random
directions ``d_i``, with non-negative (optionally heavy-tailed) magnitudes ``a_i``, plus a
constant offset and Gaussian noise. An SAE trained on it should find the ``d_i`` as decoder
rows; :func:`recovery_score` measures how well it did. This is how training is tested end to
end without a language model.

    truth = write_planted_dataset("gs://b/planted", PlantedConfig(d_model=64, n_features=256,
                                                                  n_tokens=500_000, seed=0))
    ...train...
    recovery_score(W_dec, truth.directions)  # 1.0 = every planted feature found
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dictlearn.data import storage
from dictlearn.data.dataset import ActivationDataset
from dictlearn.data.format import (
    MANIFEST_NAME,
    DatasetError,
    DType,
    commit_manifest,
    write_shard,
)

TRUTH_NAME = "truth.npy"
_LOGNORMAL_SIGMA = 0.75
# Entries of a [rows, n_latents] cosine block in recovery_score: ~64 MiB of float32.
_SCORE_BLOCK_ENTRIES = 1 << 24


class PlantedConfig(BaseModel):
    """How to generate a planted-dictionary dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = Field(gt=0, description="Row width.")
    n_features: int = Field(gt=0, description="Number of planted directions.")
    n_tokens: int = Field(gt=0, description="Total rows.")
    mean_active: float = Field(gt=0, description="Average number of features active per row.")
    noise_std: float = Field(
        default=0.01,
        ge=0,
        description="Gaussian noise std per coordinate, relative to the signal's RMS coordinate.",
    )
    offset_scale: float = Field(
        default=1.0, ge=0, description="Norm of the constant offset vector added to every row."
    )
    frequency_exponent: float = Field(
        default=0.5,
        ge=0,
        description="Zipf exponent of feature frequencies: feature i fires with probability "
        "proportional to (i + 1) ** -exponent; 0 makes all features equally frequent.",
    )
    heavy_tail: bool = Field(
        default=True,
        description=f"Magnitudes lognormal(0, {_LOGNORMAL_SIGMA}) if true, else uniform(0.5, 1.5).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of directions, offset and every shard.")
    shard_tokens: int = Field(default=65536, gt=0, description="Rows per shard (last may be less).")
    dtype: DType = Field(default="float32", description="Storage dtype.")

    @model_validator(mode="after")
    def _check_frequencies(self) -> PlantedConfig:
        top = _frequencies(self)[0]
        if top >= 1.0:
            raise ValueError(
                f"mean_active {self.mean_active} needs the most frequent feature to fire with "
                f"probability {top:.2f} >= 1; lower mean_active or frequency_exponent, or add "
                "features"
            )
        return self


@dataclass(frozen=True)
class PlantedTruth:
    """The ground truth of a planted dataset."""

    directions: np.ndarray
    """``[n_features, d_model]`` float32 unit-norm planted directions."""
    offset: np.ndarray
    """``[d_model]`` float32 offset added to every row."""
    frequencies: np.ndarray
    """``[n_features]`` float64 probability that each feature fires in a row."""


def _frequencies(cfg: PlantedConfig) -> np.ndarray:
    weights = np.arange(1, cfg.n_features + 1, dtype=np.float64) ** -cfg.frequency_exponent
    return cfg.mean_active * weights / weights.sum()


def _truth(cfg: PlantedConfig) -> PlantedTruth:
    directions = np.random.default_rng([cfg.seed, 1]).standard_normal((cfg.n_features, cfg.d_model))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    offset = np.random.default_rng([cfg.seed, 2]).standard_normal(cfg.d_model)
    offset *= cfg.offset_scale / np.linalg.norm(offset)
    return PlantedTruth(directions.astype(np.float32), offset.astype(np.float32), _frequencies(cfg))


# Random streams of the rows: a dataset's shards draw from _SHARD_STREAM, held-out rows from
# _HELDOUT_STREAM, so no held-out row is ever a training row, whatever the dataset's length.
_SHARD_STREAM = 3
_HELDOUT_STREAM = 4


def _generate_shard(
    cfg: PlantedConfig, truth: PlantedTruth, index: int, n: int, stream: int = _SHARD_STREAM
) -> np.ndarray:
    """Rows of shard ``index``: a pure function of (cfg, index), so shards can be made anywhere."""
    rng = np.random.default_rng([cfg.seed, stream, index])
    # Each (row, feature) must fire independently with probability p. Drawing an [n, F]
    # Bernoulli matrix costs O(n F); instead throw Poisson(n * rate) hits per feature at uniform
    # random rows and keep the rows hit at least once. By Poisson splitting each row is then hit
    # independently with probability 1 - exp(-rate), which is p for rate = -log(1 - p): exact,
    # and O(active entries).
    counts = rng.poisson(n * -np.log1p(-truth.frequencies))
    features = np.repeat(np.arange(cfg.n_features), counts)
    rows = rng.integers(0, n, features.size)
    coefficients = scipy.sparse.csr_matrix(
        (np.ones(features.size, np.float32), (rows, features)), shape=(n, cfg.n_features)
    )
    coefficients.sum_duplicates()  # a row hit twice by one feature fires once
    if cfg.heavy_tail:
        magnitudes = rng.lognormal(0.0, _LOGNORMAL_SIGMA, coefficients.nnz)
        mean_sq_magnitude = math.exp(2 * _LOGNORMAL_SIGMA**2)
    else:
        magnitudes = rng.uniform(0.5, 1.5, coefficients.nnz)
        mean_sq_magnitude = 1.0 + 1.0 / 12.0
    coefficients.data = magnitudes.astype(np.float32)
    x = np.asarray(coefficients @ truth.directions, dtype=np.float32)
    x += truth.offset
    # Expected signal power per coordinate, from the config rather than this shard's sample,
    # so every shard gets the same noise level.
    signal_rms = math.sqrt(cfg.mean_active * mean_sq_magnitude / cfg.d_model)
    noise = rng.standard_normal((n, cfg.d_model), dtype=np.float32)
    x += noise * np.float32(cfg.noise_std * signal_rms)
    return x


def write_planted_dataset(url: str, cfg: PlantedConfig) -> PlantedTruth:
    """Generate and commit a planted dataset at ``url``, plus ``truth.npy``.

    Idempotent: if ``url`` already holds a committed dataset made from the same config, nothing
    is rewritten.

    Returns:
        The planted truth.
    """
    truth = _truth(cfg)
    fs, root = storage.filesystem(url)
    if storage.read_bytes_or_none(fs, storage.join(root, MANIFEST_NAME)) is not None:
        existing = ActivationDataset.open(url).manifest.metadata.get("planted")
        if existing == cfg.model_dump(mode="json"):
            return truth
    infos = []
    for index, start in enumerate(range(0, cfg.n_tokens, cfg.shard_tokens)):
        n = min(cfg.shard_tokens, cfg.n_tokens - start)
        infos.append(write_shard(url, index, _generate_shard(cfg, truth, index, n), cfg.dtype))
    buffer = io.BytesIO()
    np.save(buffer, truth.directions)
    storage.write_bytes_atomic(fs, storage.join(root, TRUTH_NAME), buffer.getvalue())
    commit_manifest(
        url,
        infos,
        source_model="planted",
        hook="planted",
        layer=None,
        metadata={"planted": cfg.model_dump(mode="json"), "offset": truth.offset.tolist()},
    )
    return truth


def heldout_rows(cfg: PlantedConfig, n: int) -> np.ndarray:
    """``n`` fresh rows of ``cfg``'s distribution that no dataset written from ``cfg`` contains.

    Same directions, offset, frequencies and noise as the dataset's shards, from a random stream
    of their own: evaluation rows an SAE trained on the dataset has never seen.
    """
    return _generate_shard(cfg, _truth(cfg), 0, n, stream=_HELDOUT_STREAM)


def load_planted_truth(url: str) -> PlantedTruth:
    """Load the truth of the planted dataset at ``url``.

    Raises:
        DatasetError: ``url`` is not a committed planted dataset.
    """
    dataset = ActivationDataset.open(url)
    planted = dataset.manifest.metadata.get("planted")
    if planted is None:
        raise DatasetError(f"{url}: not a planted dataset (no 'planted' in manifest metadata)")
    cfg = PlantedConfig.model_validate(planted)
    fs, root = storage.filesystem(url)
    raw = storage.read_bytes_or_none(fs, storage.join(root, TRUTH_NAME))
    if raw is None:
        raise DatasetError(f"{url}/{TRUTH_NAME}: missing; regenerate the planted dataset")
    directions = np.load(io.BytesIO(raw))
    offset = np.asarray(dataset.manifest.metadata["offset"], np.float32)
    return PlantedTruth(directions, offset, _frequencies(cfg))


def recovery_score(decoder_rows: np.ndarray, true_directions: np.ndarray) -> float:
    """Mean over true features of the best cosine similarity with any decoder row.

    Signed cosine: a decoder row pointing opposite to a feature does not recover it (SAE
    latents are non-negative). Computed in blocks of true features, so memory stays bounded
    for millions of latents.

    Args:
        decoder_rows: ``[n_latents, d_model]`` (e.g. ``W_dec``); need not be normalised.
        true_directions: ``[n_true, d_model]``.

    Returns:
        A score in [-1, 1]; 1.0 means every true direction is some decoder row.
    """
    decoder = np.asarray(decoder_rows, np.float32)
    truth = np.asarray(true_directions, np.float32)
    if decoder.ndim != 2 or truth.ndim != 2 or decoder.shape[1] != truth.shape[1]:
        raise ValueError(
            f"need [n, d] arrays of equal d, got decoder {decoder.shape}, truth {truth.shape}"
        )
    # Zero rows (dead latents) stay zero and score 0 rather than NaN.
    decoder = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    truth = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12)
    block = max(1, _SCORE_BLOCK_ENTRIES // max(1, decoder.shape[0]))
    best = np.concatenate(
        [(truth[i : i + block] @ decoder.T).max(axis=1) for i in range(0, truth.shape[0], block)]
    )
    return float(best.mean())
