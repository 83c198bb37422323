"""The three on-disk SAE formats: writing them byte-reproducibly, reading them (ours or anyone's).

- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``), the
  layout SAELens's ``SAE.load_from_disk`` reads (and Neuronpedia and SAEBench through it).
  Architectures: ``topk``, ``jumprelu``, ``standard`` (ReLU).
- ``gemmascope``: ``params.npz`` with ``W_enc, W_dec, b_enc, b_dec, threshold``, Gemma Scope's
  release layout. A JumpReLU whose encoder does NOT subtract ``b_dec`` (Gemma Scope's
  convention), so ``b_enc`` is shifted by ``b_dec @ W_enc`` on the way in and out. TopK has no
  form there; ReLU is a JumpReLU with a zero threshold.
- ``native``: ``sae.safetensors`` + ``sae.json`` with the full provenance.

Every writer is a pure function of the SAE (and provenance): safetensors are written with sorted
metadata, JSON with sorted keys, and the npz as a zip with fixed timestamps, so re-exporting a
checkpoint gives the same bytes. Each file is written atomically and the file a reader looks for
first (``cfg.json``, ``sae.json``, ``params.npz``) is removed first and written last, so a reader
never sees a half-written export.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from dictlearn.data import storage
from dictlearn.export.model import ExportError, InferenceSAE

ExportFormat = Literal["saelens", "gemmascope", "native"]
FORMATS: tuple[str, ...] = ("saelens", "gemmascope", "native")

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
GEMMASCOPE_PARAMS = "params.npz"
NATIVE_WEIGHTS = "sae.safetensors"
NATIVE_INFO = "sae.json"
NATIVE_FORMAT = "dictlearn.sae"
NATIVE_FORMAT_VERSION = 1
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config layout we write (its ``metadata.sae_lens_version``): 6.x."""

_SAELENS_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}
_FROM_SAELENS_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}
_HOOK_TO_TL = re.compile(r"^(resid_post|attn_out|mlp_out)\.(\d+)$")
_HOOK_FROM_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|attn_out|mlp_out)$")


# --- hook names ------------------------------------------------------------------------------
def transformer_lens_hook(hook: str | None) -> str | None:
    """``resid_post.6`` → ``blocks.6.hook_resid_post`` (the name SAELens files carry)."""
    match = _HOOK_TO_TL.match(hook or "")
    return f"blocks.{match.group(2)}.hook_{match.group(1)}" if match else hook


def dictlearn_hook(hook: str | None) -> str | None:
    """``blocks.6.hook_resid_post`` → ``resid_post.6`` (our hook names); others pass through."""
    match = _HOOK_FROM_TL.match(hook or "")
    return f"{match.group(2)}.{match.group(1)}" if match else hook


# --- writing ---------------------------------------------------------------------------------
def write_export(
    sae: InferenceSAE, out: str, fmt: ExportFormat, provenance: dict[str, Any] | None = None
) -> list[str]:
    """Write ``sae`` to the directory ``out`` in format ``fmt``; returns the file names written.

    Raises:
        ExportError: the format cannot hold this SAE (TopK in ``gemmascope``) or is unknown.
    """
    if fmt == "saelens":
        files = _saelens_files(sae)
        commit = SAELENS_CFG
    elif fmt == "gemmascope":
        files = {GEMMASCOPE_PARAMS: _gemmascope_npz(sae)}
        commit = GEMMASCOPE_PARAMS
    elif fmt == "native":
        files = _native_files(sae, provenance or {})
        commit = NATIVE_INFO
    else:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fs, root = storage.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    # The commit file goes first and comes back last: in between, no reader takes the
    # directory for a finished export of either the old or the new content.
    storage.remove_if_exists(fs, storage.join(root, commit))
    for name, data in files.items():
        if name != commit:
            storage.write_bytes_atomic(fs, storage.join(root, name), data)
    storage.write_bytes_atomic(fs, storage.join(root, commit), files[commit])
    return sorted(files)


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    contiguous = {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(arrays.items())}
    return save_safetensors(contiguous, metadata=dict(sorted((metadata or {}).items())) or None)


