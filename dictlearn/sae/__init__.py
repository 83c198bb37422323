"""Sparse autoencoder architectures, selected by name from a registry.

arch = get_architecture(cfg.sae, d_model)   # cfg.sae.architecture in {"topk", ...}
params = arch.init(key, data_mean)
"""

from typing import Annotated

from pydantic import Field

from dictlearn.sae.base import (
    Architecture,
    BaseSAEConfig,
    LocalOutputs,
    LossContext,
    get_architecture,
    register,
    registered_architectures,
)
from dictlearn.sae.batchtopk import BatchTopK, BatchTopKConfig
from dictlearn.sae.jumprelu import JumpReLU, JumpReLUConfig
from dictlearn.sae.relu_l1 import ReLUL1, ReLUL1Config
from dictlearn.sae.topk import TopK, TopKConfig

SAEConfig = Annotated[
    TopKConfig | BatchTopKConfig | JumpReLUConfig | ReLUL1Config,
    Field(discriminator="architecture"),
]
"""Any registered architecture's config, chosen by its ``architecture`` field."""

__all__ = [
    "Architecture",
    "BaseSAEConfig",
    "BatchTopK",
    "BatchTopKConfig",
    "JumpReLU",
    "JumpReLUConfig",
    "LocalOutputs",
    "LossContext",
    "ReLUL1",
    "ReLUL1Config",
    "SAEConfig",
    "TopK",
    "TopKConfig",
    "get_architecture",
    "register",
    "registered_architectures",
]
