"""``dictlearn pipeline``: generate activations, train an SAE on them, then evaluate it spliced into
the LM, as one versioned run.

    dictlearn pipeline                                      # embedded defaults (Gemma 3 270M)
    dictlearn pipeline launch/configs/pipeline_default.yaml mesh.data=8 train.train.steps=5000

Every stage writes into its own directory under ``<output_dir>/<name>/``, named by the stage and
a hash of everything that determines its result: its own config (minus execution details such as
the Ray cluster, the mesh or the checkpoint cadence) and the versions of the stages it reads. So

* a re-run of the same config skips the stages that finished (each leaves a ``stage.json``),
  and resumes an unfinished one (generation skips committed shards, training resumes from its
  newest checkpoint);
* changing a stage's config (or an upstream stage's) gives it a new directory: nothing finished
  is ever overwritten, and two versions can be compared side by side.

With ``train.widths`` on several generated hooks, each hook's group trains on a Ray worker of
its own, concurrently (:mod:`launch.hook_workers`); a hook whose group fails is reported and the
others are kept.

The run ends with a summary a person can read (tokens, FVU, L0, dead fraction, the spliced
evaluation's loss recovered, where everything was written); ``<output_dir>/<name>/pipeline.json``
holds the same as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
from pydantic import Field, model_validator

from dictlearn.activations import GenerateConfig, OutputConfig
from dictlearn.config import (
    EXECUTION,
    ConfigError,
    Effect,
    StrictModel,
    apply_overrides,
    fields_with,
    read_yaml,
    to_yaml,
    validate,
    without_fields,
    without_values_from_before,
)
from dictlearn.data import storage
from dictlearn.inspect.evaluate import EvalConfig
from dictlearn.train.config import (
    FIELDS_ADDED_LATER,
    DataConfig,
    GroupTrainConfig,
    TrainConfig,
)
from launch.hook_workers import (
    HookWorkersConfig,
    WorkerJob,
    WorkerOutcome,
    run_on_workers,
    shared_local_cluster,
)
from sharding import MeshConfig

StageName = Literal["generate", "train", "eval"]
STAGE_ORDER: tuple[StageName, ...] = ("generate", "train", "eval")


STAGE_MARKER = "stage.json"


class PipelineOutputConfig(OutputConfig):
    """``generate.output`` inside a pipeline: the path is the stage's versioned directory."""

    path: str | None = Field(  # type: ignore[assignment]
        None,
        json_schema_extra=EXECUTION,
        description="Leave unset: the pipeline writes under <output_dir>/<name>/.",
    )


class PipelineGenerateConfig(GenerateConfig):
    """``dictlearn generate``'s config, minus what the pipeline fills in (output.path)."""

    output: PipelineOutputConfig = Field(  # type: ignore[assignment]
        default_factory=PipelineOutputConfig,
        description="Where the datasets go: set dtype here; the pipeline fills in path.",
    )


# The embedded defaults (the README's run): Gemma 3 270M's residual stream after block 6 on the
# built-in corpora, then a 4096-latent TopK SAE; ~6 minutes on a 2-core machine. A config file and
# overrides are merged onto these (see load_pipeline_config).
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "generate": {
        "hooks": ["resid_post.6"],
        "corpus": {"paths": ["builtin:python-docs", "builtin:python-stdlib"], "n_shards": 8},
        "context_length": 128,
        "batch_size": 16,
        "max_tokens": 262_144,
    },
    "train": {
        "data": {"eval_fraction": 0.05},
        "sae": {
            "architecture": "topk",
            "n_features": 4096,
            "k": 32,
            "dead_window_tokens": 100_000,
        },
        "optimizer": {"warmup_steps": 20},  # lr: the fitted law (dictlearn.train.lr_law)
        "train": {"batch_size": 1024, "steps": 240, "log_every": 20},
        "checkpoint": {"every_steps": 100},
    },
    "eval": {"tokens": 4096},
}


class PipelineDataConfig(DataConfig):
    """``train.data`` inside a pipeline: the dataset path comes from the generate stage."""

    path: str | None = Field(  # type: ignore[assignment]
        None,
        # Filled in by the pipeline; the dataset is hashed as the generate stage's version.
        json_schema_extra=EXECUTION,
        description="Leave unset: the pipeline points training at the generated dataset.",
    )


