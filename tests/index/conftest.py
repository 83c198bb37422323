"""Tiny SAEs written as real exports (``dictlearn.export.write_export``), for the index tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dictlearn.export import InferenceSAE, write_export


def make_sae(n_features: int, d_in: int, seed: int) -> InferenceSAE:
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((n_features, d_in)).astype(np.float32)
    w_enc = (w_dec.T + 0.3 * rng.standard_normal((d_in, n_features))).astype(np.float32)
    return InferenceSAE(
        "relu",
        W_enc=w_enc,
        b_enc=np.zeros(n_features, np.float32),
        W_dec=w_dec,
        b_dec=np.zeros(d_in, np.float32),
        metadata={"model_name": "test", "hook_name": "resid_post.0", "hook_layer": 0},
    )


def write_sae(path: Path, n_features: int, d_in: int, seed: int, fmt: str = "native") -> str:
    """Export a random SAE to ``path`` (a directory) and return its URL."""
    write_export(make_sae(n_features, d_in, seed), str(path), fmt)
    return str(path)
