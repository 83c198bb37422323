"""The directions an index compares, taken from an SAE (the one place that calls ``load_sae``).

Everything else in ``dictlearn.index`` works on plain arrays; this module turns an SAE URL (an
export or a run directory, whatever ``dictlearn.export.load_sae`` reads) into the unit rows of
its decoder (``W_dec``, ``[d_sae, d_in]``) or encoder (``W_enc.T``) plus what identifies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from dictlearn.index.exact import normalize_rows

if TYPE_CHECKING:
    from dictlearn.export import InferenceSAE

Metric = Literal["decoder", "encoder"]


@dataclass(frozen=True)
class Directions:
    """One SAE's feature directions as unit rows.

    Attributes:
        vectors: ``[n_features, d_in]`` float32 unit rows.
        source: the URL they were read from.
        digest: sha256 of the SAE's weights (identifies it whatever the URL).
        metric: ``decoder`` (rows of ``W_dec``) or ``encoder`` (columns of ``W_enc``).
    """

    vectors: np.ndarray
    source: str
    digest: str
    metric: Metric

    @property
    def n_features(self) -> int:
        return self.vectors.shape[0]

    @property
    def d_in(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def from_weights(
        cls, weights: np.ndarray, source: str, digest: str, metric: Metric = "decoder"
    ) -> Directions:
        """From ``[n_features, d_in]`` rows (``W_dec``, or ``W_enc.T``); normalised here."""
        return cls(normalize_rows(weights), source, digest, metric)


def _load_sae(url: str) -> InferenceSAE:
    """``dictlearn.export.load_sae`` (imported late: it pulls in the export formats)."""
    from dictlearn.export import load_sae

    return load_sae(url)


def load_directions(url: str, metric: Metric = "decoder") -> Directions:
    """The unit feature directions of the SAE at ``url``.

    Raises:
        ExportError: ``url`` is no SAE dictlearn can read (a ValueError naming it).
    """
    sae = _load_sae(url)
    weights = sae.W_dec if metric == "decoder" else np.asarray(sae.W_enc).T
    return Directions.from_weights(np.asarray(weights), sae.source, sae.digest, metric)