class PipelineTrainConfig(TrainConfig):
    """``dictlearn train``'s config, minus what the pipeline fills in (data path, run dir)."""

    data: PipelineDataConfig = Field(default_factory=PipelineDataConfig)  # type: ignore[assignment]
    hook: str | None = Field(
        None,
        description=(
            "Which generated hook to train on (default: the first of generate.hooks; with "
            "widths, every hook)."
        ),
    )
    widths: list[int] = Field(
        default_factory=list,
        # Left out of dumps when empty, so single-SAE pipelines keep their version hashes.
        exclude_if=lambda v: not v,
        description=(
            "Gemma Scope's shape: one SAE per width (n_features), trained together as a group on "
            "one batch stream, on every generated hook (or on `hook` alone if set), each hook's "
            "group its own train stage; members are named <architecture>-<width>. Empty: one SAE "
            "(sae.n_features) on one hook."
        ),
    )

    hook_workers: HookWorkersConfig = Field(
        default_factory=HookWorkersConfig,
        json_schema_extra=EXECUTION,
        description=(
            "With widths on several hooks: each hook's group on a Ray worker of its own "
            "(resources per worker, cluster); execution only, not part of any version."
        ),
    )

    @model_validator(mode="after")
    def _check_widths(self) -> PipelineTrainConfig:
        if len(set(self.widths)) != len(self.widths) or any(w <= 0 for w in self.widths):
            raise ValueError(f"train.widths must be distinct positive integers, got {self.widths}")
        return self


# Fields of the train config left out of the stage's version hash (from the fields' marking,
# dictlearn.config.Effect): how it runs (so, e.g., another mesh reuses finished work) and what
# the training-time evaluation reports (the eval stage reports the result). The dataset enters
# the hash as the generate stage's version and the hook (inputs), not as data.path. The schedule
# is hashed: a resumed run may change it, but in a pipeline a new value is a new run. (The
# generate stage's hash covers GenerateConfig.fingerprint_fields(), derived the same way.)
TRAIN_EXECUTION_FIELDS = fields_with(PipelineTrainConfig, {Effect.EXECUTION, Effect.EVALUATION})


class PipelineEvalConfig(EvalConfig):
    """``dictlearn eval``'s config, minus what the pipeline fills in (the SAE and the model)."""

    sae: str | None = Field(  # type: ignore[assignment]
        None, description="Leave unset: the pipeline evaluates the train stage's SAE."
    )
    model: None = Field(  # type: ignore[assignment]
        None, description="Leave unset: the eval stage runs the generate stage's model."
    )


class PipelineConfig(StrictModel):
    """Everything ``dictlearn pipeline`` needs; every field has a default (the README's run)."""

    name: str = Field(
        "default",
        json_schema_extra=EXECUTION,
        description="Pipeline name: the directory under output_dir.",
    )
    output_dir: str = Field(
        "runs",
        json_schema_extra=EXECUTION,
        description="Parent directory (or gs:// URL) of pipelines.",
    )
    stages: list[StageName] = Field(
        default_factory=lambda: list(STAGE_ORDER),
        json_schema_extra=EXECUTION,
        description="Stages to run, in pipeline order (a later stage needs its inputs finished).",
    )
    mesh: MeshConfig = Field(
        default_factory=MeshConfig,
        json_schema_extra=EXECUTION,
        description="Device mesh of the training stage (set it here, not under train.mesh).",
    )
    generate: PipelineGenerateConfig = Field(
        default_factory=lambda: PipelineGenerateConfig.model_validate(
            EMBEDDED_DEFAULTS["generate"]
        ),
        description="The generate stage (dictlearn generate's config; output.path is filled in).",
    )
    train: PipelineTrainConfig = Field(
        default_factory=lambda: PipelineTrainConfig.model_validate(EMBEDDED_DEFAULTS["train"]),
        description="The train stage (dictlearn train's config; data.path and run are filled in).",
    )
    eval: PipelineEvalConfig = Field(
        default_factory=lambda: PipelineEvalConfig.model_validate(EMBEDDED_DEFAULTS["eval"]),
        description="The eval stage (dictlearn eval's config: the trained SAE spliced into the "
        "generate stage's model; sae and model are filled in).",
    )

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if sorted(self.stages, key=STAGE_ORDER.index) != self.stages or len(
            set(self.stages)
        ) != len(self.stages):
            raise ValueError(f"stages must be distinct and in the order {list(STAGE_ORDER)}")
        if self.train.hook is not None and self.train.hook not in self.generate.hooks:
            raise ValueError(
                f"train.hook={self.train.hook!r} is not one of generate.hooks {self.generate.hooks}"
            )
        if self.train.mesh not in (MeshConfig(), self.mesh):
            raise ValueError("set the training mesh with the top-level mesh, not train.mesh")
        return self

    @property
    def root(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.name}"

    @property
    def hook(self) -> str:
        return self.train.hook or self.generate.hooks[0]

    @property
    def train_hooks(self) -> list[str]:
        """The hooks that get a train stage: one, or with ``train.widths`` every generated one."""
        if self.train.widths and self.train.hook is None:
            return list(self.generate.hooks)
        return [self.hook]

    @property
    def hooks_on_workers(self) -> bool:
        """Whether the train stage trains its hooks' groups on Ray workers, one per hook (several
        hooks with ``train.widths``, unless ``train.hook_workers.parallel`` is false)."""
        several = bool(self.train.widths) and len(self.train_hooks) > 1
        return several and self.train.hook_workers.parallel


