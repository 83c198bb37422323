"""The pipeline's train stage on several hooks: each hook's group on a Ray worker of its own.

    dictlearn pipeline 'generate.hooks=[resid_post.3, resid_post.6]' 'train.widths=[4096, 16384]'
    dictlearn pipeline ... train.hook_workers.gpus=1            # one GPU per hook's group

``dictlearn pipeline`` comes here (:func:`run_on_workers`) when ``train.widths`` gives every one
of several generated hooks a group of SAEs (Gemma Scope's shape). Each hook's group trains in a
Ray actor of its own, concurrently with the others, on the cluster ``dictlearn generate`` would
use (the one this process is connected to, ``address``, or a local one started for the stage).
A worker reserves ``cpus``, ``gpus`` and ``resources`` (Ray then gives it only its own GPUs),
trains its group into the stage directory the pipeline planned for that hook, and is killed when
it returns, so its accelerator is free for the next hook or the eval stage.

Faults are per hook: a group that raises (or whose worker died more than ``max_restarts``
times; a restarted worker resumes from the group's newest checkpoint) is reported with its
error, and the other hooks go on. The pipeline writes each finished hook's ``stage.json`` as
soon as it returns, so a re-run skips the finished hooks and retries only the failed ones.
SIGTERM to the pipeline (a preemption) is passed on to the running workers: each group
checkpoints and returns, and hooks not started yet are left for the re-run.

A single hook's group (or ``parallel: false``) trains in the pipeline's process, as before.
When the same run also generates the activations on a local cluster, both stages share one
(:func:`shared_local_cluster`): starting a cluster costs 6-13 s, far more on a loaded machine.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from dictlearn.activations.config import RayConfig
from dictlearn.config import StrictModel

# How often the driver looks at its workers (and at a pending SIGTERM), how often it reads the
# groups' metrics.jsonl files to move the progress bar, and how often it repeats a SIGTERM to a
# worker whose group has not returned yet.
POLL_S = 0.2
PROGRESS_EVERY_S = 5.0
RESIGNAL_EVERY_S = 5.0


class HookWorkersConfig(StrictModel):
    """``train.hook_workers``: where the train stage runs its hooks' groups when there are several.

    Execution only: none of these fields is part of a stage's version.
    """

    parallel: bool = Field(
        True,
        description=(
            "With train.widths on several hooks, train each hook's group on a Ray worker of its "
            "own, all at once; false: one after another in the pipeline's process."
        ),
    )
    address: str | None = Field(
        None,
        description=(
            "null: the Ray this process is connected to, or $RAY_ADDRESS, else a local cluster "
            "started for the stage; 'auto' or 'host:6379': join that cluster (as generate.ray)."
        ),
    )
    cpus: float = Field(1.0, ge=0, description="Ray CPUs each hook's worker reserves.")
    gpus: float = Field(
        0.0,
        ge=0,
        description=(
            "GPUs each hook's worker reserves; Ray shows a worker only its own. Set it on GPU "
            "machines: a worker that reserves none sees (and allocates on) every GPU."
        ),
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Other Ray resources each worker reserves, e.g. {TPU: 4} for a TPU host.",
    )
    max_concurrent: int | None = Field(
        None,
        gt=0,
        description=(
            "Hook groups training at once (null: every hook); a local cluster is started with "
            "room for this many workers (with gpus: at most the GPUs the machine has)."
        ),
    )
    max_restarts: int = Field(
        1,
        ge=0,
        description=(
            "Restarts of a worker that died (killed, node lost); its group resumes from its "
            "newest checkpoint. A group that raises an error is reported, not retried."
        ),
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        description=(
            "Seconds a hook's worker may wait for room on the cluster (an autoscaler may be "
            "adding nodes) before that hook is reported failed."
        ),
    )

    @field_validator("resources")
    @classmethod
    def _no_cpus_or_gpus(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"set {name}s with {name.lower()}s, not resources.{name}")
            if amount < 0:
                raise ValueError(f"resource {name!r} must be >= 0, got {amount}")
        return resources

    def concurrency(self, hooks: int) -> int:
        """How many of ``hooks`` groups train at once."""
        return min(hooks, self.max_concurrent or hooks)

    def ray_config(self, hooks: int) -> RayConfig:
        """The worker pool as ``dictlearn generate``'s :class:`RayConfig` (one worker per hook
        group at a time), for its ``actor_options`` and cluster sizing."""
        return RayConfig(
            address=self.address,
            num_workers=self.concurrency(hooks),
            cpus_per_worker=self.cpus,
            resources_per_worker=({"GPU": self.gpus} if self.gpus else {}) | self.resources,
            max_restarts=self.max_restarts,
            # A worker that died mid-group runs the group again, which resumes from its newest
            # checkpoint; an error the group raised is not retried (Ray's default for actors).
            max_task_retries=self.max_restarts,
            start_timeout_s=self.start_timeout_s,
        )


def shared_cluster_resources(
    generate: RayConfig, workers: HookWorkersConfig, hooks: int
) -> dict[str, float]:
    """Resources of one local cluster with room for the generate stage's ``generate`` workers
    and then for ``hooks`` groups' workers (whichever asks for more of each resource)."""
    pool = workers.ray_config(hooks)
    totals: dict[str, float] = {}
    for rc in (generate, pool):
        for name, amount in ({"CPU": rc.cpus_per_worker} | rc.resources_per_worker).items():
            totals[name] = max(totals.get(name, 0.0), amount * rc.num_workers)
    return totals


