"""Activation generation: Ray workers run Gemma 3 over a corpus and write activation datasets.

    from dictlearn.activations import GenerateConfig, main

    result = main(GenerateConfig(hooks=["resid_post.6"], corpus={"paths": [...], "n_shards": 64},
                                 output={"path": "gs://bucket/acts"}, ray={"num_workers": 8}))
    result.datasets["resid_post.6"]  # -> "gs://bucket/acts/resid_post.6", a committed dataset

``dictlearn generate CONFIG.yaml`` is the command line. See ``docs/activations.md``.
"""

from dictlearn.activations.config import GenerateConfig, ModelConfig, OutputConfig, RayConfig
from dictlearn.activations.generate import LEDGER_NAME, GenerateResult, main
from dictlearn.activations.worker import ShardOutcome, ShardWorker, WorkerSpec, resolve_model

__all__ = [
    "LEDGER_NAME",
    "GenerateConfig",
    "GenerateResult",
    "ModelConfig",
    "OutputConfig",
    "RayConfig",
    "ShardOutcome",
    "ShardWorker",
    "WorkerSpec",
    "main",
    "resolve_model",
]