def merge_onto_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` deep-merged onto ``defaults``; a section naming another ``architecture`` than
    the default's replaces it whole (a jumprelu SAE must not inherit topk's ``k``)."""
    if "architecture" in given and given["architecture"] != defaults.get("architecture"):
        return dict(given)
    merged = dict(defaults)
    for key, value in given.items():
        default = defaults.get(key)
        both_sections = isinstance(value, dict) and isinstance(default, dict)
        merged[key] = merge_onto_defaults(default, value) if both_sections else value
    return merged


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """The pipeline config: embedded defaults, then the file at ``path`` (if any), then the
    dotted ``overrides``; validated, with errors naming the field."""
    given = read_yaml(path) if path is not None else {}
    merged = merge_onto_defaults(EMBEDDED_DEFAULTS, apply_overrides(given, overrides))
    return validate(PipelineConfig, merged, f"config file {path}" if path else "pipeline config")


def version_hash(payload: dict[str, Any]) -> str:
    """Twelve hex digits of the SHA-256 of ``payload`` as canonical JSON."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StagePlan:
    """One stage of a pipeline run: its version, directory and fully resolved config."""

    stage: StageName
    version: str
    directory: str
    config: GenerateConfig | TrainConfig | EvalConfig
    inputs: dict[str, str] = field(default_factory=dict)
    needs: tuple[StageName, ...] = ()


def plan_stages(config: PipelineConfig) -> dict[str, StagePlan]:
    """Resolve every stage's config and versioned directory (even stages not selected to run:
    a later stage's version depends on its inputs' versions).

    Keys are ``generate``, ``train`` and ``eval``; with ``train.widths``, one ``train:<hook>``
    per hook and one ``eval:<hook>:<member>`` per SAE of its group.
    """
    gen_dict = config.generate.model_dump(mode="json")
    gen_version = version_hash(
        {"stage": "generate", "config": config.generate.fingerprint_fields()}
    )
    gen_dir = f"{config.root}/generate-{gen_version}"
    generate = GenerateConfig.model_validate(
        gen_dict | {"output": gen_dict["output"] | {"path": gen_dir}}
    )
    plans = {"generate": StagePlan("generate", gen_version, gen_dir, generate)}
    for hook in config.train_hooks:
        key = f"train:{hook}" if config.train.widths else "train"
        plans[key] = _plan_train(config, hook, gen_version, gen_dir)
        plans |= _plan_evals(config, key, plans[key])
    return plans


def _plan_train(config: PipelineConfig, hook: str, gen_version: str, gen_dir: str) -> StagePlan:
    # `hook` and `hook_workers` are the pipeline's own (which hook, where each hook's group
    # runs), not TrainConfig fields; hook_workers is marked EXECUTION too, for the field tables.
    train_dict = config.train.model_dump(mode="json", exclude={"hook", "hook_workers"})
    inputs = {"generate": gen_version, "hook": hook}
    hashed = without_fields(train_dict, TRAIN_EXECUTION_FIELDS)
    # Fields added to TrainConfig after pipelines had versions leave them unchanged at the value
    # those pipelines ran with (an unset `init`, TopK's learned b_dec, ...).
    hashed = without_values_from_before(hashed, FIELDS_ADDED_LATER)
    train_version = version_hash({"stage": "train", "config": hashed, "inputs": inputs})
    directory = f"{config.root}/train-{train_version}"
    train_dict["data"]["path"] = f"{gen_dir}/{hook}"
    train_dict["mesh"] = config.mesh.model_dump(mode="json")
    widths = train_dict.pop("widths", [])
    train: TrainConfig
    if widths:
        # The group's members write under the stage directory: train-<version>/<arch>-<width>/.
        train_dict["run"] = {"output_dir": directory, "name": f"{config.name}-{hook}"}
        architecture = train_dict["sae"]["architecture"]
        train_dict["group"] = [
            {"name": f"{architecture}-{w}", "sae": {"n_features": w}} for w in widths
        ]
        train = GroupTrainConfig.model_validate(train_dict)
    else:
        train_dict["run"] = {"output_dir": config.root, "name": f"train-{train_version}"}
        train = TrainConfig.model_validate(train_dict)
    return StagePlan("train", train_version, directory, train, inputs, needs=("generate",))


def _plan_evals(config: PipelineConfig, train_key: str, train: StagePlan) -> dict[str, StagePlan]:
    """One eval stage per SAE the train stage trains (one, or a group's members)."""
    if isinstance(train.config, GroupTrainConfig):
        saes = {m.name: f"{train.directory}/{m.name}" for m in train.config.group}
    else:
        saes = {"": train.directory}
    eval_dict = config.eval.model_dump(mode="json", exclude={"model"})
    plans = {}
    for member, sae_dir in saes.items():
        inputs = {"train": train.version} | ({"member": member} if member else {})
        version = version_hash(
            {"stage": "eval", "config": without_fields(eval_dict, ("sae",)), "inputs": inputs}
        )
        evaluation = EvalConfig.model_validate(
            eval_dict | {"sae": sae_dir, "model": config.generate.model.model_dump(mode="json")}
        )
        key = "eval" + train_key[len("train") :] + (f":{member}" if member else "")
        plans[key] = StagePlan(
            "eval", version, f"{config.root}/eval-{version}", evaluation, inputs, needs=(train_key,)
        )
    return plans


def read_stage_marker(directory: str) -> dict[str, Any] | None:
    """The ``stage.json`` a finished stage left in its directory, or None."""
    fs, path = storage.filesystem(directory)
    raw = storage.read_bytes_or_none(fs, storage.join(path, STAGE_MARKER))
    return None if raw is None else json.loads(raw)


def _write_json(url: str, payload: dict[str, Any]) -> None:
    fs, path = storage.filesystem(url)
    # Whole or not at all: a half-written marker must never read as "finished".
    storage.write_bytes_atomic(fs, path, json.dumps(payload, indent=2, default=str).encode())


def _run_generate(plan: StagePlan) -> dict[str, Any]:
    from dictlearn.activations import main as generate_main

    return asdict(generate_main(plan.config))  # type: ignore[arg-type]


def _run_train(plan: StagePlan) -> dict[str, Any]:
    from launch.train import train

    result = train(plan.config)  # type: ignore[arg-type]
    # A group's result: its members' results, and whether any was preempted.
    return asdict(result) | {"preempted": result.preempted}


def _run_eval(plan: StagePlan) -> dict[str, Any]:
    from dictlearn.inspect.evaluate import main as eval_main

    return asdict(eval_main(plan.config))  # type: ignore[arg-type]


_RUNNERS = {"generate": _run_generate, "train": _run_train, "eval": _run_eval}


@dataclass
class StageOutcome:
    """What one stage did in this invocation (``failed``: it raised, or an input stage failed)."""

    stage: StageName
    version: str
    directory: str
    status: Literal["ran", "skipped", "failed"]
    seconds: float
    result: dict[str, Any]
    key: str = ""
    error: str | None = None


@dataclass
class PipelineResult:
    """What ``dictlearn pipeline`` reports (also written to ``pipeline.json``)."""

    root: str
    stages: list[StageOutcome]
    preempted: bool = False

    @property
    def failed(self) -> list[StageOutcome]:
        """The stages that failed (only hooks' groups on Ray workers fail without raising)."""
        return [s for s in self.stages if s.status == "failed"]


def main(config: PipelineConfig) -> PipelineResult:
    """Run (or resume) the selected stages of ``config``; see the module docstring."""
    plans = plan_stages(config)
    outcomes: list[StageOutcome] = []
    preempted = False
    runs = [
        (key, plan) for name in config.stages for key, plan in plans.items() if plan.stage == name
    ]
    # With several hooks' groups on Ray workers, the first train stage reached trains them all
    # at once; the others read their outcome here (None: not started, the run was stopped).
    from_workers: dict[str, StageOutcome | None] | None = None
    failed: set[str] = set()
    # Closed when the eval stage starts (it runs here, without Ray), or on the way out.
    with contextlib.ExitStack() as shared_ray:
        shared_ray.enter_context(_shared_local_ray(config, runs))
        for key, plan in runs:
            name = plan.stage
            if preempted and (from_workers is None or key not in from_workers):
                break
            if name == "eval":
                shared_ray.close()
            _check_inputs_finished(config, plans, plan)
            blocked = [upstream for upstream in plan.needs if upstream in failed]
            if blocked:
                error = f"not run: its input stage {blocked[0]} failed"
                print(f"[{key}] {error}", flush=True)
                outcomes.append(
                    StageOutcome(name, plan.version, plan.directory, "failed", 0.0, {}, key, error)
                )
                failed.add(key)
                continue
            # A hook trained on a worker in this run has its marker by now: it ran, not skipped.
            marker = None if key in (from_workers or {}) else read_stage_marker(plan.directory)
            if marker is not None:
                outcomes.append(
                    StageOutcome(
                        name, plan.version, plan.directory, "skipped", 0.0, marker["result"], key
                    )
                )
                print(f"[{key}] finished earlier: {plan.directory} (skipped)", flush=True)
                continue
            outcome: StageOutcome | None
            if name == "train" and config.hooks_on_workers:
                if from_workers is None:
                    todo = {
                        k: p
                        for k, p in runs
                        if p.stage == "train" and read_stage_marker(p.directory) is None
                    }
                    from_workers = _train_on_workers(config, todo)
                outcome = from_workers[key]
                if outcome is None:
                    preempted = True
                    continue
            else:
                print(f"[{key}] version {plan.version} -> {plan.directory}", flush=True)
                started = time.perf_counter()
                result = _RUNNERS[name](plan)
                seconds = time.perf_counter() - started
                outcome = StageOutcome(
                    name, plan.version, plan.directory, "ran", seconds, result, key
                )
                if not result.get("preempted"):
                    _commit_stage(config, plan, result, seconds)
            outcomes.append(outcome)
            if outcome.status == "failed":
                failed.add(key)
            # Training stopped early on SIGTERM: not finished, no marker; nothing more starts.
            preempted = preempted or bool(outcome.result.get("preempted"))
    pipeline_result = PipelineResult(config.root, outcomes, preempted)
    _write_json(f"{config.root}/pipeline.json", asdict(pipeline_result))
    return pipeline_result


@contextlib.contextmanager
def _shared_local_ray(config: PipelineConfig, runs: list[tuple[str, StagePlan]]) -> Iterator[None]:
    """One local Ray cluster for the generate stage's workers and the hooks' train workers when
    this run needs both (starting a cluster takes 6-13 s, far longer on a loaded machine), unless
    a cluster is named or connected; otherwise each stage starts its own as it needs one."""
    todo = {plan.stage for _, plan in runs if read_stage_marker(plan.directory) is None}
    if not ({"generate", "train"} <= todo and config.hooks_on_workers):
        yield
        return
    with shared_local_cluster(
        config.generate.ray, config.train.hook_workers, len(config.train_hooks)
    ):
        yield


def _check_inputs_finished(
    config: PipelineConfig, plans: dict[str, StagePlan], plan: StagePlan
) -> None:
    for upstream in plan.needs:
        needed = plans[upstream]
        upstream_stage = needed.stage
        if upstream_stage not in config.stages and read_stage_marker(needed.directory) is None:
            raise ConfigError(
                f"stage {plan.stage} reads the {upstream} stage's output {needed.directory} "
                f"(version {needed.version}), which has not finished; add {upstream_stage} "
                "to stages"
            )


def _commit_stage(
    config: PipelineConfig, plan: StagePlan, result: dict[str, Any], seconds: float
) -> None:
    """Mark ``plan``'s stage finished: its ``stage.json`` (written last) is what re-runs skip on."""
    if plan.stage == "train":
        with fsspec.open(f"{plan.directory}/pipeline_config.yaml", "w") as f:
            f.write(to_yaml(config))
    _write_json(
        f"{plan.directory}/{STAGE_MARKER}",
        {
            "stage": plan.stage,
            "version": plan.version,
            "inputs": plan.inputs,
            "config": plan.config.model_dump(mode="json"),
            "result": result,
            "seconds": seconds,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def _train_on_workers(
    config: PipelineConfig, todo: dict[str, StagePlan]
) -> dict[str, StageOutcome | None]:
    """Train every hook's group in ``todo`` on a Ray worker of its own (launch.hook_workers);
    each finished group's stage is committed as soon as it returns."""
    jobs = []
    for key, plan in todo.items():
        print(f"[{key}] version {plan.version} -> {plan.directory}", flush=True)
        group = plan.config
        assert isinstance(group, GroupTrainConfig)
        first_member = f"{plan.directory}/{group.group[0].name}"
        jobs.append(WorkerJob(key, plan, group.train.steps, first_member))

    def on_finished(outcome: WorkerOutcome) -> None:
        result = outcome.result
        if result is not None and not result.get("preempted"):
            _commit_stage(config, todo[outcome.key], result, outcome.seconds)

    finished = run_on_workers(jobs, _run_train, config.train.hook_workers, on_finished)
    outcomes: dict[str, StageOutcome | None] = {}
    for outcome in finished:
        plan = todo[outcome.key]
        if not outcome.started:
            outcomes[outcome.key] = None
            continue
        status: Literal["ran", "failed"] = "failed" if outcome.error is not None else "ran"
        outcomes[outcome.key] = StageOutcome(
            "train",
            plan.version,
            plan.directory,
            status,
            outcome.seconds,
            outcome.result or {},
            outcome.key,
            outcome.error,
        )
    return outcomes


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def summary_text(result: PipelineResult) -> str:
    """A summary a person can read: tokens, FVU, L0, dead fraction, where everything went."""
    if result.preempted:
        headline = "pipeline preempted (re-run to resume)"
    elif result.failed:
        headline = (
            f"pipeline done, {len(result.failed)} stage(s) FAILED (re-run to retry them; "
            "finished stages are skipped)"
        )
    else:
        headline = "pipeline done"
    lines = [headline]
    for outcome in result.stages:
        r = outcome.result
        how = {
            "ran": f"ran in {outcome.seconds:.0f} s",
            "skipped": "finished earlier, skipped",
            "failed": f"FAILED: {outcome.error}",
        }[outcome.status]
        lines.append(f"  {outcome.key or outcome.stage:<9} {how}")
        if outcome.status == "failed":
            continue
        if outcome.stage == "generate":
            lines.append(f"    tokens     {_number(r.get('tokens'), ',')}")
            for hook, url in r.get("datasets", {}).items():
                lines.append(f"    dataset    {hook}: {url}")
        elif outcome.stage == "train" and "members" in r:
            lines.append(
                f"    group      {r.get('name')}: {len(r['members'])} SAEs, one batch stream"
            )
            for member_name, m in r["members"].items():
                evals, metrics = m.get("eval_metrics", {}), m.get("metrics", {})
                lines.append(
                    f"    {member_name:<16} FVU {_number(evals.get('fvu', metrics.get('fvu')), '.4f')}"
                    f"  L0 {_number(evals.get('l0', metrics.get('l0')), '.1f')}"
                    f"  dead {_number(metrics.get('dead_fraction'), '.3f')}  "
                    f"steps {_number(m.get('steps'), ',')}  run dir {m.get('run_dir')}"
                )
        elif outcome.stage == "train":
            metrics, evals = r.get("metrics", {}), r.get("eval_metrics", {})
            fvu = evals.get("fvu", metrics.get("fvu"))
            l0 = evals.get("l0", metrics.get("l0"))
            lines += [
                f"    steps      {_number(r.get('steps'), ',')}  "
                f"({_number(r.get('tokens'), ',')} training tokens)",
                f"    FVU        {_number(fvu, '.4f')}"
                + ("  (held-out)" if "fvu" in evals else ""),
                f"    L0         {_number(l0, '.1f')}",
                f"    dead       {_number(metrics.get('dead_fraction'), '.3f')} of features",
                f"    run dir    {r.get('run_dir')}  (config.yaml, metrics/, wandb/)",
                f"    checkpoint {r.get('checkpoint_dir')}",
            ]
        elif outcome.stage == "eval":
            m = r.get("metrics", {})
            lines += [
                f"    spliced at {r.get('hook')} over {_number(r.get('tokens'), ',')} tokens: "
                f"loss recovered {_number(m.get('loss_recovered'), '.4f')}",
                f"    CE         clean {_number(m.get('ce_clean'), '.4f')}  spliced "
                f"{_number(m.get('ce_spliced'), '.4f')}  zero-ablated "
                f"{_number(m.get('ce_zero_ablated'), '.4f')}  KL {_number(m.get('kl_spliced'), '.4f')}",
            ]
    lines.append(f"  summary    {result.root}/pipeline.json")
    return "\n".join(lines)
