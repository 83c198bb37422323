"""A stand-in for ``dictlearn.export.load_sae`` while that package is not on this branch.

``fake_sae_files`` writes tiny SAEs as ``.npz`` files and routes ``dictlearn.index.source``'s
loader to a reader of them, which, like ``load_sae``, raises a one-line ``ValueError`` for
anything it cannot read. Only the CLI glue goes through it; the index itself takes arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True)
class StandInSAE:
    """The fields of ``dictlearn.export.InferenceSAE`` that the index reads."""

    W_enc: np.ndarray
    W_dec: np.ndarray
    source: str
    digest: str
    d_in: int
    d_sae: int
    metadata: dict = field(default_factory=dict)


def read_stand_in(url: str) -> StandInSAE:
    path = Path(url)
    if path.suffix != ".npz" or not path.is_file():
        raise ValueError(f"{url}: unknown SAE format (not an export or run directory)")
    with np.load(path) as f:
        w_dec = f["W_dec"].astype(np.float32)
        w_enc = f["W_enc"].astype(np.float32)
    digest = hashlib.sha256(w_enc.tobytes() + w_dec.tobytes()).hexdigest()
    return StandInSAE(w_enc, w_dec, url, digest, w_dec.shape[1], w_dec.shape[0])


def write_stand_in(path: Path, n_features: int, d_in: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((n_features, d_in)).astype(np.float32)
    w_enc = (w_dec.T + 0.3 * rng.standard_normal((d_in, n_features))).astype(np.float32)
    np.savez(path, W_dec=w_dec, W_enc=w_enc)
    return str(path)


@pytest.fixture
def stand_in_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route ``dictlearn.index.source`` to the ``.npz`` stand-in reader."""
    monkeypatch.setattr("dictlearn.index.source._load_sae", read_stand_in)
