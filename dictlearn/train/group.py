"""Several SAEs on one batch stream: one jitted step updates them all.

    dictlearn train launch/configs/train_group_tiny.yaml

A :class:`~dictlearn.train.config.GroupTrainConfig` lists members (widths, k, learning rates,
seeds, architectures) over shared data, batch size, steps and mesh. Each member is an ordinary
:class:`TrainProgram`; :class:`GroupProgram` jits one function that runs every member's pure
``_train_step`` on the same batch, side by side, so the batch is read, transferred and normalised
once and XLA schedules the members' work in one program. Each member keeps its own parameters,
optimizer, dead-latent counters, metrics and run directory ``<run.output_dir>/<member name>``
(``config.yaml`` is the member's resolved single-SAE config, so ``dictlearn export`` and a resume
of that config alone work on it); all members checkpoint at the same steps.

Why side by side and not ``jax.vmap`` over stacked same-shape members: see ``README.md``
("Several SAEs at once").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from dictlearn.config import to_yaml
from dictlearn.data import ActivationDataset
from dictlearn.data.storage import write_bytes_atomic
from dictlearn.errors import UserError
from dictlearn.tracking import Tracker
from dictlearn.train.checkpoint import Checkpointer
from dictlearn.train.config import GroupTrainConfig, TrainConfig
from dictlearn.train.inflight import (
    DeferredMetrics,
    MetricReads,
    PreemptionVote,
    StepSchedule,
)
from dictlearn.train.step import TrainProgram, TrainState
from dictlearn.train.trainer import (
    TrainResult,
    _all_finite,
    _config_differences,
    _diverged,
    _finished_result,
    _planted_recovery,
    _PreemptionFlag,
    _stream,
    _Throughput,
    build_program,
    calibrated_after_last_step,
    check_schedule_change,
    checkpoint_dir_of,
    initialised_from_first_batch,
    log_dead_window,
    log_save,
    open_dataset,
    prepare_run_dir,
    run_dir_of,
)
from sharding import make_mesh, replicated

log = logging.getLogger(__name__)


class GroupProgram:
    """One jitted step over a tuple of member states, all on the same batch.

    Args:
        programs: one :class:`TrainProgram` per member, on the same mesh, global batch and input
            normalisation (they share the batch array).
    """

    def __init__(self, programs: Sequence[TrainProgram]):
        if not programs:
            raise ValueError("a group needs at least one member")
        first = programs[0]
        for p in programs[1:]:
            if p.mesh is not first.mesh and p.mesh != first.mesh:
                raise ValueError("group members must share one mesh")
            if (p.global_batch, p.arch.d_model, p.norm_scale) != (
                first.global_batch,
                first.arch.d_model,
                first.norm_scale,
            ):
                raise ValueError("group members must share batch size, d_model and norm_scale")
        self.programs = tuple(programs)
        self.mesh = first.mesh
        self.global_batch = first.global_batch
        self.batch_sharding = first.batch_sharding
        self.state_shardings = tuple(p.state_shardings for p in self.programs)
        self._steps: dict[tuple[bool, ...] | None, Any] = {}

    def step_fn(self, any_dead: Sequence[bool] | None = None):
        """The jitted ``group_step(states, batch) -> (states, metrics)`` (states donated).

        ``states`` and ``metrics`` are tuples in member order. ``any_dead`` (see
        :meth:`TrainProgram.step_fn`): None lets each member switch its dead-latent losses on
        the device; a tuple of bools fixes them per member. Each value compiles once.
        """
        flags = (
            None
            if any_dead is None
            else tuple(
                bool(f) and p.arch.uses_dead_latents
                for f, p in zip(any_dead, self.programs, strict=True)
            )
        )
        if flags not in self._steps:
            programs = self.programs
            per_member = flags if flags is not None else (None,) * len(programs)

            def group_step(states: tuple[TrainState, ...], batch: jax.Array):
                outs = [
                    p._train_step(s, batch, any_dead=f)
                    for p, s, f in zip(programs, states, per_member, strict=True)
                ]
                return tuple(o[0] for o in outs), tuple(o[1] for o in outs)

            rep = replicated(self.mesh)
            self._steps[flags] = jax.jit(
                group_step,
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, tuple(rep for _ in programs)),
                donate_argnums=(0,),
            )
        return self._steps[flags]

    def global_batch_array(self, local_rows) -> jax.Array:
        """This process's rows as the global, data-sharded batch every member reads."""
        return self.programs[0].global_batch_array(local_rows)


