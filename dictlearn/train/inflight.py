"""Keeping steps in flight: the training loop never waits on the step it just dispatched.

JAX dispatches a step and returns at once; reading anything it computed (a metric, a flag)
waits for it. A loop that reads each step's metrics before dispatching the next leaves the
device idle for the host's turn-around every step. Here:

* :class:`DeferredMetrics` keeps each step's metrics on the device and reads them only when
  the loop needs them (log steps, one step late; checkpoints),
  checking every step's loss on the way, so a divergence is still named at the step it happened.
  It also bounds how far the host runs ahead (each queued step holds a batch on the device).
* :class:`PreemptionVote` agrees on a preemption across processes every ``every`` steps with a
  collective that is dispatched like a step and read one step later.
* :class:`StepSchedule` says what the loop does after each step (evaluate, save, stop, read the
  metrics now or one step late), the same for a single run and a group; :class:`MetricReads`
  carries out the reads it asks for.

Neither changes what is computed, so a resumed run stays bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from dictlearn.train.config import TrainConfig
from sharding import BATCH, DATA, named_sharding, replicated

MAX_STEPS_AHEAD = 2
"""Steps the host may dispatch beyond the newest finished one. Two keep the device busy while
the host fetches data and logs; more only hold more batches in device memory."""

PREEMPTION_CHECK_STEPS = 10
"""Steps between multi-process preemption votes (a single process checks its flag every step,
for free). A stop lands at most this many steps (+1) after the signal: ~10 s on a 1 s step, well
inside a cloud VM's 30 s notice."""


@dataclass(frozen=True)
class Diverged:
    """The first step since the last read whose loss (of some member) was not finite."""

    step: int
    member: int
    loss: float
    metrics: Any
    """That step's metrics, on the host (the same structure as the step's output)."""


class DeferredMetrics:
    """Metrics of the steps dispatched since the last read, still on the device.

    Args:
        losses: the loss scalars of one step's metrics (one per SAE of a group).
    """

    def __init__(self, losses: Callable[[Any], list[jax.Array]]):
        self._losses = losses
        self._steps: list[tuple[int, Any]] = []
        self._ahead: list[jax.Array] = []

    def add(self, step: int, metrics: Any) -> None:
        """Record step ``step``'s metrics (just dispatched); wait for an older step if the host
        is more than ``MAX_STEPS_AHEAD`` steps ahead of the device."""
        # No copy_to_host_async here: on CPU it cost ~5 ms a step at 256 latents (more than
        # the step); a scalar read after the step has finished is microseconds anyway.
        losses = self._losses(metrics)
        self._steps.append((step, metrics))
        self._ahead.append(losses[0])
        if len(self._ahead) > MAX_STEPS_AHEAD:
            jax.block_until_ready(self._ahead.pop(0))

    def read(self, upto: int) -> tuple[Any, Diverged | None]:
        """Host copies of step ``upto``'s metrics, and the first step up to it whose loss was
        not finite (None if all were). Waits for step ``upto`` only; forgets the steps read."""
        steps = [(s, m) for s, m in self._steps if s <= upto]
        self._steps = [(s, m) for s, m in self._steps if s > upto]
        if not steps or steps[-1][0] != upto:
            raise ValueError(f"step {upto} is not among the steps waiting to be read")
        losses = jax.device_get([self._losses(m) for _, m in steps])
        for (step, metrics), values in zip(steps, losses, strict=True):
            bad = [i for i, v in enumerate(values) if not math.isfinite(float(v))]
            if bad:
                host = jax.tree.map(float, jax.device_get(metrics))
                return host, Diverged(step, bad[0], float(values[bad[0]]), host)
        return jax.tree.map(float, jax.device_get(steps[-1][1])), None


