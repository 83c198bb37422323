"""One worker's job: load the LM once, then turn corpus shards into activation shards.

:class:`ShardWorker` is plain Python (tests and benchmarks call it directly); ``generate`` runs it
as a Ray actor, one per accelerator host. Per corpus shard it reads the documents, packs them
into contexts, runs the jitted forward ``batch_size`` contexts at a time up to the last hooked
layer, drops the masked positions, and writes shard ``i`` of every hook's dataset with
:func:`~dictlearn.data.write_shard` (atomic; a redone shard overwrites). It returns the
sidecars; committing the dataset is the coordinator's job.

:func:`~dictlearn.activations.model.resolve_model` (re-exported here) is shared with the
coordinator, which calls it first to fail fast (missing package or file, hooks past the last
layer) before any worker starts.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
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
    """CPU seconds (all threads) the worker process spent on the shard."""


@dataclass
class _Status:
    shard: int | None = None
    batches: int = 0
    contexts: int = 0
    shards_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ShardWorker:
    """Holds the LM, its tokenizer and the jitted forward; processes one corpus shard per call."""

    def __init__(self, spec: WorkerSpec) -> None:
        reuse_freed_host_memory()  # before this actor's process starts JAX
        self.spec = spec
        config = spec.model.config
        hooks = lm.parse_hooks(spec.hooks, config)
        max_layer = max(h.layer for h in hooks)
        dtype = jnp.float32 if spec.model.spec.dtype == "float32" else jnp.bfloat16
        model = spec.model.spec
        if model.safetensors is not None:
            self.params, _ = lm.load_safetensors(
                model.safetensors, config, max_layer=max_layer, dtype=dtype
            )
            self.tokenizer = lm.Tokenizer.from_file(
                Path(model.safetensors) / "tokenizer.json",
                bos_id=config.bos_id,
                eos_id=config.eos_id,
                pad_id=config.pad_id,
            )
        else:
            path = model.gguf  # None: the default package, assembled on this host if needed
            self.params, _ = lm.load_gguf(path, config, max_layer=max_layer, dtype=dtype)
            self.tokenizer = lm.Tokenizer.from_gguf(path)
        store = jnp.float32 if spec.dtype == "float32" else jnp.bfloat16
        names = tuple(h.name for h in hooks)

        def forward(params: lm.Params, tokens: jax.Array) -> dict[str, jax.Array]:
            acts = lm.forward(params, config, tokens, hooks=names)
            # Cast on the device: bfloat16 halves the transfer, and the rounding is the same
            # round-to-nearest-even write_shard would apply.
            return {name: acts[name].astype(store) for name in names}

        self._forward = jax.jit(forward)
        # A mesh that does not fit this host is reported by ready()/process() as a ConfigError
        # (a task error reaches the coordinator as itself; a failed constructor would only
        # show up as a dead actor, restarted max_restarts times).
        self._setup_error: str | None = None
        self._batch_sharding: jax.sharding.NamedSharding | None = None
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
                else:
                    self.params = lm.shard_params(self.params, config, mesh)
                    self._batch_sharding = sharding.named_sharding(
                        mesh, (sharding.BATCH, sharding.SEQUENCE)
                    )
        self._keep_positions = position_mask(spec.context_length, spec.exclude_positions)
        self._status = _Status()

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """The worker's process id (tests kill it to check restarts)."""
        return os.getpid()

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        """``{shard, batches, contexts, shards_done}``: the shard in progress (None if idle)."""
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

        Args:
            shard: The corpus shard to read.
            max_contexts: Use at most this many contexts (the shard's part of ``max_tokens``).

        Raises:
            CorpusError: the shard cannot be read, or yields no full context.
        """
        self.ready()
        cpu0 = time.process_time()
        spec = self.spec
        contexts = pack_documents(iter_documents(shard), self.tokenizer, spec.context_length)
        if max_contexts is not None:
            contexts = itertools.islice(contexts, max_contexts)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in spec.hooks}
        n_contexts = 0
        with self._status.lock:
            self._status.shard, self._status.batches, self._status.contexts = shard.index, 0, 0
        for batch in batch_contexts(contexts, spec.batch_size):
            n = batch.shape[0]
            # Pad the last batch to the full size so the forward compiles once per worker.
            padded = np.concatenate([batch, np.repeat(batch[-1:], spec.batch_size - n, 0)])
            if self._batch_sharding is None:
                tokens = jnp.asarray(padded)
            else:
                tokens = jax.device_put(padded, self._batch_sharding)
            acts = jax.device_get(self._forward(self.params, tokens))
            keep = self._keep_positions[None, :] & token_mask(batch, spec.exclude_token_ids)
            for name in spec.hooks:
                chunks[name].append(np.asarray(acts[name])[:n][keep])
            n_contexts += n
            with self._status.lock:
                self._status.batches += 1
                self._status.contexts = n_contexts
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
        with self._status.lock:
            self._status.shard = None
            self._status.shards_done += 1
        return ShardOutcome(
            index=shard.index,
            infos=infos,
            contexts=n_contexts,
            lm_tokens=n_contexts * spec.context_length,
            pid=os.getpid(),
            cpu_s=time.process_time() - cpu0,
        )


def _describe(shard: CorpusShard) -> str:
    first = shard.pieces[0].path if shard.pieces else "no files"
    more = f" and {len(shard.pieces) - 1} more pieces" if len(shard.pieces) > 1 else ""
    return f"{shard.n_documents} documents from {first}{more}"
