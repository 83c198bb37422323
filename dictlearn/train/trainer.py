"""``dictlearn train``: train an SAE on an activation dataset.

    dictlearn train launch/configs/train_tiny.yaml data.path=/data/acts train.steps=2000

``main(config) -> TrainResult`` is the entry point (the CLI only parses and calls it). The run
directory ``<run.output_dir>/<run name>`` holds ``config.yaml`` (the resolved config),
``metrics/`` (see :mod:`dictlearn.tracking`), W&B's offline files and ``checkpoints/``.
Re-running the same command resumes from the newest checkpoint; the result is bit-identical to a
run that was never interrupted. A run directory that holds another run (a different
``config.yaml``, or checkpoints under ``checkpoint.resume=never``) is refused before any step
runs; ``checkpoint.resume=overwrite`` empties it on purpose.

Progress goes to the ``dictlearn.train`` logger (the CLI shows it on stderr): where the run
starts or resumes from, and each checkpoint save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from dictlearn.config import (
    Effect,
    differences,
    fields_with,
    to_yaml,
    without_fields,
)
from dictlearn.data import ActivationDataset, BatchStream, DatasetError
from dictlearn.data.planted import load_planted_truth, recovery_score
from dictlearn.data.storage import write_bytes_atomic
from dictlearn.errors import UserError
from dictlearn.sae import get_architecture
from dictlearn.sae.base import DEAD_WINDOW_AVERAGE_FIRES
from dictlearn.tracking import Tracker, has_metrics, read_metrics
from dictlearn.train.checkpoint import Checkpointer
from dictlearn.train.config import OptimizerConfig, TrainConfig, comparable
from dictlearn.train.inflight import (
    DeferredMetrics,
    MetricReads,
    PreemptionVote,
    StepSchedule,
)
from dictlearn.train.lr_law import extrapolation_note
from dictlearn.train.optimizer import decay_start_step
from dictlearn.train.step import TrainProgram, TrainState
from sharding import make_mesh

log = logging.getLogger(__name__)

# Config fields that may change between a run and its resumption (from the fields' marking,
# dictlearn.config.Effect): how it runs, what its evaluation reports, where its schedule ends
# (checked against the steps already run), and the lr's peak and warm-up (the standard response
# to a divergence, which the divergence message suggests; the result is then no longer
# bit-identical).
RESUMABLE_CHANGES = fields_with(
    TrainConfig, {Effect.EXECUTION, Effect.EVALUATION, Effect.LENGTH, Effect.RECOVERY}
)

# Config fields in which a branch (``init.from_checkpoint``) may differ from the run it branches
# from: how either ran, and where its schedule ends. Not the lr or the warm-up: the branch must
# have followed the same schedule up to the branch point.
BRANCH_CHANGES = (
    *fields_with(TrainConfig, {Effect.EXECUTION, Effect.EVALUATION, Effect.LENGTH}),
    "init",
)


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the train state became NaN/Inf; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    """What a finished (or stopped) training run reports."""

    run_dir: str
    checkpoint_dir: str
    steps: int
    tokens: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False


def run_dir_of(config: TrainConfig) -> str:
    return f"{config.run.output_dir.rstrip('/')}/{config.run_name}"


def checkpoint_dir_of(config: TrainConfig) -> str:
    return f"{run_dir_of(config)}/checkpoints"


def open_dataset(config: TrainConfig) -> ActivationDataset:
    """The run's dataset, checked against the config before any step runs.

    Raises:
        DatasetError: another d_model than ``sae.d_model``, or a held-out split too small for
            one batch (found here rather than at the final evaluation, after the last save).
    """
    dataset = ActivationDataset.open(config.data.path)
    expected = config.sae.d_model
    if expected is not None and expected != dataset.d_model:
        raise DatasetError(
            f"sae.d_model={expected} but the dataset {config.data.path} has d_model "
            f"{dataset.d_model}; remove sae.d_model or point data.path at matching activations"
        )
    if config.data.eval_fraction > 0 and config.train.eval_batches > 0:
        try:
            _stream(config, dataset, "eval", position=0).close()
        except DatasetError as e:
            raise DatasetError(
                f"{e}; or raise data.eval_fraction={config.data.eval_fraction} (the held-out "
                "share), or set train.eval_batches=0 to train without evaluation"
            ) from None
    return dataset


def _log_default_lr(config: TrainConfig, d_model: int) -> None:
    """Say which lr a run with ``optimizer.lr`` unset trains at, and when that is a stretch."""
    if config.optimizer.lr is not None:
        return
    n, d = config.sae.n_features, config.tokens
    log.info(
        "optimizer.lr unset: %.3g, the fitted law's at N=%d, D=%d, batch %d, d_model %d "
        "(dictlearn.train.lr_law)",
        config.resolved_optimizer(d_model).lr,
        n,
        d,
        config.train.batch_size,
        d_model,
    )
    note = extrapolation_note(n, d)
    if note is not None:
        log.warning(note)


def log_dead_window(config: TrainConfig, program: TrainProgram) -> None:
    """Say which dead window a run with ``sae.dead_window_tokens`` unset counts with, and when
    the run is too short for any latent to count as dead."""
    if not program.arch.uses_dead_latents:
        return
    sae = config.sae
    if sae.dead_window_tokens is None:
        log.info(
            "%s: sae.dead_window_tokens unset: %d tokens, in which a latent firing at the "
            "average rate (L0 %g over %d latents) fires %d times",
            config.run_name,
            sae.dead_window,
            sae.nominal_l0,
            sae.n_features,
            DEAD_WINDOW_AVERAGE_FIRES,
        )
    if not program.dead_latents_possible:
        log.info(
            "%s: the run's %d tokens are too few for a latent to go %d tokens without firing: "
            "no latent will count as dead and the dead-latent loss will not run",
            config.run_name,
            config.tokens,
            sae.dead_window,
        )


def build_program(config: TrainConfig, dataset: ActivationDataset, mesh=None) -> TrainProgram:
    arch = get_architecture(config.sae, dataset.d_model)
    return TrainProgram(
        arch,
        config.resolved_optimizer(dataset.d_model),
        total_steps=config.train.steps,
        global_batch=config.train.batch_size,
        mesh=mesh if mesh is not None else make_mesh(config.mesh),
        norm_scale=dataset.norm_scale,
    )


def _compared(config_dict: dict[str, Any], against: dict[str, Any]) -> dict[str, Any]:
    """What a resume compares: the config without RESUMABLE_CHANGES, as
    :func:`dictlearn.train.config.comparable` writes it against the other."""
    return comparable(without_fields(config_dict, RESUMABLE_CHANGES), against)


def _config_differences(
    saved: dict[str, Any], current: dict[str, Any], saved_as: str = "checkpoint"
) -> list[str]:
    """Fields (dotted) where a checkpoint's config and this one differ, RESUMABLE_CHANGES aside."""
    return differences(_compared(saved, current), _compared(current, saved), saved_as=saved_as)


