"""``dictlearn sweep``: train a grid of SAEs on one activation dataset, as Ray Tune trials.

    dictlearn sweep launch/configs/sweep_tiny.yaml
    dictlearn sweep my_sweep.yaml ray.address=auto ray.max_concurrent_trials=8

``main(config) -> SweepResult`` is the entry point. :mod:`scaling_laws.sweep` plans the trials;
this module runs them on Ray (a local cluster by default, ``ray.address`` for a real one) with
Ray Tune, which schedules them onto the reserved resources (``tune.with_resources``), bounds the
concurrency (``max_concurrent_trials``) and retries a failed trial (``FailureConfig``) while the
others go on. Each trial is an ordinary ``dictlearn train`` run in
``<output_dir>/<name>/trials/<trial>/`` plus a ``trial.json`` ledger entry::

    {"status": "finished" | "failed" | "running", "error": str | null, "attempts": int,
     "result": {"eval/fvu": ..., "l0": ..., "dead_fraction": ..., "steps": ..., ...}}

``sweep.yaml`` (the resolved sweep config) is written when the sweep starts; a re-run whose
config differs in a field that decides results is refused, naming the fields. A re-run skips the
finished trials and resumes the others from their own checkpoints.

With ``branch_decays``, the constant-lr trunks (``trunks/<name>/``) run first, then the trials
that branch from them (a trial whose trunk failed is reported failed without running).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

from dictlearn.config import (
    ConfigError,
    differences,
    load_config,
    without_fields,
    without_values_from_before,
)
from dictlearn.data import storage
from dictlearn.train.config import FIELDS_ADDED_LATER, TrainConfig
from scaling_laws.sweep import SWEEP_EXECUTION_FIELDS, SweepConfig, Trial, plan_sweep

SWEEP_FILE = "sweep.yaml"
TRIAL_FILE = "trial.json"
RESULT_FILE = "sweep_result.json"

Status = Literal["finished", "failed", "running"]


@dataclass
class TrialOutcome:
    """What became of one trial (or trunk) in this invocation."""

    name: str
    status: Literal["finished", "failed", "skipped"]
    """``skipped``: it had finished in an earlier invocation."""
    attempts: int
    seconds: float
    error: str | None
    result: dict[str, Any] = field(default_factory=dict)
    trunk: bool = False


@dataclass
class SweepResult:
    """What ``dictlearn sweep`` reports (also written to ``<sweep dir>/sweep_result.json``)."""

    root: str
    trials: list[TrialOutcome]
    trunks: list[TrialOutcome]
    seconds: float

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials + self.trunks if t.status == "failed"]


def load_sweep_config(path: str | None, overrides: list[str]) -> SweepConfig:
    """The sweep config from a YAML file plus dotted overrides; errors name the field."""
    return load_config(SweepConfig, path, overrides)


# ----------------------------------------------------------------------------------------------
# The ledger: sweep.yaml and one trial.json per trial


_BASE_FIELDS_ADDED_LATER = {f"base.{name}": value for name, value in FIELDS_ADDED_LATER.items()}


def _compared(sweep_dict: dict[str, Any]) -> dict[str, Any]:
    """What a sweep directory check compares: no execution fields, and no base-config field
    that holds the value it had before it existed (as a run's resume check does)."""
    return without_values_from_before(
        without_fields(sweep_dict, SWEEP_EXECUTION_FIELDS), _BASE_FIELDS_ADDED_LATER
    )


def check_sweep_dir(config: SweepConfig) -> None:
    """Write ``sweep.yaml``, or refuse if the directory holds a sweep of another config.

    Raises:
        ConfigError: ``sweep.yaml`` differs in a field that decides results (not one of
            ``SWEEP_EXECUTION_FIELDS``); the message names each field.
    """
    fs, path = storage.filesystem(config.root)
    current = config.model_dump(mode="json")
    raw = storage.read_bytes_or_none(fs, storage.join(path, SWEEP_FILE))
    if raw is not None:
        saved = yaml.safe_load(raw) or {}
        diffs = differences(_compared(saved), _compared(current), saved_as="sweep.yaml")
        if diffs:
            raise ConfigError(
                f"{config.root} holds a sweep of another config:\n  "
                + "\n  ".join(diffs)
                + "\nuse another name (or output_dir) for a new sweep"
            )
    fs.makedirs(path, exist_ok=True)
    text = yaml.safe_dump(current, sort_keys=False).encode()
    storage.write_bytes_atomic(fs, storage.join(path, SWEEP_FILE), text)


def read_trial(run_dir: str) -> dict[str, Any] | None:
    """A trial's ``trial.json``, or None if it never started."""
    fs, path = storage.filesystem(run_dir)
    raw = storage.read_bytes_or_none(fs, storage.join(path, TRIAL_FILE))
    return None if raw is None else json.loads(raw)


def _write_trial(run_dir: str, status: Status, attempts: int, error: str | None, result) -> None:
    fs, path = storage.filesystem(run_dir)
    fs.makedirs(path, exist_ok=True)
    record = {"status": status, "error": error, "attempts": attempts, "result": result}
    # Whole or not at all: a half-written entry must never read as "finished".
    storage.write_bytes_atomic(fs, storage.join(path, TRIAL_FILE), json.dumps(record).encode())


# ----------------------------------------------------------------------------------------------
# One trial, inside a Ray Tune worker process


def _trial_environment(cpus: float) -> None:
    """Keep a trial's native thread pools to the CPUs it reserved (before JAX starts here), and
    its console quiet: the driver prints one line per trial."""
    threads = str(max(1, math.floor(cpus)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = threads
    if cpus < 2:
        # XLA's CPU client sizes its pool by the machine's cores; with one CPU reserved, run
        # Eigen's matmuls on the calling thread rather than contend with the other trials.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    os.environ["TQDM_DISABLE"] = "1"  # one bar, the driver's: a trial's would flood its log
    os.environ.setdefault("WANDB_SILENT", "true")


def trial_result(train_result: Any, seconds: float) -> dict[str, Any]:
    """The numbers ``trial.json`` and the progress line report: final train metrics, the
    held-out ones as ``eval/...``, steps, tokens, seconds, run dir."""
    numbers = {k: v for k, v in train_result.metrics.items() if isinstance(v, int | float)}
    numbers |= {
        f"eval/{k}": v for k, v in train_result.eval_metrics.items() if isinstance(v, int | float)
    }
    return numbers | {
        "steps": train_result.steps,
        "tokens": train_result.tokens,
        "seconds": seconds,
        "run_dir": train_result.run_dir,
    }


def run_trial(
    params: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    cpus: float,
    spliced_eval: dict[str, Any] | None = None,
    evaluated: list[str] | None = None,
) -> None:
    """Tune's function trainable: train trial ``params["trial"]`` (then, with ``spliced_eval``,
    evaluate it spliced into its source LM) and keep its ledger entry."""
    from ray import tune

    name = params["trial"]
    config = TrainConfig.model_validate(configs[name])
    run_dir = f"{config.run.output_dir.rstrip('/')}/{name}"
    _trial_environment(cpus)
    attempts = ((read_trial(run_dir) or {}).get("attempts") or 0) + 1
    _write_trial(run_dir, "running", attempts, None, None)
    started = time.perf_counter()
    try:
        from dictlearn.train.trainer import main as train_main

        result = train_main(config)
        if result.preempted:
            raise RuntimeError("stopped by SIGTERM after a checkpoint (re-run to resume)")
        spliced = {}
        if spliced_eval is not None and name in (evaluated or []):
            spliced = _spliced_metrics(result.run_dir, spliced_eval)
    except BaseException as e:
        _write_trial(run_dir, "failed", attempts, f"{type(e).__name__}: {e}", None)
        raise
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None:
            # Stop W&B's service process now: at interpreter exit (Tune ends the actor) its
            # atexit hook finds the service gone and prints a ConnectionResetError traceback.
            wandb.teardown()
    summary = trial_result(result, time.perf_counter() - started) | spliced
    _write_trial(run_dir, "finished", attempts, None, summary)
    tune.report(summary)


def _spliced_metrics(run_dir: str, settings: dict[str, Any]) -> dict[str, float]:
    """``dictlearn eval`` of the trial's SAE, as ``spliced/...`` numbers."""
    from dictlearn.inspect.evaluate import EvalConfig
    from dictlearn.inspect.evaluate import main as eval_main

    evaluation = eval_main(EvalConfig.model_validate(settings | {"sae": run_dir}))
    return {f"spliced/{k}": v for k, v in evaluation.metrics.items()}


# ----------------------------------------------------------------------------------------------
# The driver


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def trial_line(name: str, result: dict[str, Any]) -> str:
    """The one line printed for a finished trial."""
    return (
        f"{name}: eval fvu {_number(result.get('eval/fvu'), '.4f')}  "
        f"l0 {_number(result.get('eval/l0', result.get('l0')), '.1f')}  "
        f"dead {_number(result.get('dead_fraction'), '.3f')}  "
        f"{_number(result.get('seconds'), '.0f')} s"
        + (
            f"  loss recovered {_number(result['spliced/loss_recovered'], '.4f')}"
            if "spliced/loss_recovered" in result
            else ""
        )
    )


def _progress_callback(bar: tqdm, by_name: dict[str, Trial], retries: int):
    """A Tune callback: one line per finished or failed trial, the bar over all of them."""
    from ray import tune

    def error_of(trial) -> str:
        record = read_trial(by_name[trial.config["trial"]].run_dir) or {}
        return str(record.get("error") or "unknown error (see the Ray logs)")

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            name = trial.config["trial"]
            record = read_trial(by_name[name].run_dir) or {}
            bar.write(trial_line(name, record.get("result") or {}))
            bar.update(1)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            bar.write(f"{trial.config['trial']}: FAILED ({error_of(trial)}); retrying")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            n = retries + 1
            bar.write(f"{trial.config['trial']}: FAILED after {n} attempts: {error_of(trial)}")
            bar.update(1)

    return Progress()


def _run_on_tune(
    config: SweepConfig, trials: list[Trial], bar: tqdm, trunk_names: frozenset[str] = frozenset()
) -> None:
    """Run ``trials`` as one Ray Tune experiment; outcomes land in their ``trial.json``."""
    from ray import tune

    if not trials:
        return
    by_name = {t.name: t for t in trials}
    resources = {"cpu": config.ray.cpus_per_trial, "gpu": config.ray.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            configs={t.name: t.config.model_dump(mode="json") for t in trials},
            cpus=config.ray.cpus_per_trial,
            spliced_eval=None
            if config.spliced_eval is None
            else config.spliced_eval.model_dump(mode="json"),
            # Trunks are not trials: only the budgets branched from them are evaluated.
            evaluated=[t.name for t in trials if t.name not in trunk_names],
        ),
        resources,
    )
    # Our ledger (trial.json) decides what is finished, so a re-run works without Tune's
    # experiment state (whose `Tuner.restore` needs that state on storage every node shares and
    # knows trials by Tune's ids, not by our names). Tune keeps its state and per-trial logs in a
    # scratch directory, removed afterwards; the run directories hold everything that matters.
    scratch = tempfile.mkdtemp(prefix="dictlearn-tune-")
    # Tune's newer console output prints a header box per experiment even at verbose=0; the
    # classic reporter is silent at 0. The bar and lines here are the sweep's output.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(by_name))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=config.ray.max_concurrent_trials or None,
                # A trial's process imports JAX and compiles its step; reusing the process for
                # the next trial saves the imports (seconds per trial on small sweeps).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=scratch,
                failure_config=tune.FailureConfig(max_failures=config.retries),
                verbose=0,
                progress_reporter=None,
                callbacks=[_progress_callback(bar, by_name, config.retries)],
            ),
        )
        grid = tuner.fit()  # failed trials are in the ledger; Tune's own errors are raised
        if grid.num_terminated + grid.num_errors < len(grid):
            # Ctrl+C: Tune stops its trials and returns; stop here too rather than go on to the
            # next phase. Re-running resumes.
            raise KeyboardInterrupt("sweep interrupted: re-run the same command to resume")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _outcome(trial: Trial, skipped: bool, trunk: bool) -> TrialOutcome:
    record = read_trial(trial.run_dir) or {}
    status = record.get("status")
    if skipped:
        final: Literal["finished", "failed", "skipped"] = "skipped"
    else:
        final = "finished" if status == "finished" else "failed"
    error = record.get("error") if final == "failed" else None
    if final == "failed" and error is None:
        error = "did not finish (see the Ray logs)"
    result = record.get("result") or {}
    return TrialOutcome(
        trial.name,
        final,
        int(record.get("attempts") or 0),
        float(result.get("seconds", 0.0)),
        error,
        result,
        trunk,
    )


