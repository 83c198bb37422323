"""One worker's job: load the LM once, then turn corpus shards into activation shards.

:class:`ShardWorker` is plain Python (tests and benchmarks call it directly); ``generate`` runs it
as a Ray actor, one per accelerator host. Per corpus shard it reads the documents, packs them
into contexts, runs the compiled forward ``batch_size`` contexts at a time up to the last hooked
layer, drops the masked positions, and writes shard ``i`` of every hook's dataset with
:func:`~dictlearn.data.write_shard` (atomic; a redone shard overwrites). It returns the
sidecars; committing the dataset is the coordinator's job.

Keeping the device busy: the forward is compiled while the weights load (from their shapes),
reading and tokenizing run a few batches ahead in a background thread, and each batch is
dispatched before the previous one's activations are copied back and masked. A worker takes
:data:`CONCURRENT_SHARDS` calls at once (``generate`` makes it a threaded actor): the forward
passes of one shard at a time, under a lock, while the next shard's reader fills its queue and
the previous shard is checked, summarised and written, so the device does not wait for a write
or for the coordinator's next call at a shard boundary.

:func:`~dictlearn.activations.model.resolve_model` (re-exported here) is shared with the
coordinator, which calls it first to fail fast (missing package or file, hooks past the last
layer) before any worker starts.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ray

import sharding
from dictlearn import lm
from dictlearn.activations.model import ResolvedModel
from dictlearn.config import ConfigError
from dictlearn.corpus import (
    CorpusError,
    CorpusShard,
    batch_contexts,
    iter_documents,
    pack_documents,
    position_mask,
    token_mask,
)
from dictlearn.data import ShardInfo, write_shard
from sharding.host_memory import reuse_freed_host_memory


def parse_model_hooks(hooks: list[str], config: lm.Gemma3Config) -> tuple[lm.HookPoint, ...]:
    """Hook points checked against the model's layers.

    Raises:
        ConfigError: a layer the model does not have, naming the valid range.
    """
    try:
        return lm.parse_hooks(hooks, config)
    except ValueError as err:
        raise ConfigError(f"hooks: {err}") from None


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs; small and picklable (weights are loaded on the worker)."""

    model: ResolvedModel
    hooks: tuple[str, ...]
    outputs: dict[str, str]
    """Hook name -> dataset URL."""
    context_length: int
    batch_size: int
    exclude_positions: tuple[int, ...]
    exclude_token_ids: tuple[int, ...]
    dtype: str
    """Storage dtype, ``"float32"`` or ``"bfloat16"``."""
    mesh: sharding.MeshConfig | None = None
    """Mesh over the worker's local devices; None: one device."""


@dataclass
class ShardOutcome:
    """What a worker reports for one corpus shard."""

    index: int
    infos: dict[str, ShardInfo]
    """Hook name -> the committed sidecar of this shard in that hook's dataset."""
    contexts: int
    lm_tokens: int
    pid: int
    cpu_s: float
    """CPU seconds (all threads) the worker process spent while busy, since its previous outcome.

    With two shards in the worker at once their CPU cannot be told apart; attributing each busy
    interval once, to the next outcome returned, keeps the sum over outcomes exact."""


class _BusyCpu:
    """Process CPU seconds while at least one ``process`` call runs, handed out once each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._mark = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._active == 0:  # idle time before this call is nobody's
                self._mark = time.process_time()
            self._active += 1

    def leave(self) -> float:
        """The busy CPU seconds since the last ``leave``, or since becoming busy."""
        with self._lock:
            self._active -= 1
            now = time.process_time()
            spent, self._mark = now - self._mark, now
            return spent


@dataclass
class _Status:
    shard: int | None = None
    batches: int = 0
    contexts: int = 0
    shards_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


_PREFETCH_BATCHES = 4
"""Batches the background reader may have ready ahead of the forward."""

CONCURRENT_SHARDS = 2
"""``process`` calls one worker runs at once: one in its forward passes (a lock keeps the others
out), the other reading ahead or writing. Host memory holds up to this many shards' rows."""


@dataclass(frozen=True)
class _Batch:
    tokens: np.ndarray
    """``[batch_size, context_length]`` int32, the last batch padded by repeating its last row."""
    n: int
    """Real contexts (the first ``n`` rows)."""
    keep: np.ndarray
    """``[n, context_length]`` bool: the positions whose activations are written."""


