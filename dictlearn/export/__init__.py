"""Trained SAEs out to other tools, and anyone's SAE files back in.

- :func:`load_sae`: a run directory, a checkpoint, or an export in any of our three formats
  (SAELens, Gemma Scope ``params.npz``, native) as one :class:`InferenceSAE` (``encode``,
  ``decode``, ``features``) on raw activations.
- :func:`export_sae` (``dictlearn export``): a run's checkpoint written in one of those formats.

The formats are described in :mod:`dictlearn.export.formats`.
"""

from dictlearn.export.checkpoint import code_version, load_run_sae, locate_checkpoint
from dictlearn.export.exporter import ExportConfig, ExportResult, export_sae, main
from dictlearn.export.formats import FORMATS, ExportFormat, detect_format, read_export, write_export
from dictlearn.export.loading import load_sae
from dictlearn.export.model import ExportError, InferenceSAE

__all__ = [
    "FORMATS",
    "ExportConfig",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "InferenceSAE",
    "code_version",
    "detect_format",
    "export_sae",
    "load_run_sae",
    "load_sae",
    "locate_checkpoint",
    "main",
    "read_export",
    "write_export",
]
