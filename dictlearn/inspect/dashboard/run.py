"""``dictlearn dashboard``: one streaming pass over a corpus, then a static site per feature.

    dictlearn dashboard SAE_URL --out DIR [--tokens N] [--features 0,5,9] [--index URL] [k=v ...]

In order:

1. Load the SAE, check its hook and width against its model (headers only) and the feature ids
   against ``d_sae``; plan the corpus shards and split the token budget over them. Bad input
   fails here, before any model is loaded.
2. The pass: a :class:`DashboardWorker` (a ``dictlearn generate`` :class:`ShardWorker` that
   also holds the SAE) runs, per batch of contexts, the LM to the hook, the SAE's encoder and
   the collector's update in one jitted step. With ``ray.num_workers`` 1 it runs here; with
   more, Ray actors each take corpus shards and return their per-feature buffers, which are
   merged exactly on this process.
3. From the weights: promoted / suppressed tokens (decoder row through the unembedding) and
   nearest decoder neighbours (or the ``--index`` table).
4. Write the site (:mod:`dictlearn.inspect.dashboard.site`).
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ray
from tqdm.auto import tqdm

from dictlearn import lm
from dictlearn.activations.model import ResolvedModel
from dictlearn.activations.worker import ShardWorker, WorkerSpec
from dictlearn.config import ConfigError
from dictlearn.corpus import (
    CorpusError,
    CorpusShard,
    batch_contexts,
    iter_documents,
    pack_documents,
    plan_corpus_shards,
)
from dictlearn.errors import UserError
from dictlearn.export import InferenceSAE, load_sae
from dictlearn.inspect.dashboard import collector
from dictlearn.inspect.dashboard.config import DashboardConfig
from dictlearn.inspect.dashboard.site import SiteData, write_site
from dictlearn.inspect.dashboard.weights import (
    decoder_neighbours,
    logit_attribution,
    read_index_neighbours,
)
from dictlearn.inspect.text import resolve_source_model
from dictlearn.ray_cluster import ray_session
from sharding import MeshError


@dataclass
class DashboardResult:
    """What a dashboard run wrote."""

    out: str
    """The site's directory; open ``<out>/index.html``."""
    features: int
    """Feature pages written."""
    tokens: int
    """Valid tokens (BOS and separators excluded) the statistics cover."""
    lm_tokens: int
    """LM tokens run (contexts x context_length)."""
    seconds: float
    """Wall-clock time of the whole call."""
    pass_seconds: float
    """Wall-clock time of the streaming pass (model loading excluded where in-process)."""
    workers: int
    """Ray actors used (0: in this process)."""


@dataclass
class PassOutcome:
    """One worker's buffers for the shards it was given."""

    state: dict[str, Any]
    contexts: int
    cpu_s: float


