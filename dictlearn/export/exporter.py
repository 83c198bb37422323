"""``dictlearn export``: a training run's checkpoint as files other tools load.

    dictlearn export runs/topk-4096-s0 --format saelens --out exports/topk-4096-saelens

``main(config) -> ExportResult`` is the entry point. The export is a pure function of (checkpoint,
format): exporting the same checkpoint again writes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from dictlearn.config import StrictModel
from dictlearn.export.checkpoint import load_run_sae
from dictlearn.export.formats import ExportFormat, write_export
from dictlearn.export.model import InferenceSAE


class ExportConfig(StrictModel):
    """What to export, how, and where."""

    source: str = Field(description="Run directory, its checkpoints/ directory, or one step's.")
    format: ExportFormat = Field(description="saelens, gemmascope or native.")
    out: str = Field(description="Output directory (local path or gs:// URL).")
    step: int | None = Field(None, ge=0, description="Checkpoint step (default: the newest).")
    dataset: str | None = Field(
        None,
        description="The run's activation dataset (default: its data.path); its manifest holds "
        "the input normalisation folded into the weights, the hook and the source model.",
    )
    density_tokens: int = Field(
        65_536,
        ge=0,
        description="Rows of the dataset (its first, in order) over which each latent's firing "
        "frequency is counted for sparsity.safetensors / log_feature_density (0: skip).",
    )


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it holds."""

    out: str
    format: str
    files: list[str]
    sae: InferenceSAE
    step: int


def export_sae(config: ExportConfig) -> ExportResult:
    """Restore the run's checkpoint, fold the normalisation, and write the export."""
    sae, provenance = load_run_sae(
        config.source, config.step, config.dataset, density_tokens=config.density_tokens
    )
    files = write_export(sae, config.out, config.format, provenance)
    return ExportResult(
        out=config.out,
        format=config.format,
        files=files,
        sae=sae,
        step=provenance["checkpoint_step"],
    )


main = export_sae