def _finished(trial: Trial) -> bool:
    return (read_trial(trial.run_dir) or {}).get("status") == "finished"


def absolute_paths(config: SweepConfig) -> SweepConfig:
    """``config`` with relative local paths (``output_dir``, ``base.data.path``) made absolute.

    Tune runs each trial in a working directory of its own, where a relative path would read
    nothing and write into Tune's scratch space; the sweep.yaml records the absolute paths.
    """
    data = config.model_dump(mode="json")
    data["output_dir"] = _absolute(data["output_dir"])
    data["base"]["data"]["path"] = _absolute(data["base"]["data"]["path"])
    return SweepConfig.model_validate(data)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def main(config: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep described by ``config``; see the module docstring."""
    from dictlearn.ray_cluster import ray_session
    from dictlearn.train.trainer import open_dataset

    config = absolute_paths(config)
    plan = plan_sweep(config)
    # A missing dataset (or a d_model mismatch) is one error here, not every trial failing twice.
    dataset = open_dataset(config.base)
    if config.spliced_eval is not None and dataset.manifest.source_model == "planted":
        raise ConfigError(
            f"spliced_eval needs activations of a language model, but {config.base.data.path} "
            "is planted data; remove spliced_eval or sweep on a generated dataset"
        )
    check_sweep_dir(config)
    started = time.perf_counter()
    done_before = {t.name for t in plan.trials + plan.trunks if _finished(t)}
    needed_trunks = {t.trunk for t in plan.trials if t.trunk and t.name not in done_before}
    trunks = [t for t in plan.trunks if t.name in needed_trunks and t.name not in done_before]
    scratch = [t for t in plan.trials if t.trunk is None and t.name not in done_before]
    branches = [t for t in plan.trials if t.trunk is not None and t.name not in done_before]
    skipped = len(plan.trials) - len(scratch) - len(branches)
    print(
        f"sweep {config.name}: {len(plan.trials)} trials ({skipped} finished earlier, skipped)"
        + (f", {len(trunks)} constant-lr trunks to run first" if trunks else "")
        + f" -> {config.root}",
        flush=True,
    )
    outcomes: dict[str, TrialOutcome] = {}
    if scratch or branches:
        concurrency = config.ray.max_concurrent_trials or max(
            1, int((os.cpu_count() or 1) // config.ray.cpus_per_trial)
        )
        bar = tqdm(
            total=len(trunks) + len(scratch) + len(branches),
            unit="trial",
            desc=f"sweep {config.name}",
            disable=bool(os.environ.get("TQDM_DISABLE")),
            file=sys.stdout,
            dynamic_ncols=True,
        )
        resources = {"CPU": config.ray.cpus_per_trial, "GPU": config.ray.gpus_per_trial}
        with ray_session(config.ray.address, actors=concurrency, resources_per_actor=resources):
            # Trunks and the trials trained from scratch first, together; then the branches,
            # whose trunks have finished by then.
            _run_on_tune(config, trunks + scratch, bar, frozenset(t.name for t in trunks))
            for t in trunks + scratch:
                outcomes[t.name] = _outcome(t, False, t in trunks)
            failed_trunks = {t.name for t in trunks if outcomes[t.name].status == "failed"}
            runnable = [b for b in branches if b.trunk not in failed_trunks]
            _run_on_tune(config, runnable, bar)
            for t in runnable:
                outcomes[t.name] = _outcome(t, False, False)
            for t in branches:
                if t.trunk in failed_trunks:
                    error = f"its trunk {t.trunk} failed: {outcomes[t.trunk].error}"
                    outcomes[t.name] = TrialOutcome(t.name, "failed", 0, 0.0, error)
                    bar.write(f"{t.name}: FAILED ({error})")
                    bar.update(1)
        bar.close()
    for t in plan.trials + plan.trunks:
        if t.name not in outcomes and t.name in done_before:
            outcomes[t.name] = _outcome(t, True, t in plan.trunks)
    result = SweepResult(
        config.root,
        [outcomes[t.name] for t in plan.trials],
        [outcomes[t.name] for t in plan.trunks if t.name in outcomes],
        time.perf_counter() - started,
    )
    fs, path = storage.filesystem(config.root)
    payload = json.dumps(asdict(result), indent=2, default=str).encode()
    storage.write_bytes_atomic(fs, storage.join(path, RESULT_FILE), payload)
    return result


def summary_text(result: SweepResult) -> str:
    """The final table: one row per trial (status, eval FVU, L0, dead fraction, seconds)."""
    finished = [t for t in result.trials if t.status != "failed"]
    lines = [
        f"sweep done in {result.seconds:.0f} s: {len(finished)}/{len(result.trials)} trials "
        f"finished, {len(result.failed)} failed  ({result.root})",
        f"  {'trial':<40} {'status':<9} {'eval fvu':>9} {'l0':>7} {'dead':>6} {'seconds':>8}",
    ]
    for t in result.trunks + result.trials:
        r = t.result
        lines.append(
            f"  {t.name + (' (trunk)' if t.trunk else ''):<40} {t.status:<9} "
            f"{_number(r.get('eval/fvu'), '.4f'):>9} "
            f"{_number(r.get('eval/l0', r.get('l0')), '.1f'):>7} "
            f"{_number(r.get('dead_fraction'), '.3f'):>6} {_number(r.get('seconds'), '.0f'):>8}"
        )
    for t in result.failed:
        lines.append(f"  FAILED {t.name}: {t.error}")
    return "\n".join(lines)
