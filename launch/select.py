"""The select stage: a ``dictlearn train`` config for a large run, chosen from fitted laws.

    dictlearn select FITS.json n_features=N [tokens=T | flops=C] [--out CONFIG.yaml] [key.sub=value ...]

Writes the config (default ``<fits dir>/select-<N>.yaml``) with a header comment holding the
predicted held-out FVU and its 80 % interval, plus a ``.json`` sidecar with the same numbers.
Dotted overrides (``data.path=gs://...``) apply last (``optimizer.lr=...`` also replaces the lr
law's value in the prediction record, and stands in for a missing lr law); the result is validated as a
:class:`dictlearn.train.config.TrainConfig` before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import yaml

from dictlearn.config import ConfigError, apply_overrides, parse_override, to_yaml, validate
from dictlearn.train.config import TrainConfig
from scaling_laws.select import Selection, load_fits, select_config

SIZE_KEYS = ("n_features", "tokens", "flops")


@dataclass(frozen=True)
class SelectOutput:
    """What ``dictlearn select`` wrote: the selection, the validated config and the files."""

    selection: Selection
    config: TrainConfig
    config_path: str
    sidecar_path: str


def parse_size(arguments: list[str]) -> tuple[dict[str, float], list[str]]:
    """Split ``n_features=N tokens=T flops=C`` from the dotted config overrides."""
    sizes: dict[str, float] = {}
    rest = []
    for arg in arguments:
        key, _, value = arg.partition("=")
        if key in SIZE_KEYS:
            try:
                sizes[key] = float(yaml.safe_load(value))
            except (TypeError, ValueError, yaml.YAMLError):
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        else:
            rest.append(arg)
    if "n_features" not in sizes:
        raise ConfigError("give n_features=N (the large run's width)")
    return sizes, rest


def _number(value: object) -> float | None:
    """A float from an override's value (YAML reads ``1e-4`` as a string); None if not one."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # left to the config's validation, which names the field


def header(selection: Selection, fits_path: str) -> str:
    """The YAML comment above the config."""
    lo, hi = selection.fvu_interval
    llo, lhi = selection.lr_interval
    flops = f"{selection.flops:.3e}" if selection.flops is not None else "unknown"
    lines = [
        f"Chosen by `dictlearn select` from {fits_path}",
        f"n_features {selection.n_features}, tokens {selection.tokens:,}, training FLOPs {flops}",
        f"predicted held-out FVU {selection.predicted_fvu:.4f} (80 % interval "
        f"[{lo:.4f}, {hi:.4f}])",
        f"learning rate {selection.lr:.4g} (80 % interval [{llo:.4g}, {lhi:.4g}])",
        f"extrapolation: N {selection.extrapolation['n_over_max_fitted']:.3g}x, D "
        f"{selection.extrapolation['d_over_max_fitted']:.3g}x the largest fitted",
        *selection.notes,
    ]
    return "".join(f"# {line}\n" for line in lines)


def main(
    fits_path: str,
    n_features: int,
    *,
    tokens: int | None = None,
    flops: float | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
) -> SelectOutput:
    """Choose, validate and write the large run's config.

    Raises:
        scaling_laws.fit.FitError: bad sizes or fits without an lr law.
        ConfigError: the chosen config (with overrides) is not a valid TrainConfig.
    """
    fits = load_fits(fits_path)
    # A learning rate given as an override replaces the lr law's (a sweep with one lr has none).
    given = [v for k, v in map(parse_override, overrides or []) if k == ["optimizer", "lr"]]
    lr = _number(given[-1]) if given else None
    selection = select_config(fits, n_features, tokens=tokens, flops=flops, lr=lr)
    data = apply_overrides(selection.config, overrides or [])
    config = validate(TrainConfig, data, source="selected config")
    out = (
        out
        or f"{fits_path.rsplit('/', 1)[0] if '/' in fits_path else '.'}/select-{n_features}.yaml"
    )
    sidecar = out.removesuffix(".yaml").removesuffix(".yml") + ".json"
    with fsspec.open(out, "w") as f:
        f.write(header(selection, fits_path) + to_yaml(config))
    summary = selection.summary() | {"fits": fits_path, "config": config.model_dump(mode="json")}
    with fsspec.open(sidecar, "w") as f:
        json.dump(summary, f, indent=1)
    return SelectOutput(selection, config, out, sidecar)