@contextlib.contextmanager
def shared_local_cluster(
    generate: RayConfig, workers: HookWorkersConfig, hooks: int
) -> Iterator[None]:
    """A local Ray cluster that the generate stage and then the hooks' workers both join (their
    ``ray_session`` finds it connected); nothing if either names a cluster or one is connected.
    """
    import ray

    if generate.address or workers.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        yield
        return
    from dictlearn.ray_cluster import local_ray_cluster

    totals = shared_cluster_resources(generate, workers, hooks)
    with local_ray_cluster(
        num_cpus=max(1, math.ceil(totals.pop("CPU", 0))),
        num_gpus=totals.pop("GPU", 0),
        resources=totals,
    ):
        yield


@dataclass(frozen=True)
class WorkerJob:
    """One hook's group, to be trained on a worker of its own.

    Attributes:
        key: the stage's key in the pipeline's plan, e.g. ``train:resid_post.6``.
        config: the argument the runner is called with on the worker (the group's config).
        steps: the group's total steps (for the progress bar).
        metrics_dir: a run directory whose ``metrics.jsonl`` shows how far the group is.
    """

    key: str
    config: Any
    steps: int
    metrics_dir: str


@dataclass
class WorkerOutcome:
    """What one job's worker did: a result, an error, or nothing (never started: SIGTERM)."""

    key: str
    result: dict[str, Any] | None
    error: str | None
    seconds: float
    where: str = ""

    @property
    def started(self) -> bool:
        return self.result is not None or self.error is not None


class HookWorker:
    """A Ray actor that trains one hook's group (and is killed afterwards)."""

    def __init__(self) -> None:
        from sharding.host_memory import reuse_freed_host_memory

        reuse_freed_host_memory()  # this actor's process has not started JAX yet
        # The driver shows one progress bar over every hook; per-worker bars would interleave
        # in its output (Ray forwards the workers' stderr line by line).
        os.environ["TQDM_DISABLE"] = "1"
        # SIGTERM means "checkpoint and return" only once the group's training loop listens
        # for it; until then (imports, compiling) it must not kill the worker, which Ray would
        # restart and run the group again. The driver repeats it until the group returns.
        with contextlib.suppress(ValueError):  # not the main thread: Ray's default stands
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def info(self) -> Any:
        """Where this worker runs (for the log and for forwarding SIGTERM)."""
        import ray

        from launch.multihost import HostInfo

        ctx = ray.get_runtime_context()
        return HostInfo(0, ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid())

    def run(self, runner: Callable[[Any], dict[str, Any]], config: Any) -> dict[str, Any]:
        return runner(config)


