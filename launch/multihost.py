"""Multi-host training under Ray: one trainer actor per host, one multi-process JAX program.

    dictlearn train launch/configs/train_tpu_v5e_16.yaml ray.hosts=4 'ray.resources_per_host={TPU: 4}'

``dictlearn train`` comes here when ``ray.hosts > 1`` (or ``ray.resources_per_host`` is set);
``main(config) -> TrainResult`` is the entry point. It reserves one placement-group bundle per
host (all or nothing), starts a :class:`TrainHost` actor in each, lets host 0 pick the
coordinator's ``ip:port``, and every actor then joins ``jax.distributed`` and runs
``dictlearn.train.trainer.main(config)``: the mesh spans every host's devices, each process reads
its own slice of every global batch, and process 0 alone writes the config, metrics and W&B.

Faults: the driver watches every actor. If one dies (process killed, node lost) or raises, the
others are killed at once (they would otherwise sit in a collective until a timeout of minutes)
and :class:`HostFailure` names the last committed checkpoint; re-running the same command resumes
from it. SIGTERM to the driver (a preemption notice) is forwarded to every actor: they agree on a
step, save a checkpoint there, and the run returns ``preempted=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from dictlearn.config import ConfigError
from dictlearn.errors import UserError
from dictlearn.ray_cluster import ray_session
from dictlearn.train.config import ClusterConfig, TrainConfig
from sharding import MeshError
from sharding.distributed import Coordinator, free_port, initialize
from sharding.host_memory import reuse_freed_host_memory

# How often the driver looks at its actors and at a pending SIGTERM while it waits for results.
POLL_S = 0.2
# After a first failure that is not a dead host, how long to wait for a host death to be reported.
FAILURE_GRACE_S = 3.0
# How long Ray may take to mark killed hosts dead.
KILL_WAIT_S = 10.0

log = logging.getLogger(__name__)


class HostFailure(UserError, RuntimeError):
    """A trainer host died or failed; the message names the last committed checkpoint.

    Not a bug to report: re-running resumes from that checkpoint (a ``UserError``, one line).
    """


@dataclass(frozen=True)
class HostInfo:
    """Where one trainer actor runs."""

    rank: int
    node_id: str
    ip: str
    pid: int

    def describe(self, hosts: int) -> str:
        return f"trainer host {self.rank}/{hosts} (pid {self.pid} on {self.ip})"


class TrainHost:
    """One host's process of the multi-process training program (a Ray actor).

    Args:
        rank: this host's JAX process index.
        hosts: number of host processes.
        devices_per_host: virtual CPU devices for this process (tests), or None.
    """

    def __init__(self, rank: int, hosts: int, devices_per_host: int | None) -> None:
        reuse_freed_host_memory()  # this actor's process has not started JAX yet
        self.rank = rank
        self.hosts = hosts
        self.devices_per_host = devices_per_host

    def info(self) -> HostInfo:
        ctx = ray.get_runtime_context()
        return HostInfo(self.rank, ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid())

    def coordinator_address(self) -> str:
        """``ip:port`` for the JAX coordinator (asked of host 0 only)."""
        ip = ray.util.get_node_ip_address()
        return f"{ip}:{free_port(ip)}"

    def train(self, config: TrainConfig, coordinator_address: str) -> Any:
        """Join the JAX program, then run the trainer as this host's process."""
        initialize(
            Coordinator(coordinator_address, self.hosts, self.rank),
            cpu_devices=self.devices_per_host,
        )
        # Imported after initialize: nothing may touch a device before the program is joined.
        import jax

        from dictlearn.train.trainer import main

        # Only known here (the driver may not know the hosts' device counts): whether each host
        # holds whole rows of the data axis, i.e. the model axis stays within a host.
        per_host = jax.local_device_count()
        if per_host % config.mesh.model:
            raise ConfigError(
                f"mesh.model={config.mesh.model} spans hosts: keep it within one host "
                f"(a divisor of the {per_host} devices each host has)"
            )
        return main(config)


