"""One tracker interface: ``metrics.jsonl`` in the run directory, always, plus W&B.

Analysis code (scaling-law fits, reports) reads the jsonl, so it works offline and never depends
on W&B. Each line is flushed as it is written, so a crash loses at most the line in flight.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import fsspec

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible rather than crash
    return value


class Tracker:
    """Log scalar metrics to ``<run_dir>/metrics.jsonl`` and (unless disabled) to W&B.

    Args:
        run_dir: the run directory (local path or URL).
        config: the resolved run config (recorded in W&B).
        wandb_mode: ``offline`` (default: no network at all), ``online`` or ``disabled``.
        project, entity, name: W&B identifiers.
        group: W&B run group: the sweep a trial belongs to, or the group run whose members
            train together; None for none.
        side_by_side: this run is opened beside others in one process (a group run's members),
            where a plain run finishes any run opened before it.
        enabled: False on non-zero processes of a multi-host run (only process 0 logs).
    """

    def __init__(
        self,
        run_dir: str,
        config: dict[str, Any],
        *,
        wandb_mode: str = "offline",
        project: str = "dictlearn",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        side_by_side: bool = False,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self._wandb_run = None
        self._file = None
        if not enabled:
            return
        fs, path = fsspec.core.url_to_fs(run_dir)
        fs.makedirs(path, exist_ok=True)
        self._file = fsspec.open(f"{run_dir.rstrip('/')}/{METRICS_FILE}", "a").open()
        if wandb_mode != "disabled":
            self._wandb_run = _start_wandb(
                run_dir, config, wandb_mode, project, entity, name, group, side_by_side
            )

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {f"{prefix}{k}": _jsonable(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **row}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if not isinstance(v, str)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: _jsonable(v) for k, v in values.items()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _start_wandb(run_dir, config, mode, project, entity, name, group=None, side_by_side=False):
    import wandb  # imported lazily: ~2 s, and not needed with wandb_mode=disabled

    local_dir = run_dir if "://" not in run_dir else os.path.join(os.getcwd(), "wandb-local")
    os.environ.setdefault("WANDB_DIR", local_dir)
    os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(local_dir, ".wandb-cache"))
    return wandb.init(
        project=project,
        entity=entity,
        name=name,
        group=group,
        config=config,
        dir=local_dir,
        mode=mode,
        resume="allow",
        # A sweep's trial names repeat across sweeps: prefix the group so that a trial never
        # resumes another sweep's W&B run of the same name.
        id=name if group is None else f"{group}-{name}",
        reinit="create_new" if side_by_side else "finish_previous",
    )


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl`` (a partial last line from a crash is skipped)."""
    rows = []
    with fsspec.open(f"{run_dir.rstrip('/')}/{METRICS_FILE}", "r") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