def run_on_workers(
    jobs: list[WorkerJob],
    runner: Callable[[Any], dict[str, Any]],
    workers: HookWorkersConfig,
    on_finished: Callable[[WorkerOutcome], None],
) -> list[WorkerOutcome]:
    """Run ``runner(job.config)`` for every job, each on a Ray worker of its own.

    At most ``workers.concurrency(len(jobs))`` run at once; the rest wait for a free worker.
    ``on_finished`` is called in this process as each job ends (so its result is committed even
    if a later job fails or the process is stopped); one line per started and finished job and a
    progress bar over every job's steps are printed.

    Returns:
        One outcome per job, in ``jobs`` order; a failed job's has ``error`` set.
    """
    import ray
    from tqdm.auto import tqdm

    from dictlearn.ray_cluster import ray_session
    from launch.multihost import signal_hosts

    rc = workers.ray_config(len(jobs))
    bar = tqdm(
        total=sum(j.steps for j in jobs),
        unit="step",
        desc=f"train ({len(jobs)} hooks, {rc.num_workers} at once)",
        disable=bool(os.environ.get("TQDM_DISABLE")),
        file=sys.stdout,
        dynamic_ncols=True,
    )
    outcomes: dict[str, WorkerOutcome] = {}
    pending = collections.deque(jobs)
    running: dict[Any, _Running] = {}  # the job's result ref -> its worker
    progress = _Progress(bar)
    tag = os.urandom(4).hex()
    resources = {"CPU": rc.cpus_per_worker} | rc.resources_per_worker
    with (
        bar,
        ray_session(rc.address, actors=rc.num_workers, resources_per_actor=resources),
        _sigterm_flag() as stopped,
    ):
        actor_cls = ray.remote(HookWorker)
        try:
            while pending or running:
                while pending and len(running) < rc.num_workers and not stopped():
                    job = pending.popleft()
                    name = f"dictlearn-pipeline-{tag}-{job.key.replace(':', '-')}"
                    actor = actor_cls.options(**rc.actor_options(name)).remote()
                    # An actor runs its calls in order: info first, so it answers once placed.
                    info_ref = actor.info.remote()
                    ref = actor.run.remote(runner, job.config)
                    running[ref] = _Running(job, actor, info_ref, time.perf_counter())
                if not running:
                    break  # stopped (SIGTERM) with nothing left running
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for r in running.values():
                    _check_placed(r, rc, bar)
                if stopped():
                    _pass_on_sigterm(running, pending, signal_hosts)
                timed_out = [ref for ref, r in running.items() if r.timed_out]
                for ref in dict.fromkeys(ready + timed_out):
                    if ref not in running:
                        continue  # dropped by _pass_on_sigterm: its job waits for a re-run
                    r = running.pop(ref)
                    outcome = _outcome(r, ref, resources)
                    ray.kill(r.actor, no_restart=True)
                    progress.finish(r.job, outcome)
                    outcomes[r.job.key] = outcome
                    on_finished(outcome)
                    bar.write(_finished_line(outcome, r.job))
                progress.poll([r.job for r in running.values()])
        finally:
            for r in running.values():
                ray.kill(r.actor, no_restart=True)
    for job in pending:
        bar.write(f"[{job.key}] not started: the pipeline was stopped (SIGTERM)")
    return [outcomes.get(j.key) or WorkerOutcome(j.key, None, None, 0.0) for j in jobs]


def _pass_on_sigterm(
    running: dict[Any, _Running], pending: collections.deque[WorkerJob], signal_hosts: Any
) -> None:
    """SIGTERM each placed worker (its group checkpoints and returns), again every few seconds
    in case its training loop was not listening yet; a worker not placed yet has trained
    nothing: it is dropped and its job left for the re-run, as are pending ones."""
    import ray

    now = time.perf_counter()
    due = [r for r in running.values() if r.info is not None and now >= r.signal_again_at]
    signal_hosts([r.info for r in due], signal.SIGTERM)
    for r in due:
        r.signal_again_at = now + RESIGNAL_EVERY_S
    for ref, r in list(running.items()):
        if r.info is None:
            ray.kill(r.actor, no_restart=True)
            pending.appendleft(running.pop(ref).job)