class _Prefetch(Iterator[Any]):
    """Drive an iterator in a background thread, at most ``depth`` items ahead of the consumer.

    An exception the source raises is re-raised by ``__next__``, as itself, where the consumer
    would have met it. Leaving the ``with`` block (early, or on an error) stops the thread and
    closes the source.
    """

    _END = object()

    def __init__(self, source: Generator[Any, None, None], depth: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="dictlearn-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, source: Generator[Any, None, None]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(_Raised(err))
        finally:
            source.close()  # stopped early: close the corpus files now, not at collection

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item

    def __enter__(self) -> _Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _Raised:
    error: BaseException


class ShardWorker:
    """Holds the LM, its tokenizer and the compiled forward; processes one corpus shard per call."""

    def __init__(self, spec: WorkerSpec) -> None:
        reuse_freed_host_memory()  # before this actor's process starts JAX
        self.spec = spec
        config = spec.model.config
        hooks = lm.parse_hooks(spec.hooks, config)
        n_layers = max(h.layer for h in hooks) + 1
        dtype = jnp.float32 if spec.model.spec.dtype == "float32" else jnp.bfloat16
        store = jnp.float32 if spec.dtype == "float32" else jnp.bfloat16
        names = tuple(h.name for h in hooks)

        def forward(params: lm.Params, tokens: jax.Array) -> dict[str, jax.Array]:
            acts = lm.forward(params, config, tokens, hooks=names)
            # Cast on the device: bfloat16 halves the transfer, and the rounding is the same
            # round-to-nearest-even write_shard would apply.
            return {name: acts[name].astype(store) for name in names}

        # A mesh that does not fit this host is reported by ready()/process() as a ConfigError
        # (a task error reaches the coordinator as itself; a failed constructor would only
        # show up as a dead actor, restarted max_restarts times).
        self._setup_error: str | None = None
        self._batch_sharding: jax.sharding.NamedSharding | None = None
        mesh = None
        if spec.mesh is not None:
            try:
                mesh = sharding.make_mesh(spec.mesh, jax.local_devices())
            except ValueError as err:
                self._setup_error = f"mesh: {err} (counting this worker's local devices)"
            else:
                data = mesh.shape[sharding.DATA]
                if spec.batch_size % data:
                    self._setup_error = (
                        f"batch_size={spec.batch_size} is not a multiple of the mesh's data "
                        f"axis ({data} on this worker's {jax.local_device_count()} devices)"
                    )
                    mesh = None
                else:
                    self._batch_sharding = sharding.named_sharding(
                        mesh, (sharding.BATCH, sharding.SEQUENCE)
                    )
        # Compile from the shapes alone while the weights load: XLA's compiler releases the
        # GIL, the tokenizer and the dequantization mostly hold it, so the two overlap. The
        # one executable then serves every batch (all padded to batch_size): nothing is ever
        # recompiled.
        with concurrent.futures.ThreadPoolExecutor(1, "dictlearn-compile") as pool:
            compiled = None
            if self._setup_error is None:
                compiled = pool.submit(
                    _compile, forward, config, n_layers, dtype, mesh, self._batch_sharding, spec
                )
            self.params, self.tokenizer = _load_model(spec.model, n_layers, dtype)
            if mesh is not None:
                self.params = lm.shard_params(self.params, config, mesh)
            self._forward = compiled.result() if compiled is not None else None
        self._keep_positions = position_mask(spec.context_length, spec.exclude_positions)
        self._status = _Status()
        self._forward_lock = threading.Lock()
        self._cpu = _BusyCpu()

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """The worker's process id (tests kill it to check restarts)."""
        return os.getpid()

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        """``{shard, batches, contexts, shards_done}``: the shard whose forward passes are running
        (None between them) and its progress, and the shards written so far."""
        s = self._status
        with s.lock:
            return {
                "shard": s.shard,
                "batches": s.batches,
                "contexts": s.contexts,
                "shards_done": s.shards_done,
            }

    def ready(self) -> int:
        """The pid, once the model is loaded.

        Raises:
            ConfigError: the configured mesh does not fit this worker's devices.
        """
        if self._setup_error is not None:
            raise ConfigError(self._setup_error)
        return os.getpid()

    def process(self, shard: CorpusShard, max_contexts: int | None = None) -> ShardOutcome:
        """Write shard ``shard.index`` of every hook's dataset from that corpus shard.

        Up to :data:`CONCURRENT_SHARDS` threads may call this at once; their forward passes take
        turns, and reading and writing overlap them.

        Args:
            shard: The corpus shard to read.
            max_contexts: Use at most this many contexts (the shard's part of ``max_tokens``).

        Raises:
            CorpusError: the shard cannot be read, or yields no full context.
        """
        self.ready()
        self._cpu.enter()
        try:
            infos, n_contexts = self._process(shard, max_contexts)
        finally:
            cpu_s = self._cpu.leave()
        return ShardOutcome(
            index=shard.index,
            infos=infos,
            contexts=n_contexts,
            lm_tokens=n_contexts * self.spec.context_length,
            pid=os.getpid(),
            cpu_s=cpu_s,
        )

    def _process(
        self, shard: CorpusShard, max_contexts: int | None
    ) -> tuple[dict[str, ShardInfo], int]:
        spec = self.spec
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in spec.hooks}
        n_contexts = 0
        # Reading, tokenizing and packing run in a background thread a few batches ahead (from
        # the moment the call starts, so while another shard still holds the forward), and
        # batch i+1 is dispatched before batch i's activations are copied back and masked: the
        # host work overlaps the forward instead of leaving the device idle between batches.
        with (
            _Prefetch(self._batches(shard, max_contexts), _PREFETCH_BATCHES) as batches,
            self._forward_lock,
        ):
            with self._status.lock:
                self._status.shard, self._status.batches = shard.index, 0
                self._status.contexts = 0
            in_flight: tuple[_Batch, dict[str, jax.Array]] | None = None
            try:
                for batch in batches:
                    if self._batch_sharding is None:
                        tokens = jnp.asarray(batch.tokens)
                    else:
                        tokens = jax.device_put(batch.tokens, self._batch_sharding)
                    acts = self._forward(self.params, tokens)
                    if in_flight is not None:
                        n_contexts += self._collect(*in_flight, chunks)
                    in_flight = (batch, acts)
                if in_flight is not None:
                    n_contexts += self._collect(*in_flight, chunks)
            finally:
                with self._status.lock:
                    self._status.shard = None
        # The forward is free for the next shard from here: what follows is host work only.
        if n_contexts == 0:
            raise CorpusError(
                f"corpus shard {shard.index} of {shard.n_shards} ({_describe(shard)}) holds fewer "
                f"than context_length={spec.context_length} tokens; use fewer corpus.n_shards, "
                "a shorter context_length, or more text"
            )
        infos = {}
        for name, url in spec.outputs.items():
            rows = np.concatenate(chunks.pop(name))
            if rows.shape[0] == 0:
                raise CorpusError(
                    f"corpus shard {shard.index}: every position is excluded "
                    "(exclude_positions / exclude_token_ids); nothing to write"
                )
            infos[name] = write_shard(url, shard.index, rows, spec.dtype)
            del rows
        with self._status.lock:
            self._status.shards_done += 1
        return infos, n_contexts

    def _batches(
        self, shard: CorpusShard, max_contexts: int | None
    ) -> Generator[_Batch, None, None]:
        """The shard's contexts in batches padded to ``batch_size``, with their keep masks."""
        spec = self.spec
        contexts = pack_documents(iter_documents(shard), self.tokenizer, spec.context_length)
        if max_contexts is not None:
            contexts = itertools.islice(contexts, max_contexts)
        for batch in batch_contexts(contexts, spec.batch_size):
            n = batch.shape[0]
            # Pad the last batch to the full size: one compiled shape serves every batch.
            padded = np.concatenate([batch, np.repeat(batch[-1:], spec.batch_size - n, 0)])
            keep = self._keep_positions[None, :] & token_mask(batch, spec.exclude_token_ids)
            yield _Batch(padded, n, keep)

    def _collect(
        self, batch: _Batch, acts: dict[str, jax.Array], chunks: dict[str, list[np.ndarray]]
    ) -> int:
        """Copy one batch's activations to the host, keep the wanted rows; returns its contexts."""
        host = jax.device_get(acts)
        for name in self.spec.hooks:
            chunks[name].append(np.asarray(host[name])[: batch.n][batch.keep])
        with self._status.lock:
            self._status.batches += 1
            self._status.contexts += batch.n
        return batch.n