class DashboardWorker(ShardWorker):
    """A ``generate`` LM worker that also holds the SAE and runs the dashboard step."""

    def __init__(
        self,
        spec: WorkerSpec,
        sae: InferenceSAE,
        features: np.ndarray,
        collector_spec: collector.CollectorSpec,
    ) -> None:
        super().__init__(spec)
        self.sae = sae
        self.features = np.asarray(features, np.int32)
        self.collector_spec = collector_spec
        column_of = np.full(sae.d_sae, -1, np.int32)  # SAE latent -> collector column
        column_of[self.features] = np.arange(len(self.features), dtype=np.int32)
        self._sae_arrays = {
            "sae": sae.params(),
            "features": jnp.asarray(self.features),
            "column_of": jnp.asarray(column_of),
        }
        config = spec.model.config
        (hook,) = spec.hooks
        rule, k = sae.architecture, sae.k or 0
        d_sae = sae.d_sae
        all_features = len(self.features) == sae.d_sae and bool(
            np.array_equal(self.features, np.arange(sae.d_sae))
        )

        def step(params, arrays, state, tokens, valid, ids):
            acts = lm.forward(params, config, tokens, hooks=(hook,))[hook].astype(jnp.float32)
            sparse = None
            sae_params = arrays["sae"]
            if rule == "topk":
                # InferenceSAE.encode's TopK, keeping its (values, indices) too: the collector's
                # histogram then scatters B*T*k pairs, not B*T*d_sae.
                values, indices = sae_params.top_k(acts)
                rows = jnp.arange(values.shape[0] * values.shape[1])[:, None]
                latents = (
                    jnp.zeros((rows.shape[0], d_sae), jnp.float32)
                    .at[rows, indices.reshape(-1, k)]
                    .set(values.reshape(-1, k))
                    .reshape(*values.shape[:-1], d_sae)
                )
                sparse = (values, arrays["column_of"][indices])
            else:
                latents = sae_params.encode(acts)
            if not all_features:  # encode every latent (TopK needs them all), keep the chosen
                latents = jnp.take(latents, arrays["features"], axis=2)
            return collector.update(
                state,
                latents,
                tokens,
                valid,
                ids,
                arrays["features"],
                sparse,
                spec=collector_spec,
            )

        self._step = jax.jit(step, donate_argnums=(2,))

    def dashboard_step(self, state: Any, tokens: np.ndarray, context_ids: np.ndarray) -> Any:
        """Fold one ``[batch_size, T]`` batch of contexts into ``state`` (jitted)."""
        valid = np.ones(tokens.shape, bool)
        valid[:, list(self.spec.exclude_positions)] = False
        valid &= ~np.isin(tokens, self.spec.exclude_token_ids)
        return self._step(
            self.params,
            self._sae_arrays,
            state,
            jnp.asarray(tokens),
            jnp.asarray(valid),
            jnp.asarray(context_ids, jnp.int32),
        )

    def collect(
        self,
        shard: CorpusShard,
        max_contexts: int | None,
        first_context_id: int,
        progress: Callable[[int], None] | None = None,
    ) -> PassOutcome:
        """Run the pass over one corpus shard; its contexts get ids from ``first_context_id``.

        Raises:
            ConfigError: the worker's mesh does not fit (as :meth:`ShardWorker.ready`).
        """
        self.ready()
        cpu0 = time.process_time()
        spec = self.spec
        contexts = pack_documents(iter_documents(shard), self.tokenizer, spec.context_length)
        if max_contexts is not None:
            contexts = itertools.islice(contexts, max_contexts)
        state = collector.init_state(self.collector_spec)
        n = 0
        batches = batch_contexts(contexts, spec.batch_size)
        batch = next(batches, None)
        while batch is not None:
            rows = batch.shape[0]
            ids = first_context_id + n + np.arange(spec.batch_size, dtype=np.int64)
            if rows < spec.batch_size:  # pad to one compiled shape; padded rows are all BOS
                pad = np.full((spec.batch_size - rows, batch.shape[1]), self.tokenizer.bos_id)
                batch = np.concatenate([batch, pad.astype(np.int32)])
            state = self.dashboard_step(state, batch, ids)
            batch = next(batches, None)  # read and tokenize the next batch while this one runs
            jax.block_until_ready(state)  # so the progress bar counts finished work
            n += rows
            if progress is not None:
                progress(rows * spec.context_length)
        return PassOutcome(collector.to_numpy(state), n, time.process_time() - cpu0)

    def attribution(self, top: int) -> dict[str, np.ndarray]:
        """Promoted / suppressed tokens of the chosen features (see :func:`logit_attribution`)."""
        return logit_attribution(
            self.sae.W_dec[self.features], self.params["embed"], self.params["final_norm"], top
        )


def check_features(config: DashboardConfig, d_sae: int) -> np.ndarray:
    """The feature ids to build pages for.

    Raises:
        ConfigError: an id outside ``[0, d_sae)``.
    """
    if config.features is not None:
        bad = [f for f in config.features if not 0 <= f < d_sae]
        if bad:
            raise ConfigError(
                f"features: {bad[0]} is out of range for an SAE with d_sae {d_sae} "
                f"(valid ids 0..{d_sae - 1})"
            )
        return np.asarray(config.features, np.int64)
    return np.arange(min(config.first or d_sae, d_sae), dtype=np.int64)


MAX_BUFFER_BYTES = 8 << 30
"""Largest per-worker collector state :func:`main` agrees to build (features x entries)."""