@dataclass
class _Running:
    job: WorkerJob
    actor: Any
    info_ref: Any
    started: float
    info: Any = None
    timed_out: bool = False
    signal_again_at: float = 0.0


def _check_placed(r: _Running, rc: RayConfig, bar: Any) -> None:
    """Note where a new worker landed; give up on one the cluster has no room for."""
    import ray

    if r.info is not None or r.timed_out:
        return
    ready, _ = ray.wait([r.info_ref], timeout=0)
    if ready:
        try:
            r.info = ray.get(ready[0])
        except ray.exceptions.RayError:
            return  # the worker died before it could answer: its job's ref reports it
        bar.write(f"[{r.job.key}] training on a Ray worker (pid {r.info.pid} on {r.info.ip})")
    elif time.perf_counter() - r.started > rc.start_timeout_s:
        r.timed_out = True


def _outcome(r: _Running, ref: Any, reserved: dict[str, float]) -> WorkerOutcome:
    import ray

    seconds = time.perf_counter() - r.started
    where = f"pid {r.info.pid} on {r.info.ip}" if r.info is not None else ""
    if r.timed_out:
        error = (
            f"no room on the Ray cluster for its worker within {seconds:.0f} s; each hook's "
            f"worker reserves {reserved} "
            f"(the cluster has {ray.cluster_resources()}); lower train.hook_workers.cpus/gpus/"
            "resources or max_concurrent, or raise start_timeout_s"
        )
        return WorkerOutcome(r.job.key, None, error, seconds, where)
    try:
        return WorkerOutcome(r.job.key, ray.get(ref), None, seconds, where)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        error = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
    except ray.exceptions.RayError as err:
        error = f"its worker died ({type(err).__name__}; restarted at most max_restarts times)"
    return WorkerOutcome(r.job.key, None, error, seconds, where)


def _finished_line(outcome: WorkerOutcome, job: WorkerJob) -> str:
    if outcome.error is not None:
        return f"[{job.key}] FAILED after {outcome.seconds:.0f} s: {outcome.error}"
    assert outcome.result is not None
    if outcome.result.get("preempted"):
        return f"[{job.key}] stopped by SIGTERM after a checkpoint; re-run to resume"
    return f"[{job.key}] finished in {outcome.seconds:.0f} s"


class _Progress:
    """Moves the bar by the steps each group has logged (read from its ``metrics.jsonl``)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.done: dict[str, int] = {}
        self.last_poll = 0.0

    def poll(self, jobs: list[WorkerJob]) -> None:
        if self.bar.disable or time.perf_counter() - self.last_poll < PROGRESS_EVERY_S:
            return
        self.last_poll = time.perf_counter()
        from dictlearn.tracking import read_metrics

        for job in jobs:
            try:
                rows = read_metrics(job.metrics_dir)
            except (FileNotFoundError, OSError):
                continue  # not started logging yet
            steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
            if steps:
                self._advance(job, min(max(steps), job.steps))

    def finish(self, job: WorkerJob, outcome: WorkerOutcome) -> None:
        if outcome.result is not None and not outcome.result.get("preempted"):
            self._advance(job, job.steps)

    def _advance(self, job: WorkerJob, step: int) -> None:
        before = self.done.get(job.key, 0)
        if step > before:
            self.done[job.key] = step
            self.bar.update(step - before)


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[Callable[[], bool]]:
    """While training, a SIGTERM to this process (a preemption) only raises a flag: the loop
    passes it on to the workers, whose groups checkpoint and return."""
    raised = False

    def handle(signum: int, frame: Any) -> None:
        nonlocal raised
        raised = True

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: nothing to catch
        previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield lambda: raised
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