def build_group_program(
    members: Sequence[TrainConfig], dataset: ActivationDataset, mesh=None
) -> GroupProgram:
    """A :class:`GroupProgram` of the members' programs, on one mesh (default: the first's)."""
    mesh = mesh if mesh is not None else make_mesh(members[0].mesh)
    return GroupProgram([build_program(m, dataset, mesh=mesh) for m in members])


@dataclass
class GroupResult:
    """What a finished (or stopped) group run reports: one :class:`TrainResult` per member."""

    name: str
    members: dict[str, TrainResult]
    tokens_per_s: float | None = None
    """Global-batch tokens per second of the whole group (each member saw them all)."""

    @property
    def preempted(self) -> bool:
        return any(r.preempted for r in self.members.values())


class _Member:
    """Host-side bookkeeping of one member: config, run dir, checkpointer, tracker."""

    def __init__(self, config: TrainConfig, group_name: str):
        self.config = config
        self.name = config.run_name
        self.run_dir = run_dir_of(config)
        self.ckpt_dir = checkpoint_dir_of(config)
        self.config_dict = config.model_dump(mode="json")
        self.group_name = group_name
        self.checkpointer = Checkpointer.run_writer(self.ckpt_dir, config.checkpoint)
        self.tracker: Tracker | None = None

    def start_tracking(self, is_lead: bool, start_step: int) -> None:
        if is_lead:
            fs, path = fsspec.core.url_to_fs(self.run_dir)
            fs.makedirs(path, exist_ok=True)
            # Atomic: a full disk leaves the old config.yaml (or none), never half of one.
            write_bytes_atomic(fs, f"{path.rstrip('/')}/config.yaml", to_yaml(self.config).encode())
        self.tracker = Tracker(
            self.run_dir,
            self.config_dict,
            start_step=start_step,
            wandb_mode=self.config.tracker.wandb_mode,
            project=self.config.tracker.project,
            entity=self.config.tracker.entity,
            name=self.name,
            group=self.group_name,
            side_by_side=True,
            enabled=is_lead,
        )

    def close(self) -> None:
        self.checkpointer.close()
        if self.tracker is not None:
            self.tracker.close()


def _resume_step(members: Sequence[_Member]) -> int | None:
    """The newest step every member has a checkpoint of (None: start fresh).

    Members save at the same steps, but a stop can land between two members' saves; the run
    then resumes all of them from the newest step they have in common.
    """
    if members[0].config.checkpoint.resume == "never":
        return None
    steps = [set(m.checkpointer.all_steps()) for m in members]
    if not any(steps):
        return None
    common = set.intersection(*steps)
    if not common:
        have = ", ".join(
            f"{m.name}: {sorted(s) or 'none'}" for m, s in zip(members, steps, strict=True)
        )
        raise UserError(
            f"the group's members have no checkpoint step in common ({have}); a member added "
            "to a started group needs its own run (or checkpoint.resume=never to start over)"
        )
    return max(common)