def check_memory(spec: collector.CollectorSpec) -> None:
    """Refuse buffers past :data:`MAX_BUFFER_BYTES` (a million-feature SAE needs ``first=``).

    Raises:
        ConfigError: naming the size and the settings that shrink it.
    """
    per_entry = 16 + 8 * spec.window_length  # value, context, position, start; tokens + acts
    size = spec.n_features * (spec.top_n + spec.n_samples) * per_entry
    if size > MAX_BUFFER_BYTES:
        raise ConfigError(
            f"the dashboard buffers of {spec.n_features} features would take "
            f"{size / 2**30:.1f} GiB per worker (top_n={spec.top_n}, n_samples={spec.n_samples},"
            f" window={spec.window}); pick fewer features (first=N or --features) or lower those"
        )


def context_budgets(tokens: int, context_length: int, n_shards: int) -> list[int]:
    """Contexts per shard: ``tokens // context_length`` split evenly (sizes differ by <= 1).

    Raises:
        ConfigError: fewer contexts than shards.
    """
    total = tokens // context_length
    if total < n_shards:
        raise ConfigError(
            f"tokens={tokens} is {total} contexts of context_length={context_length}, fewer "
            f"than corpus.n_shards={n_shards}; raise tokens or lower corpus.n_shards"
        )
    bounds = [total * i // n_shards for i in range(n_shards + 1)]
    return [hi - lo for lo, hi in itertools.pairwise(bounds)]


def worker_spec(config: DashboardConfig, model: ResolvedModel, hook: str) -> WorkerSpec:
    """The ``generate`` worker settings of a dashboard pass (nothing is written by it)."""
    return WorkerSpec(
        model=model,
        hooks=(hook,),
        outputs={},
        context_length=config.context_length,
        batch_size=config.batch_size,
        exclude_positions=(0,),
        exclude_token_ids=(model.config.bos_id,),
        dtype="float32",
    )


def collector_spec(config: DashboardConfig, n_features: int) -> collector.CollectorSpec:
    """The collector's buffer sizes for ``config``."""
    return collector.CollectorSpec(
        n_features=n_features,
        context_length=config.context_length,
        top_n=config.top_n,
        n_samples=config.n_samples,
        window=config.window,
    )


def main(config: DashboardConfig) -> DashboardResult:
    """Build the dashboards of ``config.sae`` over ``config.corpus`` into ``config.out``.

    Raises:
        ExportError: the SAE cannot be loaded, or its hook or ``d_in`` does not match its model.
        ConfigError: a feature id out of range, or too few tokens for the shards.
        CorpusError: the corpus is empty or unreadable, or yields no context.
    """
    t0 = time.perf_counter()
    sae = load_sae(config.sae)
    model, hook = resolve_source_model(sae, config.model)
    features = check_features(config, sae.d_sae)
    cspec = collector_spec(config, len(features))
    check_memory(cspec)
    shards = plan_corpus_shards(config.corpus)
    budgets = context_budgets(config.tokens, config.context_length, len(shards))
    first_ids = [0, *itertools.accumulate(budgets)][:-1]
    spec = worker_spec(config, model, hook.name)

    n_workers = min(config.ray.num_workers, len(shards))
    if n_workers <= 1:
        worker = DashboardWorker(spec, sae, features, cspec)
        t1 = time.perf_counter()
        outcomes = _run_in_process(worker, shards, budgets, first_ids, config.context_length)
        pass_seconds = time.perf_counter() - t1
        attribution = worker.attribution(config.logit_tokens)
        n_workers = 0
    else:
        rc = config.ray
        with ray_session(
            rc.address,
            actors=n_workers,
            resources_per_actor={"CPU": rc.cpus_per_worker} | rc.resources_per_worker,
        ):
            t1 = time.perf_counter()
            outcomes, attribution = _run_on_ray(
                config, spec, sae, features, cspec, shards, budgets, first_ids, n_workers
            )
            pass_seconds = time.perf_counter() - t1
    contexts = sum(o.contexts for o in outcomes)
    if contexts == 0:
        raise CorpusError(
            f"corpus {config.corpus.paths} yields no context of {config.context_length} tokens; "
            "use a shorter context_length or more text"
        )
    state = collector.merge_states([o.state for o in outcomes])

    if config.index is not None:
        neighbours = read_index_neighbours(config.index, features, config.neighbours)
    elif config.neighbours:
        neighbours = decoder_neighbours(sae.W_dec, features, config.neighbours)
    else:
        neighbours = (np.zeros((len(features), 0), np.int64), np.zeros((len(features), 0)))
    tokenizer = lm.Tokenizer.from_gguf(model.spec.gguf)
    data = SiteData(
        sae=sae,
        model_name=model.config.name,
        hook=hook.name,
        features=features,
        state=state,
        spec=cspec,
        attribution=attribution,
        neighbours=neighbours[0],
        neighbour_cosines=neighbours[1],
        lm_tokens=contexts * config.context_length,
        corpus=", ".join(config.corpus.paths),
        neuronpedia_model_id=config.neuronpedia_model_id
        or str(sae.metadata.get("model_name") or model.config.name),
        neuronpedia_sae_id=config.neuronpedia_sae_id or hook.name,
    )
    write_site(config.out, data, tokenizer)
    return DashboardResult(
        out=config.out,
        features=len(features),
        tokens=int(state["tokens_seen"]),
        lm_tokens=contexts * config.context_length,
        seconds=time.perf_counter() - t0,
        pass_seconds=pass_seconds,
        workers=n_workers,
    )


def _progress_bar(total: int, workers: int) -> tqdm:
    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"dashboard ({workers} workers)" if workers else "dashboard",
        dynamic_ncols=True,
        disable=bool(os.environ.get("TQDM_DISABLE")),
    )


