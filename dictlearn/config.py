"""Typed, strict configuration: pydantic models, YAML files and dotted command-line overrides.

Every entry point has one root config composed of small sub-configs. Unknown keys and bad values
fail at load time with a message naming the field (``optimizer.lr: Input should be greater than
0``), never later from deep inside JAX.

    cfg = load_config(TrainConfig, "launch/configs/train_tiny.yaml", ["optimizer.lr=3e-4"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the file and field."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value (``3e-4`` → float)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set (creating sub-dicts)."""
    result: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {part!r} is a value, not a section, so it has no fields"
                )
            node = child
        node[path[-1]] = value
    return result


def without_fields(data: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` without the fields and sections named by dotted paths (``"a.b"``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in dotted:
            continue
        nested = tuple(d[len(key) + 1 :] for d in dotted if d.startswith(key + "."))
        out[key] = without_fields(value, nested) if isinstance(value, dict) and nested else value
    return out


def differences(
    saved: dict[str, Any], current: dict[str, Any], saved_as: str = "checkpoint", prefix: str = ""
) -> list[str]:
    """Fields (dotted) where two resolved configs differ, one line each:
    ``sae.k: checkpoint has 32, config has 64`` (``saved_as`` names the older one)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, saved_as, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {saved_as} has {a!r}, config has {b!r}")
    return diffs


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URL."""
    try:
        with fsspec.open(str(path), "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def validate(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    """Build ``cls`` from a dict; a failure lists every bad field by its dotted name."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {field}: unknown key (check the spelling; see the config docs)")
            else:
                lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None
) -> ConfigT:
    """Load ``cls`` from an optional YAML file plus dotted overrides; defaults fill the rest."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(cls, data, source=f"config {path}" if path else "config")


def to_yaml(config: BaseModel) -> str:
    """The fully resolved config as YAML (what every run directory records)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
