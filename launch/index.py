"""The index stage: in this process, or on one Ray actor per host as one multi-process JAX program.

    dictlearn index build SAE_URL --out OUT_URL ray.hosts=4 'ray.resources_per_host={TPU: 4}'

``dictlearn index build`` calls :func:`build`. With ``ray.hosts > 1`` (or
``ray.resources_per_host`` set) it reserves one placement-group bundle per host, starts an
:class:`IndexHost` actor in each (the trainer's host actor, given a ``build`` method), and every
actor joins ``jax.distributed`` and runs ``dictlearn.index.build_index(config)``: the exact
scan's mesh spans every host's devices (``data`` across hosts, ``model`` within one), every
process loads the SAE, and process 0 alone writes parts and the manifest. If a host fails, the
others are stopped and re-running the same command resumes from the parts already written.
"""

from __future__ import annotations

from typing import Any

from dictlearn.config import ConfigError
from dictlearn.index import IndexConfig, IndexResult, build_index
from launch.multihost import POLL_S, HostFailure, TrainHost


class IndexHost(TrainHost):
    """One host's process of a multi-process index build (a Ray actor)."""

    def build(self, config: IndexConfig, coordinator_address: str) -> IndexResult:
        """Join the JAX program, then build as this host's process."""
        from sharding.distributed import Coordinator, initialize

        initialize(
            Coordinator(coordinator_address, self.hosts, self.rank),
            cpu_devices=self.devices_per_host,
        )
        import jax

        # The data axis spans hosts; the model axis must stay within one (fast collectives).
        if jax.local_device_count() % config.mesh.model:
            raise ConfigError(
                f"mesh.model={config.mesh.model} spans hosts: keep it within one host "
                f"(a divisor of the {jax.local_device_count()} devices each host has)"
            )
        return build_index(config)


def build(config: IndexConfig) -> IndexResult:
    """Build (or finish) the index where ``config.ray`` asks: here, or on Ray host actors."""
    if not config.ray.uses_ray:
        return build_index(config)
    per_host = config.ray.devices_per_host
    if per_host is not None and per_host % config.mesh.model:
        raise ConfigError(
            f"mesh.model={config.mesh.model} spans hosts: keep it within one host "
            f"(a divisor of ray.devices_per_host={per_host})"
        )
    import jax

    # This process only coordinates: the accelerators belong to the host actors.
    jax.config.update("jax_platforms", "cpu")
    return _build_on_hosts(config)


def _build_on_hosts(config: IndexConfig) -> IndexResult:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from dictlearn.ray_cluster import ray_session

    cluster = config.ray
    bundle = {"CPU": cluster.cpus_per_host} | dict(cluster.resources_per_host)
    bundle = {k: v for k, v in bundle.items() if v}
    with ray_session(cluster.address, actors=cluster.hosts, resources_per_actor=bundle):
        group = placement_group([bundle] * cluster.hosts, strategy="SPREAD")
        actors: list[Any] = []
        try:
            if not group.wait(timeout_seconds=cluster.start_timeout_s):
                raise HostFailure(
                    f"the Ray cluster has no room for ray.hosts={cluster.hosts} index actors of "
                    f"{bundle} each after {cluster.start_timeout_s:g} s"
                )
            resources = dict(cluster.resources_per_host)
            gpus = resources.pop("GPU", 0)
            actors = [
                ray.remote(IndexHost)
                .options(
                    num_cpus=cluster.cpus_per_host,
                    num_gpus=gpus,
                    resources=resources,
                    max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=rank
                    ),
                )
                .remote(rank, cluster.hosts, cluster.devices_per_host)
                for rank in range(cluster.hosts)
            ]
            coordinator = ray.get(actors[0].coordinator_address.remote())
            refs = [actor.build.remote(config, coordinator) for actor in actors]
            return _first_result(refs)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(group)


def _first_result(refs: list[Any]) -> IndexResult:
    """Host 0's result; the first host to fail stops the build (its peers are then killed)."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                rank = refs.index(ref)
                cause = getattr(err, "cause", None)
                if isinstance(cause, ValueError | FileNotFoundError):
                    raise cause from err  # bad input: every host says the same
                raise HostFailure(
                    f"index host {rank}/{len(refs)} failed ({type(err).__name__}: {cause}); "
                    "the other hosts were stopped. Re-run the same command to resume from the "
                    "parts already written."
                ) from err
    return ray.get(refs[0])