def _run_in_process(
    worker: DashboardWorker,
    shards: list[CorpusShard],
    budgets: list[int],
    first_ids: list[int],
    context_length: int,
) -> list[PassOutcome]:
    outcomes = []
    with _progress_bar(sum(budgets) * context_length, 0) as bar:
        for shard, budget, first in zip(shards, budgets, first_ids, strict=True):
            outcomes.append(worker.collect(shard, budget, first, progress=bar.update))
    return outcomes


def _run_on_ray(
    config: DashboardConfig,
    spec: WorkerSpec,
    sae: InferenceSAE,
    features: np.ndarray,
    cspec: collector.CollectorSpec,
    shards: list[CorpusShard],
    budgets: list[int],
    first_ids: list[int],
    n_workers: int,
) -> tuple[list[PassOutcome], dict[str, np.ndarray]]:
    """Shards to ``n_workers`` actors (at most ``max_in_flight`` queued each); their buffers."""
    rc = config.ray
    actor_cls = ray.remote(concurrency_groups={"control": 1})(DashboardWorker)
    sae_ref = ray.put(sae)
    tag = os.urandom(4).hex()
    actors = [
        actor_cls.options(**rc.actor_options(f"dictlearn-dashboard-{tag}-{i}")).remote(
            spec, sae_ref, features, cspec
        )
        for i in range(n_workers)
    ]
    try:
        refs = [a.ready.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=n_workers, timeout=rc.start_timeout_s)
        if len(ready) < n_workers:
            raise UserError(
                f"only {len(ready)} of {n_workers} dashboard workers started within "
                f"{rc.start_timeout_s:.0f} s; each asks for {rc.cpus_per_worker} CPUs and "
                f"{dict(rc.resources_per_worker)} (is the cluster big enough?)"
            )
        for ref in refs:
            _get(ref)  # a worker's setup error (e.g. its mesh) as itself
        pending = collections.deque(range(len(shards)))
        outstanding: dict[Any, int] = {}
        load = [0] * n_workers
        outcomes: list[PassOutcome] = []

        def fill(w: int) -> None:
            while load[w] < rc.max_in_flight and pending:
                i = pending.popleft()
                ref = actors[w].collect.remote(shards[i], budgets[i], first_ids[i])
                outstanding[ref] = w
                load[w] += 1

        with _progress_bar(sum(budgets) * config.context_length, n_workers) as bar:
            for w in range(n_workers):
                fill(w)
            while outstanding:
                (done,), _ = ray.wait(list(outstanding), num_returns=1)
                w = outstanding.pop(done)
                load[w] -= 1
                outcome = _get(done)
                outcomes.append(outcome)
                bar.update(outcome.contexts * config.context_length)
                fill(w)
        attribution = _get(actors[0].attribution.remote(config.logit_tokens))
        return outcomes, attribution
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _get(ref: Any) -> Any:
    """``ray.get`` that re-raises a worker's bad-input error as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError | MeshError):
            raise err.cause from None
        raise