def prepare_run_dir(config: TrainConfig, checkpointer: Checkpointer) -> None:
    """Refuse a run directory this run would clobber; empty it under ``resume=overwrite``.

    Runs before any step (and before anything in the directory changes), so a mistake costs
    nothing. Refused: checkpoints under ``checkpoint.resume=never`` (the first save would fail
    only after training up to it), and, where there is no checkpoint to resume, a
    ``config.yaml`` of another config or metrics without any ``config.yaml`` (the run would
    overwrite them). A matching ``config.yaml`` without checkpoints is this run stopped before
    its first save: it starts over, and its old metric rows are dropped.

    Raises:
        ValueError: the directory holds another run; the message names the fix.
    """
    run_dir = run_dir_of(config)
    resume = config.checkpoint.resume
    steps = sorted(checkpointer.all_steps())
    if resume == "overwrite":
        for step in steps:
            checkpointer.delete(step)
        if steps:
            log.info(
                "checkpoint.resume=overwrite: deleted checkpoints %s in %s",
                steps,
                checkpointer.directory,
            )
        return  # the tracker drops the old metric rows, config.yaml is rewritten
    overwrite = "checkpoint.resume=overwrite to delete it and start over"
    if steps and resume == "never":
        raise UserError(
            f"checkpoint.resume=never but {checkpointer.directory} holds checkpoints of steps "
            f"{', '.join(map(str, steps))}: use another run.name, checkpoint.resume=auto to "
            f"continue from step {steps[-1]}, or {overwrite}"
        )
    if steps and resume == "auto":
        return  # _initial_state compares the checkpoint's config with this one
    fs, path = fsspec.core.url_to_fs(run_dir)
    saved_yaml = f"{path.rstrip('/')}/config.yaml"
    if fs.exists(saved_yaml):
        with fs.open(saved_yaml, "r") as f:
            saved = yaml.safe_load(f) or {}
        diffs = _config_differences(saved, config.model_dump(mode="json"), "config.yaml")
        if diffs:
            raise UserError(
                f"{run_dir} holds another run (no checkpoint, but its config.yaml differs):\n  "
                + "\n  ".join(diffs)
                + f"\nuse another run.name, or {overwrite}"
            )
    elif has_metrics(run_dir):
        raise UserError(
            f"{run_dir} holds metrics but no config.yaml (another run's, or a damaged one): use "
            f"another run.name, or {overwrite}"
        )


