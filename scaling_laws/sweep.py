"""Sweep planning: which training runs a ``dictlearn sweep`` config stands for (pure; no I/O).

    cfg = load_config(SweepConfig, "launch/configs/sweep_tiny.yaml")
    plan = plan_sweep(cfg)          # plan.trials: one per point; plan.trunks: shared lr trunks
    [t.name for t in plan.trials]   # ['topk-n64-k4-lr1e-03-t65536', ...]

A sweep is a grid over ``n_features`` x ``lr`` x ``tokens`` (x ``k`` x ``architecture``), plus
optional random samples, all on one activation dataset. Every trial is an ordinary
``dictlearn train`` run whose config is ``base`` with the point's values filled in; it is written
to ``<output_dir>/<name>/trials/<trial name>/``, which is what ``dictlearn fit`` reads.

With ``branch_decays``, trials that differ only in their token budget share one constant-lr
*trunk* run (``<output_dir>/<name>/trunks/<trunk name>/``) trained to the last budget's decay
start and checkpointed at every budget's decay start; each budget then restores the trunk at its
own decay start and only trains the decay (``TrainConfig.init``). The lr schedule is constant up
to the decay start whatever the run length (``dictlearn.train.optimizer.decay_start_step``), and
the data position is restored with the state, so a branch is the same run as one trained from
scratch, for a fraction of the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from dictlearn.config import EXECUTION, Effect, StrictModel, fields_with, validate
from dictlearn.inspect.evaluate import EvalSettings
from dictlearn.train.config import TrainConfig
from dictlearn.train.optimizer import decay_start_step

TRIALS_DIR = "trials"
TRUNKS_DIR = "trunks"


class GridConfig(StrictModel):
    """The axes of the grid; every combination is one trial."""

    n_features: list[int] = Field(min_length=1, description="SAE widths (latents).")
    lr: list[float] = Field(min_length=1, description="Peak learning rates.")
    tokens: list[int] = Field(
        min_length=1,
        description="Training-token budgets; each must be a multiple of base.train.batch_size.",
    )
    k: list[int] | None = Field(
        None,
        description="Active latents per token (architectures with a k; null: base.sae.k).",
    )
    architecture: list[str] | None = Field(
        None, description="Architectures (null: base.sae.architecture)."
    )

    @field_validator("n_features", "lr", "tokens", "k", "architecture")
    @classmethod
    def _distinct_positive(cls, values: list[Any] | None) -> list[Any] | None:
        if values is None:
            return None
        if len(set(values)) != len(values):
            raise ValueError(f"values must be distinct, got {values}")
        if any(not isinstance(v, str) and v <= 0 for v in values):
            raise ValueError(f"values must be positive, got {values}")
        return values


class RandomConfig(StrictModel):
    """Random points added to the grid (reproducible from ``seed``)."""

    samples: int = Field(0, ge=0, description="How many random points to add.")
    seed: int = Field(0, description="Seeds the sampling (same seed, same points).")
    lr_log_range: tuple[float, float] | None = Field(
        None,
        description=(
            "[lo, hi]: lr sampled log-uniformly in it (rounded to 3 significant digits); "
            "null: lr drawn from grid.lr. The other axes are drawn from the grid's lists."
        ),
    )

    @field_validator("lr_log_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError(f"needs 0 < lo <= hi, got {list(value)}")
        return value


class SweepRayConfig(StrictModel):
    """Where and how wide the trials run (execution only: may change between re-runs)."""

    address: str | None = Field(
        None,
        description=(
            "null: the Ray this process is connected to (or RAY_ADDRESS), else a local cluster "
            "of this machine's CPUs; 'auto' or 'host:6379': join that cluster."
        ),
    )
    cpus_per_trial: float = Field(1.0, gt=0, description="Ray CPUs each trial reserves.")
    gpus_per_trial: float = Field(0.0, ge=0, description="Ray GPUs each trial reserves.")
    max_concurrent_trials: int = Field(
        0, ge=0, description="Trials running at once (0: as many as the resources allow)."
    )


class SweepConfig(StrictModel):
    """Everything ``dictlearn sweep`` needs."""

    name: str = Field(
        "sweep",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Sweep name: its directory under output_dir and every trial's W&B group.",
    )
    output_dir: str = Field(
        "runs/sweeps", description="Parent directory (or gs:// URL) of sweep directories."
    )
    base: TrainConfig = Field(
        description=(
            "The train config every trial starts from (data.path and data.eval_fraction > 0 "
            "required); the grid sets sae.n_features/k/architecture, optimizer.lr and "
            "train.steps, the sweep sets run and tracker.group."
        )
    )
    grid: GridConfig = Field(description="The grid's axes.")
    random: RandomConfig = Field(
        default_factory=RandomConfig, description="Random points added to the grid."
    )
    sae_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "Extra sae fields per architecture for trials of another architecture than "
            "base.sae's, e.g. {jumprelu: {l0_coef: 1.0}}."
        ),
    )
    branch_decays: bool = Field(
        False,
        description=(
            "Train the token budgets of each point as decays branched from one constant-lr "
            "trunk run (needs base.optimizer.decay_fraction > 0) instead of from scratch."
        ),
    )
    spliced_eval: EvalSettings | None = Field(
        None,
        description="When set (e.g. {tokens: 4096}), every trial also runs the spliced evaluation "
        "of dictlearn eval (loss recovered, KL) on its dataset's source model: needs a dataset "
        "generated from a language model, not planted data.",
    )
    retries: int = Field(
        1, ge=0, json_schema_extra=EXECUTION, description="Times a failed trial is retried."
    )
    ray: SweepRayConfig = Field(
        default_factory=SweepRayConfig, json_schema_extra=EXECUTION, description="Ray resources."
    )

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.base.data.eval_fraction == 0:
            raise ValueError(
                "base.data.eval_fraction must be > 0: every trial reports a held-out eval/fvu"
            )
        if self.base.train.eval_batches == 0:
            raise ValueError("base.train.eval_batches must be > 0 (the held-out eval/fvu)")
        if self.base.init is not None:
            raise ValueError("base.init must be null: the sweep decides where trials start")
        batch = self.base.train.batch_size
        bad = [t for t in self.grid.tokens if t % batch]
        if bad:
            raise ValueError(
                f"grid.tokens {bad} are not multiples of base.train.batch_size={batch} "
                "(a trial trains tokens / batch_size whole steps)"
            )
        if self.branch_decays and self.base.optimizer.decay_fraction == 0:
            raise ValueError(
                "branch_decays needs base.optimizer.decay_fraction > 0 (the decay is the branch)"
            )
        return self

    @property
    def root(self) -> str:
        """The sweep directory, ``<output_dir>/<name>``."""
        return f"{self.output_dir.rstrip('/')}/{self.name}"


SWEEP_EXECUTION_FIELDS = fields_with(SweepConfig, {Effect.EXECUTION})
"""Sweep fields a re-run may change: how the sweep runs, not what its trials produce (derived
from the fields' marking). Any other difference against the sweep directory's sweep.yaml is
refused, held-out evaluation settings included: the trials are compared on those numbers."""


@dataclass(frozen=True)
class Point:
    """One point of the sweep's space."""

    architecture: str
    n_features: int
    k: int | None
    lr: float
    tokens: int

    def name(self) -> str:
        """Trial name, e.g. ``topk-n1024-k32-lr3e-04-t1048576`` (unique per point)."""
        return f"{self._prefix()}-t{self.tokens}"

    def trunk_name(self) -> str:
        """Name of the constant-lr trunk its token budgets branch from."""
        return f"{self._prefix()}-trunk"

    def _prefix(self) -> str:
        k = "" if self.k is None else f"-k{self.k}"
        return f"{self.architecture}-n{self.n_features}{k}-lr{format_lr(self.lr)}"


@dataclass(frozen=True)
class Trial:
    """One training run of the sweep.

    Attributes:
        name: directory name under ``trials/`` (or ``trunks/``).
        point: the point it trains (a trunk's ``tokens`` is the trunk's own length).
        config: its full train config (run directory, steps, tracker group, init filled in).
        trunk: name of the trunk it branches from, or None (trained from scratch).
    """

    name: str
    point: Point
    config: TrainConfig
    trunk: str | None = None

    @property
    def run_dir(self) -> str:
        return f"{self.config.run.output_dir.rstrip('/')}/{self.name}"


@dataclass(frozen=True)
class SweepPlan:
    """The trials of a sweep, and the trunks (to run first) that branched trials start from."""

    trials: list[Trial]
    trunks: list[Trial]


def format_lr(lr: float) -> str:
    """``3e-04``, ``3.16e-04``: shortest scientific form that reads back as ``lr``."""
    return np.format_float_scientific(lr, unique=True, trim="-", exp_digits=2)


def sweep_points(cfg: SweepConfig) -> list[Point]:
    """The grid's points, then the random ones; a duplicate of an earlier point is dropped."""
    grid = cfg.grid
    archs = grid.architecture or [cfg.base.sae.architecture]
    points: list[Point] = []
    for arch in archs:
        ks = grid.k if grid.k is not None and _has_k(cfg, arch) else [_base_k(cfg, arch)]
        for n in grid.n_features:
            for k in ks:
                for lr in grid.lr:
                    for tokens in grid.tokens:
                        points.append(Point(arch, n, k, lr, tokens))
    rng = np.random.default_rng(cfg.random.seed)
    for _ in range(cfg.random.samples):
        arch = archs[rng.integers(len(archs))]
        n = grid.n_features[rng.integers(len(grid.n_features))]
        k = grid.k[rng.integers(len(grid.k))] if grid.k and _has_k(cfg, arch) else None
        k = k if k is not None else _base_k(cfg, arch)
        if cfg.random.lr_log_range is not None:
            lo, hi = cfg.random.lr_log_range
            lr = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
        else:
            lr = grid.lr[rng.integers(len(grid.lr))]
        tokens = grid.tokens[rng.integers(len(grid.tokens))]
        points.append(Point(arch, n, k, lr, tokens))
    unique: dict[str, Point] = {}
    for p in points:
        unique.setdefault(p.name(), p)
    return list(unique.values())


def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Every trial's full train config, and the trunks branched trials restore from.

    Without ``branch_decays`` each trial trains from scratch. With it, the points that differ
    only in ``tokens`` share a trunk when there are at least two of them: the trunk trains
    ``base`` at constant lr (``decay_fraction`` 0) to the largest budget's decay start, keeping
    a checkpoint at each budget's decay start, and each budget's trial restores the trunk there.
    """
    base = cfg.base.model_dump(mode="json")
    trials_dir, trunks_dir = f"{cfg.root}/{TRIALS_DIR}", f"{cfg.root}/{TRUNKS_DIR}"
    trials: list[Trial] = []
    trunks: list[Trial] = []
    groups: dict[str, list[Point]] = {}
    for point in sweep_points(cfg):
        groups.setdefault(point.trunk_name(), []).append(point)
    for trunk_name, members in groups.items():
        configs = {p: _trial_config(cfg, base, p, trials_dir, p.name()) for p in members}
        branch_at = {p: decay_start_step(c.optimizer, c.train.steps) for p, c in configs.items()}
        branched = cfg.branch_decays and len(members) > 1
        if branched:
            points = sorted({s for s in branch_at.values() if s > 0})
            longest = max(members, key=lambda p: p.tokens)
            trunk_cfg = _with(
                _trial_config(cfg, base, longest, trunks_dir, trunk_name),
                {
                    "optimizer": {"decay_fraction": 0.0},
                    "train": {"steps": points[-1], "eval_every": 0, "eval_batches": 0},
                    "checkpoint": {"keep_steps": points},
                },
            )
            trunk_point = Point(
                longest.architecture,
                longest.n_features,
                longest.k,
                longest.lr,
                points[-1] * cfg.base.train.batch_size,
            )
            trunks.append(Trial(trunk_name, trunk_point, trunk_cfg))
        for point in members:
            config, at = configs[point], branch_at[point]
            if branched and at > 0:
                init = {"from_checkpoint": f"{trunks_dir}/{trunk_name}/checkpoints", "step": at}
                trials.append(Trial(point.name(), point, _with(config, {"init": init}), trunk_name))
            else:
                trials.append(Trial(point.name(), point, config))
    return SweepPlan(trials, trunks)


def plan_trials(cfg: SweepConfig) -> list[Trial]:
    """The sweep's trials (one per point); see :func:`plan_sweep` for the trunks."""
    return plan_sweep(cfg).trials


def _trial_config(
    cfg: SweepConfig, base: dict[str, Any], point: Point, output_dir: str, name: str
) -> TrainConfig:
    if point.architecture == base["sae"]["architecture"]:
        sae = dict(base["sae"])
    else:
        sae = {"architecture": point.architecture, **cfg.sae_overrides.get(point.architecture, {})}
    sae["n_features"] = point.n_features
    if point.k is not None:
        sae["k"] = point.k
    data = dict(base)
    data["sae"] = sae
    data["optimizer"] = base["optimizer"] | {"lr": point.lr}
    data["train"] = base["train"] | {"steps": point.tokens // cfg.base.train.batch_size}
    data["run"] = {"output_dir": output_dir, "name": name}
    data["tracker"] = base["tracker"] | {"group": cfg.name}
    return validate(TrainConfig, data, f"sweep trial {name}")


def _with(config: TrainConfig, sections: dict[str, Any]) -> TrainConfig:
    data = config.model_dump(mode="json")
    for key, value in sections.items():
        data[key] = data[key] | value if isinstance(value, dict) and data.get(key) else value
    return validate(TrainConfig, data)


def _arch_config(cfg: SweepConfig, arch: str) -> StrictModel:
    if arch == cfg.base.sae.architecture:
        return cfg.base.sae
    data = cfg.base.model_dump(mode="json")
    data["sae"] = {"architecture": arch, **cfg.sae_overrides.get(arch, {})}
    return validate(TrainConfig, data, f"sweep architecture {arch}").sae


def _has_k(cfg: SweepConfig, arch: str) -> bool:
    return "k" in type(_arch_config(cfg, arch)).model_fields


def _base_k(cfg: SweepConfig, arch: str) -> int | None:
    sae = _arch_config(cfg, arch)
    return sae.k if "k" in type(sae).model_fields else None  # type: ignore[attr-defined]
