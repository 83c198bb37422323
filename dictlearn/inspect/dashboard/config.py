"""The root config of ``dictlearn dashboard``.

dictlearn dashboard runs/default/train-abc123 --out runs/dash --tokens 65536 first=200
"""

from __future__ import annotations

from pydantic import Field, model_validator

from dictlearn.activations.config import ModelConfig, RayConfig
from dictlearn.config import StrictModel
from dictlearn.corpus import PYTHON_DOCS, PYTHON_STDLIB, CorpusConfig


def _default_corpus() -> CorpusConfig:
    return CorpusConfig(paths=[PYTHON_DOCS, PYTHON_STDLIB], n_shards=8)


class DashboardConfig(StrictModel):
    """Build feature dashboards (a static site + Neuronpedia JSON) for an SAE over a corpus."""

    sae: str = Field(description="The SAE: a run directory, checkpoint or export (load_sae URL).")
    out: str = Field(description="Output directory of the site (index.html, features/, ...).")
    model: ModelConfig | None = Field(
        None, description="The LM; null: the one the SAE's metadata names (model_name)."
    )
    corpus: CorpusConfig = Field(
        default_factory=_default_corpus,
        description="The text (default: the built-in Python docs + stdlib corpus, 8 shards).",
    )
    tokens: int = Field(
        65_536,
        gt=0,
        description="LM tokens to run (contexts x context_length), split evenly over the shards.",
    )
    context_length: int = Field(128, ge=2, description="Tokens per packed context, BOS included.")
    batch_size: int = Field(8, gt=0, description="Contexts per forward pass.")
    top_n: int = Field(20, gt=0, description="Top-activating contexts kept per feature.")
    n_samples: int = Field(
        24, gt=0, description="Uniformly sampled firing contexts per feature (quantile bands)."
    )
    window: int = Field(
        12, ge=0, description="Tokens shown on each side of a context's maximum activation."
    )
    features: list[int] | None = Field(
        None, description="Feature ids to build pages for (null: see `first`, else all)."
    )
    first: int | None = Field(
        None, gt=0, description="Only the first N features (for big SAEs); not with `features`."
    )
    index: str | None = Field(
        None,
        description=(
            "A `dictlearn index` directory (Parquet: feature, rank, neighbor, cosine) to take "
            "neighbours from; null: exact decoder cosines computed here (small SAEs)."
        ),
    )
    neighbours: int = Field(5, ge=0, description="Nearest decoder neighbours listed per feature.")
    logit_tokens: int = Field(10, gt=0, description="Promoted / suppressed tokens per feature.")
    neuronpedia_model_id: str | None = Field(
        None, description="modelId in the Neuronpedia JSON (default: the SAE's model_name)."
    )
    neuronpedia_sae_id: str | None = Field(
        None, description="The SAE's Neuronpedia id ('layer' in its JSON; default: the hook)."
    )
    ray: RayConfig = Field(
        default_factory=RayConfig,
        description=(
            "Workers: num_workers 1 (the default) runs in this process without Ray; more "
            "start Ray actors (the LM workers of `dictlearn generate`), one corpus shard each "
            "at a time, whose per-feature buffers are merged here."
        ),
    )

    @model_validator(mode="after")
    def _one_selection(self) -> DashboardConfig:
        if self.features is not None and self.first is not None:
            raise ValueError("set at most one of features and first")
        if self.features is not None:
            if not self.features:
                raise ValueError("features: the list is empty")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features: an id is listed twice")
        return self
