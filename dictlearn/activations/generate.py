"""``dictlearn generate``: Ray workers run Gemma 3 over a corpus and write activation datasets.

    dictlearn generate launch/configs/generate_tiny.yaml [key.sub=value ...]

The coordinator (this process) owns the ledger; workers own the model. In order:

1. Resolve the model (headers only) and check the hooks against its layers; plan the corpus
   shards; split ``max_tokens`` over them. Bad input fails here, before Ray starts.
2. Ledger: ``<output>/generation.json`` records the settings that decide the datasets' contents
   and the corpus plan. A re-run must agree with it (else :class:`DatasetError`); a run whose
   manifests are all committed returns at once.
3. Corpus shard ``i`` becomes shard ``i`` of every hook's dataset (``<output>/<hook>/``); a shard
   whose sidecar exists in every hook's dataset is committed and skipped.
4. Start (or join) Ray, start ``num_workers`` actors (each loads the model once), hand each at
   most ``max_in_flight`` shards at a time. A worker that dies (SIGKILL, OOM, preemption) is
   restarted by Ray and its queued and running shards are retried (``max_restarts``,
   ``max_task_retries``); a redone shard overwrites atomically.
5. Commit: combine the sidecars' statistics into each dataset's ``manifest.json``, written last.

See ``docs/activations.md``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import ray
from pydantic import Field, ValidationError
from tqdm.auto import tqdm

from dictlearn.activations.config import GenerateConfig
from dictlearn.activations.model import ResolvedModel, resolve_model
from dictlearn.activations.worker import (
    CONCURRENT_SHARDS,
    ShardOutcome,
    ShardWorker,
    WorkerSpec,
    parse_model_hooks,
)
from dictlearn.config import ConfigError, StrictModel
from dictlearn.corpus import CorpusShard, plan_corpus_shards
from dictlearn.data import DatasetError, ShardInfo, commit_manifest, read_shard_infos, storage
from dictlearn.data.format import MANIFEST_NAME, SHARDS_DIR, DatasetManifest
from dictlearn.errors import UserError
from dictlearn.lm import HookPoint
from dictlearn.ray_cluster import ray_session
from sharding import MeshError

LEDGER_NAME = "generation.json"


class GenerationLedger(StrictModel):
    """``<output.path>/generation.json``: what a generation into this directory decided.

    Written before any shard, so a re-run checks it first: the same settings continue the
    generation (skipping committed shards), other settings are refused.
    """

    format: Literal["dictlearn.generation"] = "dictlearn.generation"
    version: Literal[1] = 1
    fingerprint: str = Field(description="SHA-256 of ``settings`` as canonical JSON.")
    n_shards: int = Field(ge=1, description="Corpus shards of the plan.")
    datasets: dict[str, str] = Field(description="Hook name -> URL of its dataset.")
    settings: dict[str, Any] = Field(
        description=(
            "GenerateConfig.fingerprint_fields() plus the weights and the corpus plan's digest: "
            "everything that decides the datasets' contents."
        )
    )


# Exceptions a worker raises for bad input; re-raised bare so the CLI prints one line.
_USER_ERRORS = (UserError, MeshError)


@dataclass
class GenerateResult:
    """What a generate run did."""

    datasets: dict[str, str]
    """Hook name -> URL of its committed activation dataset."""
    tokens: int
    """Activation rows in each dataset (all of it, including shards from earlier runs)."""
    lm_tokens: int
    """LM tokens (contexts x context_length) run through the model by this call."""
    shards_written: int
    """Corpus shards processed by this call (each written to every hook's dataset)."""
    shards_skipped: int
    """Shards already committed by an earlier run (all of them when the run was finished)."""
    seconds: float
    """Wall-clock time of the call: planning, Ray and worker start-up, work, commit."""
    workers: int
    """Worker actors started (0 when nothing was left to do)."""
    worker_restarts: int
    """Workers whose process changed during the run (died and were restarted by Ray)."""
    worker_cpu_s: float
    """CPU seconds (all threads) the workers spent on this call's shards, model loading and
    compiling (both part of a worker's start-up) excluded: ``lm_tokens / worker_cpu_s`` is a
    throughput that machine sharing does not skew."""
    worker_start_s: float
    """Part of ``seconds`` from starting the worker actors until every one had loaded the model
    and compiled its forward (0 when nothing was left to do)."""
    ledger: str
    """URL of ``generation.json``."""


@dataclass(frozen=True)
class GenerationPlan:
    """Everything decided before any worker starts (steps 1-2 of the module docstring)."""

    config: GenerateConfig
    model: ResolvedModel
    hooks: tuple[HookPoint, ...]
    shards: list[CorpusShard]
    budgets: list[int | None]
    """Contexts each shard may use (None: all of them)."""
    outputs: dict[str, str]
    """Hook name -> dataset URL."""
    settings: dict[str, Any]
    fingerprint: str
    ledger: str
    """URL of ``generation.json`` (written by :func:`plan_generation` if it was absent)."""


def plan_generation(config: GenerateConfig) -> GenerationPlan:
    """Check the config against the model and corpus, and write or check the ledger.

    Raises:
        ConfigError, CorpusError, DatasetError, FileNotFoundError: as :func:`main`.
    """
    model = resolve_model(config.model)
    hooks = parse_model_hooks(config.hooks, model.config)
    shards = plan_corpus_shards(config.corpus)
    budgets = _context_budgets(config, len(shards))
    root = config.output.path.rstrip("/")
    outputs = {h.name: f"{root}/{h.name}" for h in hooks}
    settings = config.fingerprint_fields() | {
        "weights": model.weights,
        "corpus_plan": _plan_digest(shards),
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    ledger = _check_or_write_ledger(root, outputs, settings, fingerprint, len(shards))
    return GenerationPlan(
        config, model, hooks, shards, budgets, outputs, settings, fingerprint, ledger
    )


def main(config: GenerateConfig) -> GenerateResult:
    """Generate (or finish generating) one activation dataset per hook.

    Raises:
        ConfigError: bad model/hook settings, or ``max_tokens`` too small for the shards.
        CorpusError: the corpus is empty or unreadable, or a shard yields no context.
        DatasetError: the output path holds a generation with other settings, files that are
            not from a generation, or shards of another width or dtype.
        FileNotFoundError: a configured weights file or directory does not exist.
    """
    t0 = time.perf_counter()
    plan = plan_generation(config)
    n_shards = len(plan.shards)

    done = _finished(plan.outputs, plan.fingerprint)
    if done is not None:
        return GenerateResult(
            datasets=plan.outputs,
            tokens=done.n_tokens,
            lm_tokens=0,
            shards_written=0,
            shards_skipped=n_shards,
            seconds=time.perf_counter() - t0,
            workers=0,
            worker_restarts=0,
            worker_cpu_s=0.0,
            worker_start_s=0.0,
            ledger=plan.ledger,
        )

    infos = _committed_shards(config, plan.model, plan.outputs, n_shards)
    todo = [s for s in plan.shards if s.index not in infos]
    model = plan.model
    spec = WorkerSpec(
        model=model,
        hooks=tuple(plan.outputs),
        outputs=plan.outputs,
        context_length=config.context_length,
        batch_size=config.batch_size,
        exclude_positions=tuple(config.exclude_positions),
        exclude_token_ids=tuple(
            [model.config.bos_id] if config.exclude_token_ids is None else config.exclude_token_ids
        ),
        dtype=config.output.dtype,
        mesh=config.mesh,
    )
    n_workers = min(config.ray.num_workers, len(todo))
    restarts, lm_tokens, cpu_s, start_s = 0, 0, 0.0, 0.0
    if todo:
        with ray_session(
            config.ray.address,
            actors=n_workers,
            resources_per_actor={"CPU": config.ray.cpus_per_worker}
            | config.ray.resources_per_worker,
        ):
            outcomes, restarts, start_s = _run_workers(config, spec, todo, plan.budgets, n_workers)
        for outcome in outcomes:
            infos[outcome.index] = outcome.infos
            lm_tokens += outcome.lm_tokens
            cpu_s += outcome.cpu_s

    manifests = _commit(plan, infos)
    return GenerateResult(
        datasets=plan.outputs,
        tokens=next(iter(manifests.values())).n_tokens,
        lm_tokens=lm_tokens,
        shards_written=len(todo),
        shards_skipped=n_shards - len(todo),
        seconds=time.perf_counter() - t0,
        workers=n_workers,
        worker_restarts=restarts,
        worker_cpu_s=cpu_s,
        worker_start_s=start_s,
        ledger=plan.ledger,
    )


# ---------------------------------------------------------------------------------------------
# Planning and the ledger


def _context_budgets(config: GenerateConfig, n_shards: int) -> list[int | None]:
    """Contexts each shard may use: ``max_tokens`` split like the corpus (sizes differ by <= 1)."""
    if config.max_tokens is None:
        return [None] * n_shards
    total = config.max_tokens // config.context_length
    if total < n_shards:
        raise ConfigError(
            f"max_tokens={config.max_tokens} is {total} contexts of context_length="
            f"{config.context_length}, fewer than corpus.n_shards={n_shards}; raise max_tokens "
            "or lower n_shards"
        )
    bounds = [total * i // n_shards for i in range(n_shards + 1)]
    return [hi - lo for lo, hi in itertools.pairwise(bounds)]


def _plan_digest(shards: list[CorpusShard]) -> str:
    plan = json.dumps([s.model_dump(mode="json") for s in shards], sort_keys=True)
    return hashlib.sha256(plan.encode()).hexdigest()


def _check_or_write_ledger(
    root: str, outputs: dict[str, str], settings: dict[str, Any], fingerprint: str, n: int
) -> str:
    """Write ``generation.json`` on the first run; on a re-run, check it matches.

    Raises:
        DatasetError: the ledger records other settings, or the output path holds files no
            generation wrote.
    """
    fs, path = storage.filesystem(root)
    ledger_path = storage.join(path, LEDGER_NAME)
    url = f"{root}/{LEDGER_NAME}"
    raw = storage.read_bytes_or_none(fs, ledger_path)
    if raw is not None:
        try:
            old = GenerationLedger.model_validate_json(raw)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in err.errors()
            )
            raise DatasetError(
                f"{url}: not a generation ledger ({problems}); use another output.path"
            ) from None
        old_settings = old.settings
        if old.fingerprint == fingerprint:
            return url
        if not _any_files([*old.datasets.values(), *outputs.values()]):
            # Nothing was written under the old settings (e.g. the first run stopped on a
            # corpus error that was then fixed): start afresh rather than insist on them.
            _write_ledger(fs, ledger_path, outputs, settings, fingerprint, n)
            return url
        differ = sorted(
            k for k in set(old_settings) | set(settings) if old_settings.get(k) != settings.get(k)
        )
        raise DatasetError(
            f"{url}: output.path holds a generation with other settings (differing: "
            f"{', '.join(differ) or 'fingerprint'}); use another output.path, or delete it to "
            "start over"
        )
    for hook_url in outputs.values():
        if _any_files([hook_url]):
            raise DatasetError(
                f"{hook_url} already holds files, but {url} (the generation ledger) does not "
                f"exist: they were not written by dictlearn generate; use another output.path "
                f"or delete {hook_url}"
            )
    _write_ledger(fs, ledger_path, outputs, settings, fingerprint, n)
    return url


def _any_files(urls: list[str]) -> bool:
    for url in urls:
        fs, path = storage.filesystem(url)
        fs.invalidate_cache(path)
        if fs.exists(path) and fs.find(path):
            return True
    return False


def _write_ledger(
    fs: Any, path: str, outputs: dict[str, str], settings: dict[str, Any], fingerprint: str, n: int
) -> None:
    record = GenerationLedger(
        fingerprint=fingerprint, n_shards=n, datasets=outputs, settings=settings
    )
    storage.write_bytes_atomic(
        fs, path, json.dumps(record.model_dump(mode="json"), indent=1).encode()
    )


def _finished(outputs: dict[str, str], fingerprint: str) -> DatasetManifest | None:
    """The first hook's manifest if every hook's dataset is committed by this generation."""
    manifests = []
    for url in outputs.values():
        fs, path = storage.filesystem(url)
        raw = storage.read_bytes_or_none(fs, storage.join(path, MANIFEST_NAME))
        if raw is None:
            return None
        try:
            manifest = DatasetManifest.model_validate_json(raw)
        except ValidationError:
            return None  # unreadable: re-committed from the sidecars below
        if manifest.metadata.get("fingerprint") != fingerprint:
            return None
        manifests.append(manifest)
    return manifests[0]


def _committed_shards(
    config: GenerateConfig, model: ResolvedModel, outputs: dict[str, str], n_shards: int
) -> dict[int, dict[str, ShardInfo]]:
    """Shards whose sidecar exists in every hook's dataset, checked against this run's shape.

    Raises:
        DatasetError: a sidecar of another width or dtype, or an index past the plan.
    """
    per_hook = {hook: read_shard_infos(url) for hook, url in outputs.items()}
    for hook, infos in per_hook.items():
        for index, info in infos.items():
            where = f"{outputs[hook]}/{SHARDS_DIR}/shard-{index:05d}.json"
            if index >= n_shards:
                raise DatasetError(
                    f"{where}: shard {index} is past the plan's {n_shards} shards; the dataset "
                    "mixes generations, delete it and re-run"
                )
            if (info.d_model, info.dtype) != (model.config.d_model, config.output.dtype):
                raise DatasetError(
                    f"{where}: d_model {info.d_model} dtype {info.dtype}, but this generation "
                    f"writes d_model {model.config.d_model} dtype {config.output.dtype}; the "
                    "dataset mixes generations, delete it and re-run"
                )
    common = set.intersection(*(set(infos) for infos in per_hook.values()))
    return {i: {hook: per_hook[hook][i] for hook in outputs} for i in sorted(common)}


def _commit(
    plan: GenerationPlan, infos: dict[int, dict[str, ShardInfo]]
) -> dict[str, DatasetManifest]:
    manifests = {}
    for hook in plan.hooks:
        url = plan.outputs[hook.name]
        _remove_stray_temp_files(url)
        manifests[hook.name] = commit_manifest(
            url,
            [infos[i][hook.name] for i in sorted(infos)],
            source_model=plan.model.config.name,
            hook=hook.name,
            layer=hook.layer,
            metadata={"fingerprint": plan.fingerprint, "generation": plan.settings},
        )
    return manifests


def _remove_stray_temp_files(url: str) -> None:
    # A worker killed inside write_shard on a local disk leaves its uniquely named temp file.
    fs, path = storage.filesystem(url)
    shards_dir = storage.join(path, SHARDS_DIR)
    for name in storage.list_sizes(fs, shards_dir):
        if ".tmp-" in name:
            storage.remove_if_exists(fs, storage.join(shards_dir, name))


# ---------------------------------------------------------------------------------------------
# Ray


def _run_workers(
    config: GenerateConfig,
    spec: WorkerSpec,
    todo: list[CorpusShard],
    budgets: list[int | None],
    n_workers: int,
) -> tuple[list[ShardOutcome], int, float]:
    """Process ``todo`` on ``n_workers`` actors.

    Returns:
        The outcomes, the restart count, and the seconds until every worker was ready.
    """
    rc = config.ray
    actor_cls = ray.remote(concurrency_groups={"control": 1})(ShardWorker)
    tag = os.urandom(4).hex()
    t0 = time.perf_counter()
    actors = [
        actor_cls.options(
            **rc.actor_options(f"dictlearn-generate-{tag}-{i}"), max_concurrency=CONCURRENT_SHARDS
        ).remote(spec)
        for i in range(n_workers)
    ]
    try:
        pids = _wait_ready(actors, rc.start_timeout_s, rc)
        start_s = time.perf_counter() - t0
        outcomes = _dispatch(actors, todo, budgets, rc.max_in_flight, spec.context_length)
        restarts = 0
        for actor, pid in zip(actors, pids, strict=True):
            with contextlib.suppress(ray.exceptions.RayError):
                restarts += ray.get(actor.pid.remote(), timeout=60) != pid
        return outcomes, restarts, start_s
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _wait_ready(actors: list[Any], timeout: float, rc: Any) -> list[int]:
    refs = [actor.ready.remote() for actor in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(ready) < len(refs):
        raise UserError(
            f"only {len(ready)} of {len(refs)} generate workers started within "
            f"{timeout:.0f} s; each asks for {rc.cpus_per_worker} CPUs and "
            f"{dict(rc.resources_per_worker)} (is the cluster big enough? raise "
            "ray.start_timeout_s if it is still scaling up)"
        )
    return [_get(ref) for ref in refs]


def _get(ref: Any) -> Any:
    """``ray.get`` that re-raises a worker's bad-input error as itself, without Ray's wrapper."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, _USER_ERRORS):
            raise cause from None
        raise


def _dispatch(
    actors: list[Any],
    todo: list[CorpusShard],
    budgets: list[int | None],
    max_in_flight: int,
    context_length: int,
) -> list[ShardOutcome]:
    """Hand shards to workers, at most ``max_in_flight`` outstanding each, until all are done."""
    pending = collections.deque(todo)
    outstanding: dict[Any, int] = {}  # ref -> worker
    load = [0] * len(actors)
    outcomes: list[ShardOutcome] = []
    total_known = all(budgets[s.index] is not None for s in todo)
    bar = tqdm(
        total=sum(budgets[s.index] * context_length for s in todo) if total_known else None,
        unit="tok",
        unit_scale=True,
        desc=f"generate ({len(actors)} workers)",
        dynamic_ncols=True,
        disable=bool(os.environ.get("TQDM_DISABLE")),
    )

    def fill(worker: int) -> None:
        while load[worker] < max_in_flight and pending:
            shard = pending.popleft()
            ref = actors[worker].process.remote(shard, budgets[shard.index])
            outstanding[ref] = worker
            load[worker] += 1

    with bar:
        for worker in range(len(actors)):
            fill(worker)
        while outstanding:
            ready, _ = ray.wait(list(outstanding), num_returns=1)
            worker = outstanding.pop(ready[0])
            load[worker] -= 1
            outcome: ShardOutcome = _get(ready[0])
            outcomes.append(outcome)
            bar.update(outcome.lm_tokens)
            bar.set_postfix(shards=f"{len(outcomes)}/{len(todo)}")
            fill(worker)
    return outcomes
