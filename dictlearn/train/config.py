"""The root config of ``dictlearn train`` and its sub-configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from dictlearn.config import (
    EVALUATION,
    EXECUTION,
    LENGTH,
    RECOVERY,
    StrictModel,
    WhereSibling,
    apply_overrides,
    read_yaml,
    validate,
    without_values_from_before,
)
from dictlearn.sae import SAEConfig, TopKConfig
from dictlearn.train.lr_law import default_lr
from sharding import MeshConfig


class DataConfig(StrictModel):
    """Where activations come from and in what order."""

    path: str = Field(description="Activation dataset URL (local path or gs://...).")
    block_rows: int = Field(256, gt=0, description="Rows per shuffled block of a shard.")
    shuffle_blocks: int = Field(
        16, gt=0, description="Blocks whose rows are shuffled together (the shuffle window)."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of blocks held out for evaluation."
    )
    prefetch: int = Field(
        2,
        ge=1,
        json_schema_extra=EXECUTION,
        description="Batches read ahead in a background thread.",
    )
    read_threads: int = Field(
        0,
        ge=0,
        json_schema_extra=EXECUTION,
        description=(
            "Threads that read, check and shuffle each batch's blocks in parallel; 0: one per "
            "CPU core, at most 8. The rows are the same for every value."
        ),
    )


OptimizerName = Literal["adam", "lion", "schedule_free_adamw", "schedule_free_sign"]


class OptimizerConfig(StrictModel):
    """The optimizer and its learning-rate schedule.

    ``adam`` and ``lion`` follow a linear warm-up, a constant phase and a linear decay to zero.
    The schedule-free ones (Defazio et al. 2024; ``optax.contrib``) warm up and then keep the lr
    constant: their parameter average replaces the decay, so ``decay_fraction`` does not apply.
    ``schedule_free_sign`` is sign descent in that wrapper, EleutherAI sparsify's default.
    """

    name: OptimizerName = Field(
        "adam",
        # Left out of dumps at its default, so the configs (and version hashes, and resumable
        # checkpoints) of runs from before the field existed stay exactly what they were.
        exclude_if=lambda v: v == "adam",
        description=(
            "adam; lion (sign of a momentum blend, Chen et al. 2023); schedule_free_adamw; "
            "schedule_free_sign (sign descent, schedule-free with momentum b1)."
        ),
    )
    lr: float | None = Field(
        None,
        gt=0,
        json_schema_extra=RECOVERY,
        description=(
            "Peak learning rate; null: the law fitted to a sweep (dictlearn.train.lr_law: "
            "6.25·N^-0.166·D'^-0.483·sqrt(640/d) for N latents, input width d and D' = D·1024/B "
            "for D training tokens at batch size B; TopK, Adam)."
        ),
    )
    b1: float = Field(
        0.9, ge=0, lt=1, description="beta1: Adam/Lion momentum, the schedule-free average's."
    )
    b2: float = Field(0.999, ge=0, lt=1, description="beta2 of adam, lion, schedule_free_adamw.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    warmup_steps: int = Field(
        16,
        ge=0,
        json_schema_extra=RECOVERY,
        description=(
            "Linear learning-rate warm-up steps (16: what the lr law's sweep used; 100 spent 40 % "
            "of a 1M-token run at batch 4,096 warming up)."
        ),
    )
    decay_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        json_schema_extra=LENGTH,
        description="Final fraction of steps over which the lr decays to 0 (adam and lion).",
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clip (None: off).")
    sparsity_warmup_steps: int = Field(
        0, ge=0, description="Steps over which the sparsity coefficient ramps up from 0."
    )

    @property
    def schedule_free(self) -> bool:
        """Whether the optimizer averages its iterates instead of decaying the lr."""
        return self.name.startswith("schedule_free")

    @model_validator(mode="after")
    def _schedule_free_needs_b1(self) -> OptimizerConfig:
        if self.schedule_free and self.b1 == 0:
            raise ValueError(f"optimizer.b1 must be > 0 for optimizer.name={self.name}")
        return self


class LoopConfig(StrictModel):
    """Length and cadence of the training loop."""

    batch_size: int = Field(4096, gt=0, description="Tokens per global batch.")
    steps: int = Field(1000, gt=0, json_schema_extra=LENGTH, description="Optimizer steps.")
    seed: int = Field(0, description="Seeds parameter init and the data order.")
    init_seed: int | None = Field(
        None,
        # Left out of dumps when unset, so configs (and the pipeline's version hashes) of runs
        # that never set it stay exactly what they were.
        exclude_if=lambda v: v is None,
        description=(
            "Seeds parameter init alone; null: train.seed. A group member's `seed` sets it, so "
            "members share the group's data order yet start from their own init."
        ),
    )
    log_every: int = Field(
        10, gt=0, json_schema_extra=EXECUTION, description="Steps between metric log lines."
    )
    eval_every: int = Field(
        0,
        ge=0,
        json_schema_extra=EVALUATION,
        description="Steps between evaluations (0: only at the end).",
    )
    eval_batches: int = Field(
        4, ge=0, json_schema_extra=EVALUATION, description="Held-out batches per evaluation."
    )

    @property
    def param_seed(self) -> int:
        """The seed of parameter init: ``init_seed`` if set, else ``seed``."""
        return self.seed if self.init_seed is None else self.init_seed


class CheckpointConfig(StrictModel):
    """Orbax checkpointing."""

    every_steps: int = Field(500, gt=0, description="Steps between checkpoints.")
    keep: int = Field(3, gt=0, description="Checkpoints kept (older ones are deleted).")
    async_save: bool = Field(True, description="Write checkpoints in the background.")
    resume: Literal["auto", "never", "overwrite"] = Field(
        "auto",
        description=(
            "auto: continue from the run's latest checkpoint if there is one. never: start "
            "from step 0, refusing a run directory that holds checkpoints. overwrite: delete "
            "the run directory's checkpoints and metrics and start over (on every run: give it "
            "on the command line once, not in a config that is re-run to resume)."
        ),
    )
    keep_steps: list[int] = Field(
        default_factory=list,
        description=(
            "Steps always checkpointed and never deleted (besides the newest `keep`): the "
            "branch points a sweep's token budgets start their decays from."
        ),
    )


class TrackerConfig(StrictModel):
    """Metrics: always in the run directory (metrics/, see dictlearn.tracking), plus W&B."""

    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; online needs WANDB_API_KEY in the environment."
    )
    project: str = Field("dictlearn", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team).")
    group: str | None = Field(
        None, description="W&B run group (a sweep sets it to the sweep's name)."
    )


class InitConfig(StrictModel):
    """Start from another run's checkpoint instead of a fresh init (a branch of a sweep's trunk).

    The state (parameters, optimizer moments and step, dead-latent counters) and the data
    position are restored from ``from_checkpoint`` at ``step``; training goes on to
    ``train.steps``. The other run must have the same config except for fields that only
    change the schedule's end (``train.steps``, ``optimizer.decay_fraction``) or how it ran,
    and its lr must still be in its constant phase at ``step`` and this run's too, so that the
    branch is the same run as one trained from scratch to ``train.steps``.
    """

    from_checkpoint: str = Field(
        description="Checkpoint directory (local path or URL) of the run to branch from."
    )
    step: int = Field(gt=0, description="Checkpointed step of that run to start from.")


class RunConfig(StrictModel):
    """Where the run writes."""

    output_dir: str = Field("runs", description="Parent directory (or URL) of run directories.")
    name: str | None = Field(
        None, description="Run directory name; default <architecture>-<n_features>-s<seed>."
    )


class ClusterConfig(StrictModel):
    """Multi-host training: one Ray trainer actor per accelerator host, joined by jax.distributed."""

    hosts: int = Field(
        1,
        ge=1,
        description=(
            "Host processes the run spans (one per accelerator host; a TPU v5e-16 slice has 4). "
            "1 with no resources_per_host trains in this process; otherwise `dictlearn train` "
            "starts one Ray actor per host and they train as one multi-process JAX program."
        ),
    )
    address: str | None = Field(
        None,
        description=(
            "null: use the Ray this process is connected to (or RAY_ADDRESS), else start a local "
            "cluster; 'auto': join the cluster this machine belongs to; 'host:6379' or "
            "'ray://host:10001': join that one."
        ),
    )
    resources_per_host: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Ray resources each trainer actor reserves: a whole host's accelerators, e.g. "
            "{TPU: 4} on TPU v5e/v4/v5p hosts or {GPU: 8} on an 8-GPU node, so that exactly one "
            "actor lands on each host."
        ),
    )
    cpus_per_host: float = Field(
        1.0, ge=0, description="Ray CPUs each trainer actor reserves (data loading)."
    )
    devices_per_host: int | None = Field(
        None,
        gt=0,
        description=(
            "Virtual CPU devices per host process, for testing multi-host runs on one machine "
            "without accelerators; null uses each host's accelerators."
        ),
    )
    start_timeout_s: float = Field(
        600,
        gt=0,
        description=(
            "Seconds to wait for the cluster to have room for every host actor (an autoscaler "
            "may be bringing a slice up) before giving up with an error."
        ),
    )

    @property
    def uses_ray(self) -> bool:
        """Whether the run goes through Ray trainer actors rather than this process."""
        return self.hosts > 1 or bool(self.resources_per_host)


FIELDS_ADDED_LATER: dict[str, Any] = {
    "init": None,
    "sae.learn_b_dec": True,
    "sae.aux_gradient": "relu",
    "sae.encoder_dtype": "float32",
    "sae.threshold_calibration_batches": 0,
    # BatchTopK had no AuxK: aux_coef 0 (then k_aux has no effect; its default stands for it).
    "sae.aux_coef": WhereSibling("architecture", "batchtopk", 0.0),
    "sae.k_aux": WhereSibling("architecture", "batchtopk", 256),
    # JumpReLU's threshold moved at the lr, with no dead-latent pull.
    "sae.threshold_lr_scale": WhereSibling("architecture", "jumprelu", 1.0),
    "sae.revive_coef": WhereSibling("architecture", "jumprelu", 0.0),
    "sae.revive_scope": WhereSibling("architecture", "jumprelu", "dead"),
}
"""Train-config fields added after runs existed, with the value every earlier run had (no
branch; TopK learned b_dec and sent AuxK through the ReLU; float32 encoder matmuls; BatchTopK
exported its running-mean threshold and had no AuxK; JumpReLU's log-threshold moved at the lr,
with no dead-latent pull). Version hashes and resume checks (of runs and of sweeps) leave a
field out when it holds this value (``dictlearn.config.without_values_from_before``), so an
earlier run compares equal to a config that sets these values; the new defaults make another
run."""


_SAE_CONFIG = TypeAdapter(SAEConfig)


def comparable(config_dict: dict[str, Any], against: dict[str, Any]) -> dict[str, Any]:
    """A single run's ``TrainConfig`` dump as its resume check compares it ``against`` another.

    A null ``sae.dead_window_tokens`` holds the window it derives
    (:attr:`dictlearn.sae.BaseSAEConfig.dead_window`) where ``against`` sets a window, so a run
    saved when the field held that value as a fixed default resumes, and one where it derives
    another does not; two configs that both derive it differ by what it derives from
    (``n_features``, ``k``), not by it as well. Sweeps and pipelines compare the field as
    written: their trials and group members derive windows of their own widths, which the
    shared section's does not stand for. Fields added later are left out where they hold the
    value every earlier run had (:data:`FIELDS_ADDED_LATER`).
    """
    sae = config_dict.get("sae")
    if _unset_window(config_dict) and not _unset_window(against):
        try:
            window = _SAE_CONFIG.validate_python(sae).dead_window
        except ValidationError:
            pass  # an invalid section compares as written; validating the config names the field
        else:
            config_dict = config_dict | {"sae": sae | {"dead_window_tokens": window}}
    return without_values_from_before(config_dict, FIELDS_ADDED_LATER)


def _unset_window(config_dict: dict[str, Any]) -> bool:
    sae = config_dict.get("sae")
    return (
        isinstance(sae, dict) and "dead_window_tokens" in sae and sae["dead_window_tokens"] is None
    )


class TrainConfig(StrictModel):
    """Everything ``dictlearn train`` needs."""

    data: DataConfig = Field(description="The activation dataset and how it is read.")
    sae: SAEConfig = Field(default_factory=TopKConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig, json_schema_extra=EXECUTION)
    train: LoopConfig = Field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, json_schema_extra=EXECUTION
    )
    tracker: TrackerConfig = Field(default_factory=TrackerConfig, json_schema_extra=EXECUTION)
    run: RunConfig = Field(default_factory=RunConfig, json_schema_extra=EXECUTION)
    ray: ClusterConfig = Field(default_factory=ClusterConfig, json_schema_extra=EXECUTION)
    init: InitConfig | None = Field(
        None, description="Start from another run's checkpoint (null: a fresh init)."
    )

    @model_validator(mode="after")
    def _eval_needs_heldout(self) -> TrainConfig:
        if self.train.eval_every and self.data.eval_fraction == 0:
            raise ValueError("train.eval_every > 0 needs held-out data: set data.eval_fraction > 0")
        if self.optimizer.sparsity_warmup_steps and not self.sae.sparsity_penalty:
            raise ValueError(
                f"optimizer.sparsity_warmup_steps={self.optimizer.sparsity_warmup_steps} has no "
                f"effect on sae.architecture={self.sae.architecture}: its sparsity is a fixed k, "
                "not a penalty to warm up; remove it (it applies to jumprelu and relu_l1)"
            )
        if self.init is not None and self.init.step >= self.train.steps:
            raise ValueError(
                f"init.step={self.init.step} must be below train.steps={self.train.steps}"
            )
        return self

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.sae.architecture}-{self.sae.n_features}-s{self.train.seed}"

    @property
    def tokens(self) -> int:
        """Training tokens D: ``train.steps × train.batch_size``."""
        return self.train.steps * self.train.batch_size

    def resolved_optimizer(self, d_model: int) -> OptimizerConfig:
        """``optimizer`` with its peak lr filled in: ``optimizer.lr``, or, when that is null,
        the fitted law's (:func:`dictlearn.train.lr_law.default_lr`) at this run's N, D, batch
        size and input width ``d_model`` (the dataset's)."""
        if self.optimizer.lr is not None:
            return self.optimizer
        lr = default_lr(self.sae.n_features, self.tokens, self.train.batch_size, d_model)
        return self.optimizer.model_copy(update={"lr": lr})


# Fields of the shared `sae` section a member keeps even when it names another architecture.
_SAE_COMMON_FIELDS = (
    "n_features",
    "d_model",
    "dead_window_tokens",
    "decoder_init_norm",
    "init_b_dec_to_mean",
)


class GroupMember(StrictModel):
    """One SAE of a group: what differs from the group's shared sections."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The member's run name: its run directory is <run.output_dir>/<name>.",
    )
    sae: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Fields over the shared `sae` section (e.g. {n_features: 8192, k: 64}). Naming "
            "another architecture starts from that architecture's defaults instead, keeping only "
            "those of the shared n_features, d_model, dead_window_tokens, decoder_init_norm and "
            "init_b_dec_to_mean that differ from the shared architecture's defaults."
        ),
    )
    optimizer: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields over the shared `optimizer` section (e.g. {lr: 3e-3, warmup_steps: 50}).",
    )
    seed: int | None = Field(
        None,
        description=(
            "Seeds this member's parameter init (its train.init_seed); null: train.seed. The data "
            "order is the group's (train.seed): every member reads the same batches."
        ),
    )


class GroupTrainConfig(TrainConfig):
    """``dictlearn train`` for several SAEs on one batch stream (a config with a ``group`` list).

    The sections other than ``group`` are shared: every member reads the same global batches
    (``data``, ``train.batch_size/steps/seed``) on the same ``mesh`` and saves at the same steps.
    ``sae`` and ``optimizer`` are the base each member's overrides apply to. Each member resolves
    to an ordinary single-SAE :class:`TrainConfig` (:meth:`members`) whose run directory,
    checkpoints and metrics are exactly those of that config trained alone.
    """

    group: list[GroupMember] = Field(
        min_length=1, description="The SAEs trained together, each with its own run directory."
    )

    @model_validator(mode="after")
    def _check_group(self) -> GroupTrainConfig:
        names = [m.name for m in self.group]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"group member names must be unique; repeated: {', '.join(repeated)}")
        if self.ray.uses_ray:
            raise ValueError(
                "group runs train in this process; multi-host groups (ray.hosts > 1 or "
                "ray.resources_per_host) are not supported yet"
            )
        self.members()  # every member must resolve to a valid config
        return self

    @property
    def run_name(self) -> str:
        """The group's name (its W&B group); members' run names are their own ``name``."""
        return self.run.name or "group"

    def members(self) -> list[TrainConfig]:
        """Each member's resolved single-SAE config, in ``group`` order.

        Raises:
            ValueError: a member's overrides do not make a valid config (names the member and field).
        """
        shared = self.model_dump(mode="json", exclude={"group"})
        shared_sae = shared["sae"]
        # The common fields another architecture keeps: those the shared section moves off its
        # architecture's default. A test on values alone (not on which fields the file set)
        # resolves a dumped and reloaded config, e.g. a submitted job's, to the same members.
        defaults = type(self.sae)().model_dump(mode="json")
        kept = [k for k in _SAE_COMMON_FIELDS if shared_sae[k] != defaults[k]]
        resolved = []
        for i, member in enumerate(self.group):
            data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in shared.items()}
            architecture = member.sae.get("architecture", shared_sae["architecture"])
            if architecture == shared_sae["architecture"]:
                sae = shared_sae
            else:
                sae = {k: shared_sae[k] for k in kept}
            data["sae"] = sae | member.sae
            data["optimizer"] = shared["optimizer"] | member.optimizer
            if member.seed is not None:
                data["train"] = shared["train"] | {"init_seed": member.seed}
            data["run"] = shared["run"] | {"name": member.name}
            try:
                resolved.append(TrainConfig.model_validate(data))
            except ValidationError as e:
                fields = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
                )
                raise ValueError(f"group.{i} ({member.name}): {fields}") from None
        return resolved


def load_train_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> TrainConfig | GroupTrainConfig:
    """``dictlearn train``'s config: a :class:`GroupTrainConfig` when it has a ``group`` list.

    Raises:
        ConfigError: the file or an override is malformed (names the field).
    """
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides or [])
    cls = GroupTrainConfig if "group" in data else TrainConfig
    return validate(cls, data, source=f"config {path}" if path else "config")