def _initial_states(
    members: Sequence[_Member],
    group: GroupProgram,
    dataset: ActivationDataset,
    config: GroupTrainConfig,
) -> tuple[list[TrainState], int]:
    for m in members:  # before anything in the members' run directories changes
        prepare_run_dir(m.config, m.checkpointer)
    step = _resume_step(members)
    if step is None:
        log.info("starting group of %d members at step 0 (no checkpoint to resume)", len(members))
        mean = jnp.asarray(dataset.mean)
        states = [
            p.init(jax.random.key(m.config.train.param_seed), mean)
            for m, p in zip(members, group.programs, strict=True)
        ]
        return initialised_from_first_batch(group.programs, states, config, dataset), 0
    states, positions = [], set()
    for m, p in zip(members, group.programs, strict=True):
        diffs = _config_differences(m.checkpointer.restore_config(step), m.config_dict)
        if diffs:
            raise UserError(
                f"{m.checkpointer.directory} holds a checkpoint of a different run:\n  "
                + "\n  ".join(diffs)
                + "\nuse another member name, or checkpoint.resume=never to start over in place"
            )
        check_schedule_change(m.checkpointer.restore_config(step), m.config, step)
        restored = m.checkpointer.restore(p.abstract_state(), step)
        # A member saved past the common step (the stop landed between saves): the resumed run
        # writes those steps again, so the leftovers go.
        for later in [s for s in m.checkpointer.all_steps() if s > step]:
            m.checkpointer.delete(later)
        states.append(restored.state)
        positions.add(restored.data_position)
    if len(positions) != 1:
        raise UserError(f"members' checkpoints at step {step} have different data positions")
    log.info(
        "resuming group of %d members from step %d (checkpoints %s/%d, ...)",
        len(members),
        step,
        members[0].checkpointer.directory,
        step,
    )
    return states, positions.pop()


def evaluate_group(
    group: GroupProgram, states: Sequence[TrainState], config: TrainConfig, dataset
) -> list[dict[str, float]]:
    """Each member's mean metrics over the same held-out batches (read once for all)."""
    n = len(group.programs)
    if config.data.eval_fraction == 0 or config.train.eval_batches == 0:
        return [{} for _ in range(n)]
    totals: list[dict[str, float]] = [{} for _ in range(n)]
    with _stream(config, dataset, "eval", position=0) as stream:
        for _ in range(config.train.eval_batches):
            batch = group.global_batch_array(next(stream))
            outs = jax.device_get(
                [p.eval_step(s, batch) for p, s in zip(group.programs, states, strict=True)]
            )
            for total, m in zip(totals, outs, strict=True):
                for k, v in m.items():
                    total[k] = total.get(k, 0.0) + float(v)
    return [{k: v / config.train.eval_batches for k, v in t.items()} for t in totals]