def _saelens_files(sae: InferenceSAE) -> dict[str, bytes]:
    weights = {name: a for name, a in sae.arrays().items() if name != "log_feature_density"}
    cfg: dict[str, Any] = {
        "architecture": _SAELENS_ARCH[sae.architecture],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        # The trainer's input scaling is already folded into W_enc / W_dec / b_dec.
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _saelens_metadata(sae),
    }
    if sae.architecture == "topk":
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    files = {SAELENS_WEIGHTS: _safetensors(weights), SAELENS_CFG: _json_bytes(cfg)}
    if sae.log_feature_density is not None:
        files[SAELENS_SPARSITY] = _safetensors({"sparsity": sae.log_feature_density})
    return files


def _saelens_metadata(sae: InferenceSAE) -> dict[str, Any]:
    meta = sae.metadata
    return {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": meta.get("model_name"),
        "hook_name": transformer_lens_hook(meta.get("hook_name")),
        "hook_layer": meta.get("hook_layer"),
        "hook_head_index": None,
        "prepend_bos": True,
        "dictlearn_hook_name": meta.get("hook_name"),
        "dictlearn_trained_architecture": meta.get("trained_architecture"),
        "dictlearn_norm_scale_folded": meta.get("norm_scale_folded"),
    }


def _gemmascope_npz(sae: InferenceSAE) -> bytes:
    if sae.architecture == "topk":
        raise ExportError(
            "the gemmascope format holds JumpReLU SAEs only (Gemma Scope has no TopK form); "
            "export this TopK SAE as --format saelens or native"
        )
    threshold = sae.threshold if sae.threshold is not None else np.zeros(sae.d_sae, np.float32)
    arrays = {
        "W_enc": sae.W_enc,
        "W_dec": sae.W_dec,
        # Gemma Scope encodes x @ W_enc + b_enc (no b_dec subtracted): shift the bias.
        "b_enc": sae.b_enc - sae.b_dec @ sae.W_enc,
        "b_dec": sae.b_dec,
        "threshold": threshold,
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            # Fixed timestamp: np.savez stamps the current time, which would change the bytes.
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name], np.float32))
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _native_files(sae: InferenceSAE, provenance: dict[str, Any]) -> dict[str, bytes]:
    info = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_FORMAT_VERSION,
        "architecture": sae.architecture,
        "k": sae.k,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "weights_sha256": sae.digest,
        "metadata": sae.metadata,
        "provenance": provenance,
    }
    return {NATIVE_WEIGHTS: _safetensors(sae.arrays()), NATIVE_INFO: _json_bytes(info)}


# --- reading ---------------------------------------------------------------------------------
def detect_format(url: str) -> str | None:
    """Which export format lives at ``url`` (a directory or a ``params.npz``), or None."""
    fs, root = storage.filesystem(url)
    if root.endswith(".npz"):
        return "gemmascope"
    names = set(storage.list_sizes(fs, root))
    if NATIVE_INFO in names:
        return "native"
    if SAELENS_CFG in names:
        return "saelens"
    if GEMMASCOPE_PARAMS in names:
        return "gemmascope"
    return None