class _Throughput:
    """Tokens/s of training alone: time spent evaluating or checkpointing is left out."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._paused_total = self._paused_since_last = 0.0
        self._tokens_total = self._tokens_since_last = 0

    def add(self, tokens: int) -> None:
        self._tokens_total += tokens
        self._tokens_since_last += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (an evaluation, a checkpoint save)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self._paused_total += spent
            self._paused_since_last += spent

    def rate(self) -> float | None:
        """Tokens/s since the previous call (or the start), and start a new interval; None when
        no step was added since (two log rows read back at once: the first took the interval)."""
        if self._tokens_since_last == 0:
            return None
        now = time.perf_counter()
        rate = self._tokens_since_last / max(now - self._last - self._paused_since_last, 1e-9)
        self._last, self._paused_since_last, self._tokens_since_last = now, 0.0, 0
        return rate

    def overall(self) -> float:
        """Tokens/s over the whole run so far."""
        elapsed = time.perf_counter() - self._start - self._paused_total
        return self._tokens_total / max(elapsed, 1e-9)


def log_save(step: int, checkpointer: Checkpointer, async_save: bool) -> None:
    """The log line of a checkpoint save (an async one commits in the background)."""
    how = "writing in the background" if async_save else "committed"
    log.info("checkpoint step %d: %s/%d (%s)", step, checkpointer.directory, step, how)


class _PreemptionFlag:
    """Turns SIGTERM into a flag the loop checks between steps (checkpoint, then exit)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> _PreemptionFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a Ray actor thread): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(
    program: TrainProgram, state: TrainState, config: TrainConfig, dataset: ActivationDataset
) -> dict[str, float]:
    """Mean metrics over ``train.eval_batches`` held-out batches (always the same ones)."""
    if config.data.eval_fraction == 0 or config.train.eval_batches == 0:
        return {}
    totals: dict[str, float] = {}
    with _stream(config, dataset, "eval", position=0) as stream:
        for _ in range(config.train.eval_batches):
            m = _host_metrics(program.eval_step(state, program.global_batch_array(next(stream))))
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v
    return {k: v / config.train.eval_batches for k, v in totals.items()}


def initialised_from_first_batch(
    programs: Sequence[TrainProgram],
    states: Sequence[TrainState],
    config: TrainConfig,
    dataset: ActivationDataset,
) -> list[TrainState]:
    """Fresh states with what each architecture sets from the run's first batch (JumpReLU's
    ``init_l0`` thresholds). A separate reader takes the batch; step 0 then trains on it."""
    if not any(p.arch.initialises_from_data for p in programs):
        return list(states)
    with _stream(config, dataset, "train", 0) as stream:
        first = next(stream)
    return [
        program.initialise_from_data(state, program.global_batch_array(first))
        for program, state in zip(programs, states, strict=True)
    ]


def calibrated_after_last_step(
    programs: Sequence[TrainProgram],
    states: Sequence[TrainState],
    config: TrainConfig,
    dataset: ActivationDataset,
    position: int,
) -> list[TrainState]:
    """Each state with its architecture's end-of-training calibration applied.

    The batches are the train stream's from ``position`` on, the ones further steps would
    read; a separate reader takes them, so the position a checkpoint saves stays where the
    steps left it. Programs that calibrate nothing (``calibration_batches`` 0) keep their state.
    """
    wanted = [p.arch.calibration_batches for p in programs]
    if not any(wanted):
        return list(states)
    with _stream(config, dataset, "train", position) as stream:
        rows = [next(stream) for _ in range(max(wanted))]
    return [
        program.calibrate(state, (program.global_batch_array(r) for r in rows[:n]))
        for program, state, n in zip(programs, states, wanted, strict=True)
    ]


