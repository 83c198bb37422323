"""Device meshes: built from a small config, on one host or many."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from pydantic import BaseModel, ConfigDict, Field

from sharding.axes import DATA, MESH_AXES, MODEL


class MeshConfig(BaseModel):
    """Shape of the ``(data, model)`` device mesh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: int = Field(
        -1,
        description="Data-parallel replicas; -1 uses every device left after the model axis.",
    )
    model: int = Field(
        1,
        ge=1,
        description="Devices each SAE's features (and the LM's heads / FFN) are split over.",
    )


class MeshError(ValueError):
    """A mesh shape that does not fit the devices: the user's config (``mesh.data``/``model``).

    sharding imports nothing of dictlearn, so this is not a ``dictlearn.errors.UserError``; the
    CLI reports it as one (one line, exit status 2).
    """


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``(data, model)`` mesh over ``devices`` (default: all global devices).

    Raises:
        MeshError: the requested shape does not tile the available devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n % config.model:
        raise MeshError(
            f"mesh.model={config.model} does not divide the {n} available devices; "
            f"choose a divisor of {n}"
        )
    data = n // config.model if config.data == -1 else config.data
    if data < 1 or data * config.model != n:
        raise MeshError(
            f"mesh.data={config.data} x mesh.model={config.model} = {data * config.model} "
            f"devices, but {n} are available; set mesh.data=-1 to use them all"
        )
    # Keep the model axis on neighbouring devices (same host first) so the top-k candidate
    # exchange and reconstruction psum stay on the fastest links.
    grid = np.asarray(devices, dtype=object).reshape(data, config.model)
    return Mesh(grid, MESH_AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"data": n, "model": m}`` for logging."""
    return {DATA: mesh.shape[DATA], MODEL: mesh.shape[MODEL]}


def device_count(mesh: Mesh) -> int:
    return math.prod(mesh.shape.values())
