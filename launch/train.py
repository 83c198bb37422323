"""The train stage: in this process, or on one Ray trainer actor per host.

``dictlearn train`` and the pipeline's train stage both call :func:`train`. Ray (and
:mod:`launch.multihost`) is imported only for multi-host runs, so a single-process run does not
pay for it at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dictlearn.train.config import GroupTrainConfig, TrainConfig
from dictlearn.train.trainer import TrainResult

if TYPE_CHECKING:
    from dictlearn.train.group import GroupResult


def train(config: TrainConfig) -> TrainResult | GroupResult:
    """Train (or resume) ``config`` where it asks to run: in this process, or
    (``config.ray.uses_ray``) on ``config.ray.hosts`` Ray trainer actors. A
    :class:`GroupTrainConfig` trains its members together, in this process."""
    if isinstance(config, GroupTrainConfig):
        from dictlearn.train.group import main as group_main

        return group_main(config)
    if not config.ray.uses_ray:
        from dictlearn.train.trainer import main

        return main(config)
    import jax

    from launch import multihost

    # This process only coordinates: the accelerators belong to the trainer actors (a TPU
    # host's chips can be opened by one process only). Without effect once jax has started a
    # backend here, so `dictlearn pipeline` sets it up front too.
    jax.config.update("jax_platforms", "cpu")
    return multihost.main(config)