def _describe(shard: CorpusShard) -> str:
    first = shard.pieces[0].path if shard.pieces else "no files"
    more = f" and {len(shard.pieces) - 1} more pieces" if len(shard.pieces) > 1 else ""
    return f"{shard.n_documents} documents from {first}{more}"


def _load_model(
    model: ResolvedModel, n_layers: int, dtype: jnp.dtype
) -> tuple[lm.Params, lm.Tokenizer]:
    """The first ``n_layers`` blocks' params (on the default device) and the tokenizer."""
    config, source = model.config, model.spec
    if source.safetensors is not None:
        tokenizer = lm.Tokenizer.from_file(
            Path(source.safetensors) / "tokenizer.json",
            bos_id=config.bos_id,
            eos_id=config.eos_id,
            pad_id=config.pad_id,
        )
        params, _ = lm.load_safetensors(
            source.safetensors, config, max_layer=n_layers - 1, dtype=dtype
        )
        return params, tokenizer
    # None: the default package, assembled on this host if needed (and its checksum verified:
    # once here rather than once per loader).
    path = source.gguf if source.gguf is not None else lm.default_gguf_path()
    tokenizer = lm.Tokenizer.from_gguf(path)
    params, _ = lm.load_gguf(path, config, max_layer=n_layers - 1, dtype=dtype)
    return params, tokenizer


def _compile(
    forward: Callable[[lm.Params, jax.Array], dict[str, jax.Array]],
    config: lm.Gemma3Config,
    n_layers: int,
    dtype: jnp.dtype,
    mesh: jax.sharding.Mesh | None,
    batch_sharding: jax.sharding.NamedSharding | None,
    spec: WorkerSpec,
) -> jax.stages.Compiled:
    """``forward`` compiled for params shaped as the loaders make them and one batch shape.

    Both loaders give every leaf ``dtype`` and the shapes of :func:`lm.init_params`; a call
    with anything else raises rather than recompiles.
    """
    params = jax.eval_shape(lambda key: lm.init_params(key, config, dtype), jax.random.key(0))
    params["layers"] = params["layers"][:n_layers]
    if mesh is not None:
        shardings = lm.param_shardings(params, config, mesh)
        params = jax.tree.map(
            lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings
        )
    tokens = jax.ShapeDtypeStruct(
        (spec.batch_size, spec.context_length), jnp.int32, sharding=batch_sharding
    )
    return jax.jit(forward).lower(params, tokens).compile()
