"""Where Ray work runs: the connected cluster, a named one, or a private local one.

    with ray_session(config.ray.address, actors=4, resources_per_actor={"CPU": 1, "TPU": 4}):
        ...  # ray.remote actors / tasks

``dictlearn generate`` (LM workers) and multi-host ``dictlearn train`` (trainer actors) both
start their Ray work through :func:`ray_session`, so "which cluster" means the same for both.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import ray
from ray._private import ray_constants


@contextlib.contextmanager
def ray_session(
    address: str | None, *, actors: int, resources_per_actor: dict[str, float]
) -> Iterator[None]:
    """Use the Ray this process is connected to; else join ``address`` (or ``$RAY_ADDRESS``);
    else start a local cluster with room for ``actors`` x ``resources_per_actor``.

    A connection or cluster made here is closed on exit; an existing connection is left open.
    """
    if ray.is_initialized():
        yield
        return
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    totals = {name: amount * actors for name, amount in resources_per_actor.items()}
    with local_ray_cluster(
        num_cpus=max(1, math.ceil(totals.pop("CPU", 0))),
        num_gpus=totals.pop("GPU", 0),
        resources=totals,
    ):
        yield


@contextlib.contextmanager
def local_ray_cluster(
    num_cpus: int, num_gpus: float = 0, resources: dict[str, float] | None = None
) -> Iterator[None]:
    """Start a private single-machine Ray cluster for this process; shut it down on exit.

    Loopback only, no usage reporting, no dashboard, its own temp dir (removed afterwards), and
    workers run this process's interpreter. Tests use it to share one cluster between runs.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    temp_dir = tempfile.mkdtemp(prefix="dlgen-ray-")
    # Under `uv run`, Ray would otherwise make every worker re-create the driver's uv
    # environment (package the working directory, build a venv: ~20 s per start); workers of a
    # local cluster can simply run this interpreter. Ray reads the switch at import time, so it
    # is flipped on its constants module for the duration of ray.init.
    saved_uv = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    try:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            resources=resources or None,
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
        )
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = saved_uv
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = saved_uv
        shutil.rmtree(temp_dir, ignore_errors=True)