def read_export(url: str, fmt: str) -> InferenceSAE:
    """Load the export at ``url`` written in ``fmt`` (by us or by another tool).

    Raises:
        ExportError: a file is missing, truncated or corrupt, or the config is unsupported.
    """
    if fmt == "native":
        return _read_native(url)
    if fmt == "saelens":
        return _read_saelens(url)
    if fmt == "gemmascope":
        return _read_gemmascope(url)
    raise ExportError(f"unknown SAE format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _read_file(url: str, name: str | None) -> tuple[str, bytes]:
    fs, root = storage.filesystem(url)
    path = storage.join(root, name) if name else root
    shown = f"{url.rstrip('/')}/{name}" if name else url
    data = storage.read_bytes_or_none(fs, path)
    if data is None:
        raise ExportError(f"{shown} does not exist")
    return shown, data


def _read_json(url: str, name: str) -> tuple[str, dict[str, Any]]:
    shown, data = _read_file(url, name)
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{shown} is not valid JSON ({e}); re-export the SAE") from None
    if not isinstance(parsed, dict):
        raise ExportError(f"{shown} must hold a JSON object")
    return shown, parsed


def _read_tensors(url: str, name: str, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    shown, data = _read_file(url, name)
    try:
        arrays = load_safetensors(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise ExportError(f"{shown} is truncated or corrupt ({e}); re-export the SAE") from None
    missing = [key for key in required if key not in arrays]
    if missing:
        raise ExportError(f"{shown} lacks {', '.join(missing)} (has {', '.join(sorted(arrays))})")
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def _read_native(url: str) -> InferenceSAE:
    shown, info = _read_json(url, NATIVE_INFO)
    if info.get("format") != NATIVE_FORMAT or info.get("format_version") != NATIVE_FORMAT_VERSION:
        raise ExportError(
            f"{shown}: format {info.get('format')!r} version {info.get('format_version')!r} is "
            f"not {NATIVE_FORMAT!r} version {NATIVE_FORMAT_VERSION}; use a matching dictlearn"
        )
    arrays = _read_tensors(url, NATIVE_WEIGHTS, ("W_enc", "b_enc", "W_dec", "b_dec"))
    sae = InferenceSAE(
        architecture=info.get("architecture", ""),
        k=info.get("k"),
        metadata=dict(info.get("metadata") or {}) | {"provenance": info.get("provenance", {})},
        source=url,
        **arrays,
    )
    if info.get("weights_sha256") not in (None, sae.digest):
        raise ExportError(
            f"{url}/{NATIVE_WEIGHTS} does not match the weights_sha256 in {shown}; the export is "
            "corrupt: re-export it"
        )
    return sae


def _read_saelens(url: str) -> InferenceSAE:
    shown, cfg = _read_json(url, SAELENS_CFG)
    meta = dict(cfg.get("metadata") or {})
    # Configs from before SAELens 6 keep the metadata at the top level.
    for key in ("model_name", "hook_name", "hook_layer"):
        if key in cfg and key not in meta:
            meta[key] = cfg[key]
    architecture = cfg.get("architecture", "standard")
    if architecture not in _FROM_SAELENS_ARCH:
        raise ExportError(
            f"{shown}: SAELens architecture {architecture!r} is not supported; we read "
            f"{', '.join(sorted(_FROM_SAELENS_ARCH))}"
        )
    if cfg.get("normalize_activations") not in (None, "none"):
        raise ExportError(
            f"{shown}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
            "fold the normalisation into the weights (normalize_activations: none)"
        )
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        raise ExportError(f"{shown}: rescale_acts_by_decoder_norm=true TopK SAEs are not supported")
    rule = _FROM_SAELENS_ARCH[architecture]
    required = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if rule == "jumprelu" else ())
    arrays = _read_tensors(url, SAELENS_WEIGHTS, required)
    if not cfg.get("apply_b_dec_to_input", True):
        arrays["b_enc"] = arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"]
    fs, root = storage.filesystem(url)
    density = None
    if storage.read_bytes_or_none(fs, storage.join(root, SAELENS_SPARSITY)) is not None:
        density = _read_tensors(url, SAELENS_SPARSITY, ("sparsity",))["sparsity"]
    return InferenceSAE(
        architecture=rule,
        W_enc=arrays["W_enc"],
        b_enc=arrays["b_enc"],
        W_dec=arrays["W_dec"],
        b_dec=arrays["b_dec"],
        threshold=arrays.get("threshold") if rule == "jumprelu" else None,
        k=cfg.get("k") if rule == "topk" else None,
        metadata=meta
        | {"hook_name": meta.get("dictlearn_hook_name") or dictlearn_hook(meta.get("hook_name"))},
        source=url,
        log_feature_density=density,
    )


def _read_gemmascope(url: str) -> InferenceSAE:
    _fs, root = storage.filesystem(url)
    name = None if root.endswith(".npz") else GEMMASCOPE_PARAMS
    shown, data = _read_file(url, name)
    try:
        with np.load(io.BytesIO(data)) as npz:
            arrays = {key: np.asarray(npz[key], np.float32) for key in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ExportError(f"{shown} is truncated or corrupt ({e}); re-export the SAE") from None
    # Some releases spell the weights w_enc / w_dec.
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in arrays]
    if missing:
        raise ExportError(f"{shown} lacks {', '.join(missing)} (has {', '.join(sorted(arrays))})")
    return InferenceSAE(
        architecture="jumprelu",
        W_enc=arrays["W_enc"],
        # Gemma Scope's encoder does not subtract b_dec; ours does: shift the bias back.
        b_enc=arrays["b_enc"] + arrays["b_dec"] @ arrays["W_enc"],
        W_dec=arrays["W_dec"],
        b_dec=arrays["b_dec"],
        threshold=arrays["threshold"],
        source=url,
    )