class PreemptionVote:
    """Whether any process got a preemption signal, agreed at the same step by all of them.

    With one process the answer is its own flag, every step. With several, every ``every``
    steps each process dispatches a vote (an any-reduction over processes, queued behind the
    step like any computation) and reads the result one step later, when it is done: every
    process stops at the same step without draining the device.

    Args:
        mesh: the mesh every process's devices form.
        every: steps between votes.
    """

    def __init__(self, mesh: Mesh, every: int = PREEMPTION_CHECK_STEPS):
        self.every = every
        self._processes = jax.process_count()
        self._pending: jax.Array | None = None
        if self._processes > 1:
            self._rows = mesh.shape[DATA]  # the data axis splits evenly over processes
            self._sharding = named_sharding(mesh, (BATCH,))
            self._any = jax.jit(lambda votes: votes.any(), out_shardings=replicated(mesh))

    def __call__(self, step: int, raised: bool) -> bool:
        """After dispatching step ``step``: whether to stop (checkpoint) at it."""
        if self._processes == 1:
            return raised
        stop = False
        if self._pending is not None:
            stop = bool(jax.device_get(self._pending))
            self._pending = None
        if step % self.every == 0:
            local = np.full(self._rows // self._processes, raised, bool)
            votes = jax.make_array_from_process_local_data(self._sharding, local, (self._rows,))
            self._pending = self._any(votes)
        return stop


@dataclass(frozen=True)
class StepActions:
    """What the training loop does after dispatching a step."""

    evaluate: bool
    save: bool
    stop: bool
    read_now: bool
    """Read (and log) the metrics up to this step before going on: a save, an evaluation or a
    stop must follow a check of every loss so far."""
    read_next_step: bool
    """A log step with nothing else due: read it after the next step is dispatched."""


@dataclass(frozen=True)
class StepSchedule:
    """When a run logs, evaluates and saves; :meth:`after` turns that into a step's actions.

    Args:
        steps: the run's last step.
        log_every / eval_every / checkpoint_every: intervals in steps (``eval_every`` 0: never).
        keep_steps: steps that are saved (and kept) besides the interval's.
    """

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_steps: frozenset[int] = frozenset()

    @classmethod
    def of(cls, config: TrainConfig) -> StepSchedule:
        """The schedule of ``config``'s ``train`` and ``checkpoint`` sections."""
        return cls(
            steps=config.train.steps,
            log_every=config.train.log_every,
            eval_every=config.train.eval_every,
            checkpoint_every=config.checkpoint.every_steps,
            keep_steps=frozenset(config.checkpoint.keep_steps),
        )

    def logs(self, step: int) -> bool:
        """Whether ``step``'s metrics are logged."""
        return step % self.log_every == 0 or step == self.steps

    def after(self, done: int, stopping: bool, last_saved: int | None) -> StepActions:
        """The actions after step ``done`` (1-based) was dispatched; ``stopping``: the
        preemption vote's answer; ``last_saved``: the newest step checkpointed."""
        evaluate = bool(self.eval_every) and done % self.eval_every == 0
        save = (
            done % self.checkpoint_every == 0
            or done == self.steps
            or done in self.keep_steps
            or (stopping and last_saved != done)
        )
        read_now = save or evaluate or stopping
        return StepActions(
            evaluate=evaluate,
            save=save,
            stop=stopping,
            read_now=read_now,
            read_next_step=not read_now and done % self.log_every == 0,
        )


Host = TypeVar("Host")


class MetricReads(Generic[Host]):
    """Reads (and logs) metrics when a :class:`StepSchedule` asks: at once, or a log step's
    after the next step has been dispatched.

    Args:
        read_and_log: reads the metrics up to a step (checking every loss), logs them if it is a
            log step, and returns them on the host.
    """

    def __init__(self, read_and_log: Callable[[int], Host]):
        self._read_and_log = read_and_log
        self._due: int | None = None

    def after_step(self, done: int, actions: StepActions) -> Host | None:
        """The reads due after step ``done`` was dispatched; the newest metrics read, if any."""
        read = None
        if self._due is not None:
            read, self._due = self._read_and_log(self._due), None
        if actions.read_now:
            read = self._read_and_log(done)
        elif actions.read_next_step:
            self._due = done
        return read