def main(config: TrainConfig) -> Any:
    """Train (or resume) ``config`` on ``config.ray.hosts`` hosts; see the module docstring.

    Returns:
        Host 0's :class:`~dictlearn.train.trainer.TrainResult`.

    Raises:
        ConfigError: the config cannot be split over the hosts.
        HostFailure: a host died or failed; the message names the checkpoint to resume from.
    """
    _check(config)
    cluster = config.ray
    with ray_session(
        cluster.address, actors=cluster.hosts, resources_per_actor=_bundles(cluster)[0]
    ):
        group = placement_group(_bundles(cluster), strategy="SPREAD")
        actors: list[Any] = []
        try:
            if not group.wait(timeout_seconds=cluster.start_timeout_s):
                raise HostFailure(
                    f"the Ray cluster has no room for ray.hosts={cluster.hosts} trainer actors of "
                    f"{_bundles(cluster)[0]} each after {cluster.start_timeout_s:g} s (it has "
                    f"{ray.cluster_resources()} in all); add hosts, or lower ray.hosts / "
                    "ray.resources_per_host / ray.cpus_per_host"
                )
            actors = [_start_actor(cluster, group, rank) for rank in range(cluster.hosts)]
            return _run(config, actors)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(group)


def _check(config: TrainConfig) -> None:
    cluster = config.ray
    if config.train.batch_size % cluster.hosts:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must be a multiple of "
            f"ray.hosts={cluster.hosts}: every host reads an equal slice of each batch"
        )
    if config.mesh.data != -1 and config.mesh.data % cluster.hosts:
        raise ConfigError(
            f"mesh.data={config.mesh.data} must be a multiple of ray.hosts={cluster.hosts}: "
            "each host reads its own rows of every batch, so the data axis is split across hosts"
        )
    if not _bundles(cluster)[0]:
        raise ConfigError(
            "ray.cpus_per_host=0 and no ray.resources_per_host: a trainer actor must reserve "
            "something, or hosts could share a machine; set ray.resources_per_host (e.g. {TPU: 4})"
        )
    if cluster.devices_per_host is not None:
        devices = cluster.hosts * cluster.devices_per_host
        data, model = config.mesh.data, config.mesh.model
        if devices % model or (data != -1 and data * model != devices):
            raise ConfigError(
                f"mesh.data={data} x mesh.model={model} does not tile ray.hosts="
                f"{cluster.hosts} x ray.devices_per_host={cluster.devices_per_host} = {devices} "
                "devices; set mesh.data=-1 or change the mesh"
            )
        if (devices // model) % cluster.hosts:
            raise ConfigError(
                f"mesh.model={model} spans hosts: keep it within one host "
                f"(a divisor of ray.devices_per_host={cluster.devices_per_host})"
            )


def _bundles(cluster: ClusterConfig) -> list[dict[str, float]]:
    bundle = {"CPU": cluster.cpus_per_host} | dict(cluster.resources_per_host)
    bundle = {k: v for k, v in bundle.items() if v}
    return [bundle] * cluster.hosts


def _start_actor(cluster: ClusterConfig, group: Any, rank: int) -> Any:
    resources = dict(cluster.resources_per_host)
    return (
        ray.remote(TrainHost)
        .options(
            num_cpus=cluster.cpus_per_host,
            num_gpus=resources.pop("GPU", 0),
            resources=resources,
            # A restarted host could not rejoin the JAX program; the whole run restarts instead.
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank
            ),
        )
        .remote(rank, cluster.hosts, cluster.devices_per_host)
    )


def _run(config: TrainConfig, actors: list[Any]) -> Any:
    hosts = len(actors)
    info_refs = [actor.info.remote() for actor in actors]
    infos: list[HostInfo] = _get_all(config, info_refs, [None] * hosts, actors)
    for info in infos:
        log.info("%s", info.describe(hosts))
    coordinator = _get_all(config, [actors[0].coordinator_address.remote()], infos[:1], actors)[0]
    train_refs = [actor.train.remote(config, coordinator) for actor in actors]
    with _SigtermForwarder(infos) as forwarder:
        results = _get_all(config, train_refs, infos, actors, poll=forwarder.poll)
    return results[0]