def main(config: GroupTrainConfig) -> GroupResult:
    """Train (or resume) every member of ``config`` together; see the module docstring."""
    member_configs = config.members()
    dataset = open_dataset(member_configs[0])
    group = build_group_program(member_configs, dataset)
    for member_config, program in zip(member_configs, group.programs, strict=True):
        log_dead_window(member_config, program)
    members = [_Member(c, config.run_name) for c in member_configs]
    steps, batch_size = config.train.steps, config.train.batch_size
    is_lead = jax.process_index() == 0
    tokens_per_s = None
    try:
        states, position = _initial_states(members, group, dataset, config)
        start_step = int(jax.device_get(states[0].step))
        if start_step >= steps:
            return GroupResult(
                config.run_name,
                {
                    m.name: _finished_result(m.run_dir, m.ckpt_dir, start_step, m.config)
                    for m in members
                },
            )
        for m in members:
            m.start_tracking(is_lead, start_step)
        metrics: list[dict[str, float]] = [{} for _ in members]
        eval_metrics: list[dict[str, float]] = [{} for _ in members]
        last_saved = start_step or None
        schedule = StepSchedule.of(config)
        preempted = False
        with _stream(config, dataset, "train", position) as stream, _PreemptionFlag() as stop:
            bar = tqdm(
                total=steps,
                initial=start_step,
                disable=not is_lead or bool(os.environ.get("TQDM_DISABLE")),
                unit="step",
                dynamic_ncols=True,
            )
            throughput = _Throughput()
            # As in ``trainer.main``: metrics read at log steps, one step late.
            deferred = DeferredMetrics(lambda ms: [m["loss"] for m in ms])
            vote = PreemptionVote(group.mesh)

            def read_and_log(upto: int) -> list[dict[str, float]]:
                host, diverged = deferred.read(upto)
                if diverged is not None:
                    member = members[diverged.member]
                    member.tracker.log(diverged.step, diverged.metrics[diverged.member])
                    raise _diverged(
                        member.checkpointer,
                        f"member {member.name}: loss became {diverged.loss} at step "
                        f"{diverged.step}",
                    )
                host = list(host)
                if schedule.logs(upto):
                    rate = throughput.rate()
                    for member, m in zip(members, host, strict=True):
                        if rate is not None:
                            m["tokens_per_s"] = rate
                        member.tracker.log(upto, m | {"tokens": upto * batch_size})
                    if rate is not None:
                        bar.set_postfix(tok_s=f"{rate:.0f}", members=len(members))
                return host

            reads = MetricReads(read_and_log)
            for step in range(start_step, steps):
                batch = group.global_batch_array(next(stream))
                states, device_metrics = group.step_fn()(tuple(states), batch)
                done = step + 1
                if done == steps:
                    with throughput.paused():
                        states = calibrated_after_last_step(
                            group.programs, states, config, dataset, stream.position
                        )
                deferred.add(done, device_metrics)
                throughput.add(batch_size)
                bar.update(1)
                actions = schedule.after(done, vote(done, stop.raised), last_saved)
                # Every loss up to here is checked (and this step logged) before a save.
                read = reads.after_step(done, actions)
                metrics = metrics if read is None else read
                if actions.evaluate:
                    with throughput.paused():
                        eval_metrics = evaluate_group(group, states, config, dataset)
                    for member, e in zip(members, eval_metrics, strict=True):
                        member.tracker.log(done, e, prefix="eval/")
                if actions.save:
                    for member, s in zip(members, states, strict=True):
                        if not _all_finite(s):
                            raise _diverged(
                                member.checkpointer,
                                f"member {member.name}: the state became NaN/Inf at step {done}",
                            )
                    with throughput.paused():
                        for member, s in zip(members, states, strict=True):
                            # Rows first: see the single-run trainer.
                            member.tracker.flush()
                            member.checkpointer.save(done, s, stream.position, member.config_dict)
                    for member in members:
                        log_save(done, member.checkpointer, config.checkpoint.async_save)
                    last_saved = done
                if actions.stop:
                    preempted = True
                    break
            bar.close()
            tokens_per_s = throughput.overall()
        for member in members:
            member.checkpointer.wait()
        final_step = int(jax.device_get(states[0].step))
        if not preempted and final_step == steps:
            final_eval = evaluate_group(group, states, config, dataset)
            for i, (member, s) in enumerate(zip(members, states, strict=True)):
                eval_metrics[i] = final_eval[i] or eval_metrics[i]
                if eval_metrics[i]:
                    member.tracker.log(final_step, eval_metrics[i], prefix="eval/")
                recovery = _planted_recovery(dataset, s)
                if recovery is not None:
                    eval_metrics[i]["planted_recovery"] = recovery
                    member.tracker.log(final_step, {"planted_recovery": recovery})
                member.tracker.summary(
                    metrics[i] | {f"eval/{k}": v for k, v in eval_metrics[i].items()}
                )
    finally:
        for member in members:
            member.close()
    return GroupResult(
        config.run_name,
        {
            member.name: TrainResult(
                run_dir=member.run_dir,
                checkpoint_dir=member.ckpt_dir,
                steps=final_step,
                tokens=final_step * batch_size,
                metrics=metrics[i],
                eval_metrics=eval_metrics[i],
                preempted=preempted,
            )
            for i, member in enumerate(members)
        },
        tokens_per_s=tokens_per_s,
    )
