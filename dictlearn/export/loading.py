"""``load_sae(URL)``: any SAE we can read, as one :class:`InferenceSAE`.

sae = load_sae("runs/topk-4096-s0")                  # a training run (newest checkpoint)
sae = load_sae("exports/topk-4096/saelens")           # an export, ours or SAELens's
sae = load_sae("gs://bucket/gemma-scope/params.npz")  # a Gemma Scope release file
latents = sae.encode(raw_activations)
"""

from __future__ import annotations

import posixpath

from dictlearn.data import storage
from dictlearn.export.checkpoint import CHECKPOINTS, load_run_sae
from dictlearn.export.formats import FORMATS, detect_format, read_export
from dictlearn.export.model import ExportError, InferenceSAE


def load_sae(url: str, fmt: str | None = None, step: int | None = None) -> InferenceSAE:
    """Load the SAE at ``url``: an export directory (saelens, gemmascope, native), a
    ``params.npz``, or a training run (run directory, ``checkpoints/`` or one step's directory).

    Args:
        url: local path or fsspec URL.
        fmt: force a format instead of detecting it (``saelens``, ``gemmascope``, ``native``).
        step: for a training run, the checkpoint step (default: the newest).

    Raises:
        ExportError: nothing loadable there, or the files are corrupt; the message names the
            file and the fix.
    """
    url = url.rstrip("/")
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"unknown SAE format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return read_export(url, fmt)
    detected = detect_format(url)
    if detected is not None:
        return read_export(url, detected)
    if _is_training_run(url):
        sae, _ = load_run_sae(url, step)
        return sae
    raise ExportError(
        f"{url} holds no SAE: expected an export (cfg.json + sae_weights.safetensors, "
        "params.npz, or sae.json + sae.safetensors) or a training run with checkpoints/"
    )


def _is_training_run(url: str) -> bool:
    fs, root = storage.filesystem(url)
    base = posixpath.basename(root)
    parent = posixpath.basename(posixpath.dirname(root))
    return (
        base == CHECKPOINTS
        or (base.isdigit() and parent == CHECKPOINTS)
        or fs.exists(storage.join(root, CHECKPOINTS))
    )