def _get_all(
    config: TrainConfig,
    refs: list[Any],
    infos: list[HostInfo | None],
    actors: list[Any],
    poll: Callable[[], None] | None = None,
) -> list[Any]:
    """Results of ``refs`` (one per host, in order); the first failure stops every host."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    failures: dict[int, Exception] = {}
    pending = list(refs)
    while pending and not failures:
        ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        if poll is not None:
            poll()
        _collect(ready, rank_of, results, failures)
    if failures:
        # A host that dies takes its peers' collectives down with it, and they may report their
        # own (secondary) errors first: a moment's grace lets the dead host be the one named.
        deadline = time.monotonic() + FAILURE_GRACE_S
        while pending and not any(
            isinstance(e, ray.exceptions.RayActorError) for e in failures.values()
        ):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            _collect(ready, rank_of, results, failures)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        # Their tasks fail once Ray has marked them dead and freed their resources, so that a
        # prompt re-run is not refused a place (the processes themselves exit moments later).
        still = [
            ref for ref in refs if rank_of[ref] not in results and rank_of[ref] not in failures
        ]
        if still:
            ray.wait(still, num_returns=len(still), timeout=KILL_WAIT_S)
        died = [r for r, e in failures.items() if isinstance(e, ray.exceptions.RayActorError)]
        rank = min(died or failures)
        raise _failure(config, failures[rank], rank, infos[rank], len(actors)) from failures[rank]
    return [results[rank] for rank in range(len(refs))]


def _collect(
    ready: list[Any],
    rank_of: dict[Any, int],
    results: dict[int, Any],
    failures: dict[int, Exception],
) -> None:
    for ref in ready:
        try:
            results[rank_of[ref]] = ray.get(ref)
        except ray.exceptions.RayError as err:
            failures[rank_of[ref]] = err


def _failure(
    config: TrainConfig, err: Exception, rank: int, info: HostInfo | None, hosts: int
) -> BaseException:
    """The exception to raise for host ``rank``'s failure ``err`` (the others are stopped)."""
    cause = getattr(err, "cause", None)
    # The trainer's own clear errors (bad config or data, a checkpoint of another run,
    # divergence) are raised by every host alike and already say what to do: pass them on.
    if isinstance(cause, UserError | MeshError):
        return cause
    who = info.describe(hosts) if info is not None else f"trainer host {rank}/{hosts}"
    if isinstance(err, ray.exceptions.RayTaskError):
        what = f"{who} failed with {type(cause).__name__}: {cause}"
    else:
        what = f"{who} died ({type(err).__name__})"
    return HostFailure(f"{what}; the other hosts were stopped. {last_checkpoint_sentence(config)}")


def last_checkpoint_sentence(config: TrainConfig) -> str:
    """Which committed checkpoint a re-run of ``config`` resumes from, as a sentence."""
    from dictlearn.train.checkpoint import Checkpointer
    from dictlearn.train.trainer import checkpoint_dir_of

    directory = checkpoint_dir_of(config)
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if step is None:
        return f"No checkpoint was committed in {directory} yet: re-running starts over."
    return (
        f"The last committed checkpoint is step {step} in {directory}; re-run the same "
        "command to resume from it."
    )


class _SigtermForwarder:
    """While training, a SIGTERM to the driver (preemption) is passed on to every host once.

    The hosts' trainers turn it into "checkpoint at an agreed step, then return"; the driver
    keeps waiting for their results.
    """

    def __init__(self, infos: list[HostInfo]) -> None:
        self.infos = infos
        self.raised = False
        self.forwarded = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermForwarder:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to forward
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def poll(self) -> None:
        if self.raised and not self.forwarded:
            self.forwarded = True
            signal_hosts(self.infos, signal.SIGTERM)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def signal_hosts(infos: list[HostInfo], signum: int) -> None:
    """Send ``signum`` to every trainer actor's process, on whichever node it runs."""
    here = ray.get_runtime_context().get_node_id()
    remote = []
    for info in infos:
        if info.node_id == here:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signum)
        else:
            strategy = NodeAffinitySchedulingStrategy(info.node_id, soft=False)
            remote.append(
                _send_signal.options(num_cpus=0, scheduling_strategy=strategy).remote(
                    info.pid, signum
                )
            )
    if remote:
        ray.wait(remote, num_returns=len(remote), timeout=30)


@ray.remote
def _send_signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