def _stream(config: TrainConfig, dataset: ActivationDataset, split: str, position: int):
    return BatchStream(
        dataset,
        global_batch=config.train.batch_size,
        seed=config.train.seed,
        split=split,
        eval_fraction=config.data.eval_fraction,
        block_rows=config.data.block_rows,
        shuffle_blocks=config.data.shuffle_blocks,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        position=position,
        prefetch=config.data.prefetch,
        read_threads=config.data.read_threads,
        # Rows stay in the dataset's dtype up to the device (bf16: half the host traffic).
        as_float32=False,
    )


def main(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run described by ``config``; see the module docstring."""
    dataset = open_dataset(config)
    program = build_program(config, dataset)
    _log_default_lr(config, dataset.d_model)
    log_dead_window(config, program)
    run_dir = run_dir_of(config)
    ckpt_dir = checkpoint_dir_of(config)
    is_lead = jax.process_index() == 0
    config_dict = config.model_dump(mode="json")

    checkpointer = Checkpointer.run_writer(ckpt_dir, config.checkpoint)
    # Both refuse (before anything in the run directory changes) a directory of another run.
    try:
        prepare_run_dir(config, checkpointer)
        state, position = _initial_state(config, config_dict, program, dataset, checkpointer)
    except BaseException:
        checkpointer.close()
        raise
    start_step = int(jax.device_get(state.step))
    if start_step >= config.train.steps:
        checkpointer.close()
        return _finished_result(run_dir, ckpt_dir, start_step, config)
    if is_lead:
        fs, path = fsspec.core.url_to_fs(run_dir)
        fs.makedirs(path, exist_ok=True)
        # Atomic: a full disk leaves the old config.yaml (or none), never half of one.
        write_bytes_atomic(fs, f"{path.rstrip('/')}/config.yaml", to_yaml(config).encode())

    tracker = Tracker(
        run_dir,
        config_dict,
        start_step=start_step,
        wandb_mode=config.tracker.wandb_mode,
        project=config.tracker.project,
        entity=config.tracker.entity,
        name=config.run_name,
        group=config.tracker.group,
        enabled=is_lead,
    )
    last_saved = checkpointer.latest_step()
    schedule = StepSchedule.of(config)
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    preempted = False
    try:
        with _stream(config, dataset, "train", position) as stream, _PreemptionFlag() as stop:
            bar = tqdm(
                total=config.train.steps,
                initial=start_step,
                # tqdm's own switch is honoured too (tests and batch logs set it).
                disable=not is_lead or bool(os.environ.get("TQDM_DISABLE")),
                unit="step",
                dynamic_ncols=True,
            )
            throughput = _Throughput()
            # Metrics stay on the device until a log step's are read, one step late (the next
            # step is already queued); checkpoints, evals and stops read at once.
            deferred = DeferredMetrics(lambda m: [m["loss"]])
            vote = PreemptionVote(program.mesh)

            def read_and_log(upto: int) -> dict[str, float]:
                host, diverged = deferred.read(upto)
                if diverged is not None:
                    tracker.log(diverged.step, diverged.metrics)
                    raise _diverged(
                        checkpointer, f"loss became {diverged.loss} at step {diverged.step}"
                    )
                if schedule.logs(upto):
                    rate = throughput.rate()
                    if rate is not None:
                        host["tokens_per_s"] = rate
                        bar.set_postfix(
                            tok_s=f"{rate:.0f}", loss=f"{host['loss']:.4g}", l0=f"{host['l0']:.1f}"
                        )
                    tracker.log(upto, host | {"tokens": upto * config.train.batch_size})
                return host

            reads = MetricReads(read_and_log)
            for step in range(start_step, config.train.steps):
                batch = program.global_batch_array(next(stream))
                state, device_metrics = program.step_fn()(state, batch)
                done = step + 1
                if done == config.train.steps:
                    with throughput.paused():
                        (state,) = calibrated_after_last_step(
                            [program], [state], config, dataset, stream.position
                        )
                deferred.add(done, device_metrics)
                throughput.add(config.train.batch_size)
                bar.update(1)
                actions = schedule.after(done, vote(done, stop.raised), last_saved)
                # Every loss up to here is checked (and this step logged) before a save.
                read = reads.after_step(done, actions)
                metrics = metrics if read is None else read
                if actions.evaluate:
                    with throughput.paused():
                        eval_metrics = evaluate(program, state, config, dataset)
                    tracker.log(done, eval_metrics, prefix="eval/")
                if actions.save:
                    # The loss above was computed before this step's update: check the state
                    # itself, so a NaN/Inf update never becomes the "last good" checkpoint.
                    if not _all_finite(state):
                        raise _diverged(checkpointer, f"the state became NaN/Inf at step {done}")
                    with throughput.paused():
                        # Rows up to `done` become durable before the checkpoint a resume
                        # would start from can commit (a resume drops the rows after it).
                        tracker.flush()
                        checkpointer.save(done, state, stream.position, config_dict)
                    log_save(done, checkpointer, config.checkpoint.async_save)
                    last_saved = done
                if actions.stop:
                    preempted = True
                    break
            bar.close()
        checkpointer.wait()
        final_step = int(jax.device_get(state.step))
        if not preempted and final_step == config.train.steps:
            eval_metrics = evaluate(program, state, config, dataset) or eval_metrics
            if eval_metrics:
                tracker.log(final_step, eval_metrics, prefix="eval/")
            recovery = _planted_recovery(dataset, state)
            if recovery is not None:
                eval_metrics["planted_recovery"] = recovery
                tracker.log(final_step, {"planted_recovery": recovery})
            tracker.summary(metrics | {f"eval/{k}": v for k, v in eval_metrics.items()})
    finally:
        checkpointer.close()
        tracker.close()
    return TrainResult(
        run_dir=run_dir,
        checkpoint_dir=ckpt_dir,
        steps=int(jax.device_get(state.step)),
        tokens=int(jax.device_get(state.step)) * config.train.batch_size,
        metrics=metrics,
        eval_metrics=eval_metrics,
        preempted=preempted,
    )


@jax.jit
def _all_finite_device(state: TrainState) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(state: TrainState) -> bool:
    """Whether every floating-point array of the state (params, optimizer, arch) is finite."""
    return bool(jax.device_get(_all_finite_device(state)))


def _diverged(checkpointer: Checkpointer, what: str) -> TrainingDiverged:
    checkpointer.wait()
    good = checkpointer.latest_step()
    where = (
        (
            f"the last good checkpoint (step {good}) in {checkpointer.directory} is intact; "
            "lower optimizer.lr or raise optimizer.warmup_steps and re-run "
            "to resume from it"
        )
        if good is not None
        else "no checkpoint was written yet"
    )
    return TrainingDiverged(f"{what}: {where}")


def _finished_result(run_dir: str, ckpt_dir: str, step: int, config: TrainConfig) -> TrainResult:
    """A re-run of a finished run trains nothing; report what its metrics.jsonl recorded."""
    train_row: dict[str, float] = {}
    eval_row: dict[str, float] = {}
    for row in read_metrics(run_dir):
        values = {k: v for k, v in row.items() if isinstance(v, int | float)}
        train_row |= {k: v for k, v in values.items() if "/" not in k}
        eval_row |= {k[5:]: v for k, v in values.items() if k.startswith("eval/")}
        if "planted_recovery" in values:
            eval_row["planted_recovery"] = values["planted_recovery"]
    return TrainResult(
        run_dir=run_dir,
        checkpoint_dir=ckpt_dir,
        steps=step,
        tokens=step * config.train.batch_size,
        metrics=train_row,
        eval_metrics=eval_row,
    )


def _initial_state(config, config_dict, program, dataset, checkpointer) -> tuple[TrainState, int]:
    latest = checkpointer.latest_step() if config.checkpoint.resume == "auto" else None
    if latest is None and config.init is not None:
        state, position = _branch_state(config, config_dict, program)
        log.info(
            "branching %s from step %d of %s",
            run_dir_of(config),
            config.init.step,
            config.init.from_checkpoint,
        )
        return state, position
    if latest is None:
        key = jax.random.key(config.train.param_seed)
        log.info("starting %s at step 0 (no checkpoint to resume)", run_dir_of(config))
        state = program.init(key, jax.numpy.asarray(dataset.mean))
        return initialised_from_first_batch([program], [state], config, dataset)[0], 0
    diffs = _config_differences(checkpointer.restore_config(latest), config_dict)
    if diffs:
        raise UserError(
            f"{checkpointer.directory} holds a checkpoint of a different run:\n  "
            + "\n  ".join(diffs)
            + "\nuse another run.name, or checkpoint.resume=never to start over in place"
        )
    check_schedule_change(checkpointer.restore_config(latest), config, latest)
    restored = checkpointer.restore(program.abstract_state(), latest)
    log.info(
        "resuming %s from step %d (checkpoint %s/%d, data position %d)",
        run_dir_of(config),
        latest,
        checkpointer.directory,
        latest,
        restored.data_position,
    )
    return restored.state, restored.data_position


def check_schedule_change(saved: dict[str, Any], config: TrainConfig, step: int) -> None:
    """Refuse a resume whose new schedule length would change the lr of the steps already run.

    ``train.steps`` and ``optimizer.decay_fraction`` may change on resume (Effect.LENGTH) while
    the checkpoint's ``step`` is still before the lr decay starts under both the saved and the
    new length: the lr of every step run so far is then the same, and the resumed run is the
    run trained from scratch to the new length (a sweep's constant-lr trunks rely on this).
    Past it, the steps already run followed a decay the new length would not have.

    Raises:
        UserError: names the decay's start, the step reached and what to do instead.
    """
    saved_steps = int(saved["train"]["steps"])
    saved_fraction = float(saved["optimizer"]["decay_fraction"])
    if (saved_steps, saved_fraction) == (config.train.steps, config.optimizer.decay_fraction):
        return
    # With this run's lr and warm-up on both sides: a resume may change those on purpose.
    before = decay_start_step(
        config.optimizer.model_copy(update={"decay_fraction": saved_fraction}), saved_steps
    )
    after = decay_start_step(config.optimizer, config.train.steps)
    if step <= min(before, after):
        return
    changed = ", ".join(
        f"{name} {old} -> {new}"
        for name, old, new in (
            ("train.steps", saved_steps, config.train.steps),
            ("optimizer.decay_fraction", saved_fraction, config.optimizer.decay_fraction),
        )
        if old != new
    )
    raise UserError(
        f"{changed}: the checkpoint at step {step} is past the start of the lr decay (step "
        f"{before} as trained, {after} with the new values), so the steps already run followed "
        "another schedule; keep the old values, or train the new length as a new run "
        "(another run.name, optionally branched with init.from_checkpoint at a step before the "
        "decay that checkpoint.keep_steps kept)"
    )


def _branch_state(config: TrainConfig, config_dict, program) -> tuple[TrainState, int]:
    """State and data position of ``config.init``'s checkpoint, after checking that this run
    and that one follow the same schedule up to it (so the branch equals a from-scratch run)."""
    assert config.init is not None
    source, step = config.init.from_checkpoint, config.init.step
    trunk = Checkpointer(source, async_save=False)
    try:
        steps = trunk.all_steps()
        if step not in steps:
            raise UserError(
                f"init.step={step}: {source} has no checkpoint at that step (it has "
                f"{sorted(steps) or 'none'}); checkpoint.keep_steps of the run branched from "
                "must list it"
            )
        saved = trunk.restore_config(step)
        diffs = differences(
            without_fields(saved, BRANCH_CHANGES), without_fields(config_dict, BRANCH_CHANGES)
        )
        if diffs:
            raise UserError(
                f"init.from_checkpoint={source} is a run of another config:\n  "
                + "\n  ".join(diffs)
            )
        saved_opt = OptimizerConfig.model_validate(saved["optimizer"])
        for who, opt, total in (
            (source, saved_opt, saved["train"]["steps"]),
            ("this run", config.optimizer, config.train.steps),
        ):
            start = decay_start_step(opt, total)
            if step > start:
                raise UserError(
                    f"init.step={step} is past the start of {who}'s lr decay (step {start}): "
                    "a branch must start while both runs are in the constant-lr phase"
                )
        restored = trunk.restore(program.abstract_state(), step)
    finally:
        trunk.close()
    return restored.state, restored.data_position


def _planted_recovery(dataset: ActivationDataset, state: TrainState) -> float | None:
    """For planted datasets: mean max-cosine of the true directions with the decoder rows."""
    if "planted" not in dataset.manifest.metadata:
        return None
    truth = load_planted_truth(dataset.url)
    w_dec = np.asarray(jax.device_get(state.params["W_dec"]))
    return float(recovery_score(w_dec, truth.directions))
