"""Activation generation: Ray workers run Gemma 3 over a corpus and write activation datasets.

    from dictlearn.activations import GenerateConfig, main

    result = main(GenerateConfig(hooks=["resid_post.6"], corpus={"paths": [...], "n_shards": 64},
                                 output={"path": "gs://bucket/acts"}, ray={"num_workers": 8}))
    result.datasets["resid_post.6"]  # -> "gs://bucket/acts/resid_post.6", a committed dataset

``dictlearn generate CONFIG.yaml`` is the command line. See ``docs/activations.md``.
"""

from typing import TYPE_CHECKING, Any

from dictlearn.activations.config import GenerateConfig, ModelConfig, OutputConfig, RayConfig
from dictlearn.activations.model import ResolvedModel, resolve_model

if TYPE_CHECKING:
    from dictlearn.activations.generate import LEDGER_NAME, GenerateResult, GenerationLedger, main
    from dictlearn.activations.worker import ShardOutcome, ShardWorker, WorkerSpec

# The Ray side (coordinator, worker actors) is imported on first use: code that only needs the
# configs (the eval stage, text queries, a GPU benchmark on a host without Ray) stays light.
_LAZY = {
    "LEDGER_NAME": "dictlearn.activations.generate",
    "GenerateResult": "dictlearn.activations.generate",
    "GenerationLedger": "dictlearn.activations.generate",
    "main": "dictlearn.activations.generate",
    "ShardOutcome": "dictlearn.activations.worker",
    "ShardWorker": "dictlearn.activations.worker",
    "WorkerSpec": "dictlearn.activations.worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LEDGER_NAME",
    "GenerateConfig",
    "GenerateResult",
    "GenerationLedger",
    "ModelConfig",
    "OutputConfig",
    "RayConfig",
    "ResolvedModel",
    "ShardOutcome",
    "ShardWorker",
    "WorkerSpec",
    "main",
    "resolve_model",
]
