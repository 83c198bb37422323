"""The root config of ``dictlearn train`` and its sub-configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dictlearn.config import StrictModel
from dictlearn.sae import SAEConfig, TopKConfig
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
    prefetch: int = Field(2, ge=1, description="Batches read ahead in a background thread.")


class OptimizerConfig(StrictModel):
    """Adam with linear warm-up, a constant phase and a linear decay to zero."""

    lr: float = Field(4e-4, gt=0, description="Peak learning rate.")
    b1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    b2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    decay_fraction: float = Field(
        0.2, ge=0, le=1, description="Final fraction of steps over which the lr decays to 0."
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clip (None: off).")
    sparsity_warmup_steps: int = Field(
        0, ge=0, description="Steps over which the sparsity coefficient ramps up from 0."
    )


class LoopConfig(StrictModel):
    """Length and cadence of the training loop."""

    batch_size: int = Field(4096, gt=0, description="Tokens per global batch.")
    steps: int = Field(1000, gt=0, description="Optimizer steps.")
    seed: int = Field(0, description="Seeds parameter init and the data order.")
    log_every: int = Field(10, gt=0, description="Steps between metric log lines.")
    eval_every: int = Field(0, ge=0, description="Steps between evaluations (0: only at the end).")
    eval_batches: int = Field(4, ge=0, description="Held-out batches per evaluation.")


class CheckpointConfig(StrictModel):
    """Orbax checkpointing."""

    every_steps: int = Field(500, gt=0, description="Steps between checkpoints.")
    keep: int = Field(3, gt=0, description="Checkpoints kept (older ones are deleted).")
    async_save: bool = Field(True, description="Write checkpoints in the background.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the run's latest checkpoint if there is one."
    )


class TrackerConfig(StrictModel):
    """Metrics: always metrics.jsonl in the run directory, plus W&B."""

    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; online needs WANDB_API_KEY in the environment."
    )
    project: str = Field("dictlearn", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team).")


class RunConfig(StrictModel):
    """Where the run writes."""

    output_dir: str = Field("runs", description="Parent directory (or URL) of run directories.")
    name: str | None = Field(
        None, description="Run directory name; default <architecture>-<n_features>-s<seed>."
    )


class TrainConfig(StrictModel):
    """Everything ``dictlearn train`` needs."""

    data: DataConfig
    sae: SAEConfig = Field(default_factory=TopKConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _eval_needs_heldout(self) -> TrainConfig:
        if self.train.eval_every and self.data.eval_fraction == 0:
            raise ValueError("train.eval_every > 0 needs held-out data: set data.eval_fraction > 0")
        return self

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.sae.architecture}-{self.sae.n_features}-s{self.train.seed}"
