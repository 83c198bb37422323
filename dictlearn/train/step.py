"""The train state and the pure, jitted train step.

``train_step(state, batch) -> (state, metrics)`` is one function over a pytree state, jitted once
with explicit shardings and the state donated. Everything that changes per step lives inside it:
the loss (in ``shard_map``, see ``dictlearn.sae.base``), the decoder-norm projection, the
optimizer update, dead-latent bookkeeping and the architecture's running statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from dictlearn.errors import UserError
from dictlearn.sae import Architecture, LocalOutputs, LossContext
from dictlearn.sae.base import remove_parallel_component, renormalise_rows
from dictlearn.train.config import OptimizerConfig
from dictlearn.train.optimizer import (
    learning_rate_schedule,
    make_optimizer,
    schedule_free_average,
    schedule_free_train_point,
    sparsity_schedule,
)
from sharding import (
    BATCH,
    D_MODEL,
    DATA,
    FEATURES,
    logical_to_spec,
    named_sharding,
    replicated,
)


class TrainState(NamedTuple):
    """Everything a resumed run needs from the device side."""

    step: jax.Array
    params: dict[str, jax.Array]
    opt_state: Any
    arch_state: dict[str, jax.Array]
    tokens_since_fired: jax.Array
    """int32 ``[n_features]``: tokens since each latent last fired (saturates at the window)."""


class TrainProgram:
    """Compiled init / train / eval functions for one architecture on one mesh.

    Args:
        arch: the SAE architecture (holds its config).
        optimizer_config: optimizer and schedules.
        total_steps: length of the run (for the lr decay).
        global_batch: tokens per global batch.
        mesh: the ``(data, model)`` mesh.
        norm_scale: input normalisation factor applied inside the step.
    """

    def __init__(
        self,
        arch: Architecture,
        optimizer_config: OptimizerConfig,
        total_steps: int,
        global_batch: int,
        mesh: Mesh,
        norm_scale: float,
    ):
        self.arch = arch
        self.mesh = mesh
        self.global_batch = global_batch
        self.norm_scale = float(norm_scale)
        self.optimizer = make_optimizer(optimizer_config, total_steps, arch.lr_multipliers)
        self.schedule_free = optimizer_config.schedule_free
        self.lr_schedule = learning_rate_schedule(optimizer_config, total_steps)
        self.sparsity_schedule = sparsity_schedule(optimizer_config)
        self.dead_window = arch.config.dead_window
        self.total_steps = total_steps
        self._check_divisible()

        self.param_shardings = {
            k: named_sharding(mesh, axes) for k, axes in arch.param_axes().items()
        }
        self.arch_state_shardings = {
            k: named_sharding(mesh, axes) for k, axes in arch.state_axes().items()
        }
        self.batch_sharding = named_sharding(mesh, (BATCH, D_MODEL))
        self.state_shardings = self._state_shardings()

        self.init = jax.jit(self._init, out_shardings=self.state_shardings)
        self._steps: dict[bool | None, Any] = {}
        self._calibration: tuple[Any, Any] | None = None
        self._data_init: Any = None
        self.eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=replicated(mesh),
        )

    def step_fn(self, any_dead: bool | None = None):
        """The jitted ``train_step(state, batch) -> (state, metrics)`` (state donated).

        ``any_dead`` picks how dead-latent losses (AuxK) are switched: None (the trainer's) on
        the device, from the state, so the host never waits on a step to dispatch the next
        (with at most ``arch.dense_dead_capacity`` dead latents, their compact variant);
        True / False compile them always (their variant for any number of dead latents) /
        never, for memory plans and tests. Each value compiles once, on first use.
        """
        if any_dead is not None:
            any_dead = bool(any_dead) and self.arch.uses_dead_latents
        if any_dead not in self._steps:
            self._steps[any_dead] = jax.jit(
                partial(self._train_step, any_dead=any_dead),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._steps[any_dead]

    def train_step(self, state: TrainState, batch: jax.Array):
        """One step; dead-latent losses switch on the device (no device->host read)."""
        return self.step_fn()(state, batch)

    @property
    def dead_latents_possible(self) -> bool:
        """Whether a latent can be dead at some step of the run (else AuxK never compiles).

        A latent's ``tokens_since_fired`` grows by one batch a step from 0, so before step
        ``total_steps - 1`` it is at most ``(total_steps - 1) * global_batch`` tokens. Runs on
        either side of the window compile different step programs, which round differently: a
        branch (``TrainConfig.init``) equals its run from scratch bit for bit only where its
        trunk is on the same side.
        """
        reach = (self.total_steps - 1) * self.global_batch
        return self.arch.uses_dead_latents and reach >= self.dead_window

    # --- layout ------------------------------------------------------------------------------
    def _check_divisible(self) -> None:
        data, model = self.mesh.shape["data"], self.mesh.shape["model"]
        n = self.arch.config.n_features
        if n % model:
            raise UserError(f"sae.n_features={n} must be divisible by mesh.model={model}")
        if self.global_batch % data:
            raise UserError(
                f"train.batch_size={self.global_batch} must be divisible by mesh.data={data}"
            )

    def _state_shardings(self) -> TrainState:
        rep = replicated(self.mesh)
        abstract_params = jax.eval_shape(lambda: self.arch.init(jax.random.key(0), None))
        opt_shape = jax.eval_shape(self.optimizer.init, abstract_params)
        opt_shardings = optax.tree_map_params(
            self.optimizer,
            lambda _, sharding: sharding,
            opt_shape,
            self.param_shardings,
            transform_non_params=lambda _: rep,
        )
        return TrainState(
            step=rep,
            params=self.param_shardings,
            opt_state=opt_shardings,
            arch_state=self.arch_state_shardings,
            tokens_since_fired=named_sharding(self.mesh, (FEATURES,)),
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, allocating nothing (for restore/compile)."""
        shapes = jax.eval_shape(self._init, jax.random.key(0), jnp.zeros(self.arch.d_model))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(
            (self.global_batch, self.arch.d_model), jnp.float32, sharding=self.batch_sharding
        )

    # --- functions ---------------------------------------------------------------------------
    def _init(self, key: jax.Array, data_mean: jax.Array) -> TrainState:
        params = self.arch.init(key, data_mean * self.norm_scale)
        return TrainState(
            step=jnp.int32(0),
            params=params,
            opt_state=self.optimizer.init(params),
            arch_state=self.arch.init_state(),
            tokens_since_fired=jnp.zeros((self.arch.config.n_features,), jnp.int32),
        )

    def _loss(
        self,
        params,
        arch_state,
        dead,
        x,
        sparsity_scale,
        any_dead=False,
        inference=False,
        few_dead=False,
    ):
        arch, ctx_batch = self.arch, self.global_batch
        param_specs = {k: s.spec for k, s in self.param_shardings.items()}
        if self.mesh.shape[DATA] == 1:
            param_specs = {k: _split_over_size_one_data_axis(s) for k, s in param_specs.items()}
        arch_specs = {k: s.spec for k, s in self.arch_state_shardings.items()}
        rep = logical_to_spec(())

        def local(params, arch_state, dead, x, sparsity_scale):
            ctx = LossContext(
                global_batch=ctx_batch,
                sparsity_scale=sparsity_scale,
                any_dead=any_dead,
                few_dead=few_dead,
                inference=inference,
            )
            return arch.local_loss(params, x, arch_state, dead, ctx)

        out = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(
                param_specs,
                arch_specs,
                logical_to_spec((FEATURES,)),
                logical_to_spec((BATCH, D_MODEL)),
                rep,
            ),
            out_specs=(rep, LocalOutputs(rep, logical_to_spec((FEATURES,)), rep)),
        )(params, arch_state, dead, x, sparsity_scale)
        loss, (metrics, fire_counts, state_stats) = out
        return loss, (metrics, fire_counts, state_stats)

    def _dead(self, state: TrainState) -> jax.Array:
        return state.tokens_since_fired >= self.dead_window

    def _train_step(self, state: TrainState, batch: jax.Array, any_dead: bool | None):
        x = batch.astype(jnp.float32) * self.norm_scale  # bf16 rows widen exactly
        dead = self._dead(state)
        scale = self.sparsity_schedule(state.step)
        # Gradients are taken at `point`: the parameters themselves, or for a schedule-free
        # optimizer its interpolation between the average (kept as the parameters) and z.
        point = state.params
        if self.schedule_free:
            point = schedule_free_train_point(state.opt_state, state.params)
            if self.arch.unit_norm_decoder:
                # The decoder rows the loss sees are unit norm, as sparsify renormalises its
                # (schedule-free) parameters before every forward; the average is not projected.
                point = point | {"W_dec": renormalise_rows(point["W_dec"])}

        def loss_and_grads(with_dead: bool, few_dead: bool = False):
            return jax.value_and_grad(
                partial(self._loss, any_dead=with_dead, few_dead=few_dead),
                has_aux=True,
            )

        operands = (point, state.arch_state, dead, x, scale)
        if any_dead is None and self.dead_latents_possible:
            # All variants in one program and the device picks: the host never reads a step's
            # result to dispatch the next. The switch wraps the whole gradient, not just the
            # dead-latent terms: around those alone, the untaken branch still writes zeros for
            # the other's residuals and gradients (parameter-sized, ~10% of a step on CPU).
            # With few dead latents (the usual case) the loss's compact variant runs.
            n_dead = jnp.sum(dead)
            variants = [loss_and_grads(False), loss_and_grads(True)]
            branch = (n_dead > 0).astype(jnp.int32)
            capacity = self.arch.dense_dead_capacity
            if capacity:
                variants.append(loss_and_grads(True, few_dead=True))
                branch = jnp.where((n_dead > 0) & (n_dead <= capacity), 2, branch)
            out = jax.lax.switch(branch, variants, *operands)
        else:
            out = loss_and_grads(bool(any_dead))(*operands)
        (_, (metrics, fire_counts, stats)), grads = out
        if not self.arch.config.learn_b_dec:
            # No gradient, so b_dec neither counts in the clip norm nor fills optimizer moments;
            # it is also carried over below, as schedule-free's average would round it.
            grads = grads | {"b_dec": jnp.zeros_like(grads["b_dec"])}
        if self.arch.unit_norm_decoder:
            grads = grads | {"W_dec": remove_parallel_component(grads["W_dec"], point["W_dec"])}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, point)
        params = optax.apply_updates(point, updates)
        if self.schedule_free:
            params = schedule_free_average(opt_state, params)
        elif self.arch.unit_norm_decoder:
            params = params | {"W_dec": renormalise_rows(params["W_dec"])}
        if not self.arch.config.learn_b_dec:
            params = params | {"b_dec": state.params["b_dec"]}
        tokens_since_fired = jnp.where(
            fire_counts > 0,
            0,
            jnp.minimum(state.tokens_since_fired + self.global_batch, self.dead_window),
        )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            arch_state=self.arch.update_state(state.arch_state, stats),
            tokens_since_fired=tokens_since_fired,
        )
        metrics = metrics | {
            "dead_fraction": jnp.mean(dead.astype(jnp.float32)),
            "dead_count_next": jnp.sum(tokens_since_fired >= self.dead_window, dtype=jnp.int32),
            "grad_norm": grad_norm,
            "lr": self.lr_schedule(state.step),
            "sparsity_scale": jnp.asarray(scale, jnp.float32),
        }
        return new_state, metrics

    def initialise_from_data(self, state: TrainState, batch: jax.Array) -> TrainState:
        """``state`` (fresh from ``init``) with the parameters the architecture sets from
        ``batch``, the run's first, and its optimizer state made anew from them.

        The identity for architectures that set nothing from data (``initialises_from_data``).
        """
        if not self.arch.initialises_from_data:
            return state
        if self._data_init is None:
            self._data_init = jax.jit(
                self._initialised_from_data,
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=self.state_shardings,
            )
        return self._data_init(state, batch)

    def _initialised_from_data(self, state: TrainState, batch: jax.Array) -> TrainState:
        x = batch.astype(jnp.float32) * self.norm_scale
        param_specs = {k: s.spec for k, s in self.param_shardings.items()}
        params = jax.shard_map(
            partial(self.arch.local_data_init, global_batch=self.global_batch),
            mesh=self.mesh,
            in_specs=(param_specs, logical_to_spec((BATCH, D_MODEL))),
            out_specs=param_specs,
            # What is set from data is agreed over ``data`` by an all_gather, which JAX still
            # types as varying there; every data shard holds the same value.
            check_vma=False,
        )(state.params, x)
        return state._replace(params=params, opt_state=self.optimizer.init(params))

    def calibrate(self, state: TrainState, batches: Iterable[jax.Array]) -> TrainState:
        """``state`` with the architecture state the trained parameters give on ``batches``.

        Each batch runs the training forward (no gradient, nothing trained) with the state's
        parameters, the ones an export takes; ``Architecture.calibrated_state`` turns the
        batches' statistics into the new architecture state (BatchTopK: its threshold).
        """
        if self._calibration is None:
            self._calibration = (
                jax.jit(
                    self._calibration_stats,
                    in_shardings=(self.state_shardings, self.batch_sharding),
                    out_shardings=replicated(self.mesh),
                ),
                jax.jit(
                    lambda arch_state, samples: self.arch.calibrated_state(arch_state, samples),
                    out_shardings=self.arch_state_shardings,
                ),
            )
        stats_of, calibrated = self._calibration
        samples = [stats_of(state, batch) for batch in batches]
        if not samples:
            return state
        stacked = jax.tree.map(lambda *values: jnp.stack(values), *samples)
        return state._replace(arch_state=calibrated(state.arch_state, stacked))

    def _calibration_stats(self, state: TrainState, batch: jax.Array):
        x = batch.astype(jnp.float32) * self.norm_scale
        _, (_, _, stats) = self._loss(
            state.params, state.arch_state, self._dead(state), x, jnp.float32(1.0)
        )
        return stats

    def _eval_step(self, state: TrainState, batch: jax.Array):
        x = batch.astype(jnp.float32) * self.norm_scale
        _, (metrics, _, _) = self._loss(
            state.params, state.arch_state, self._dead(state), x, jnp.float32(1.0), inference=True
        )
        return metrics

    # --- host helpers -----------------------------------------------------------------------
    def global_batch_array(self, local_rows: np.ndarray) -> jax.Array:
        """Assemble this process's rows into the global, data-sharded batch array.

        bfloat16 rows (a bf16 dataset read as stored) travel to the devices as bf16, half the
        bytes of float32, and the step widens them there, exactly; anything else is float32.
        """
        dtype = jnp.bfloat16 if local_rows.dtype == jnp.bfloat16 else np.float32
        return jax.make_array_from_process_local_data(
            self.batch_sharding,
            np.ascontiguousarray(local_rows, dtype=dtype),
            (self.global_batch, self.arch.d_model),
        )


def _split_over_size_one_data_axis(spec: PartitionSpec) -> PartitionSpec:
    """``spec`` with its first dimension also split over a size-1 ``data`` axis.

    A parameter replicated over ``data`` enters ``shard_map`` as invariant over it, so its
    gradient leaves through a ``psum`` over ``data``. XLA:CPU keeps that all-reduce even with one
    participant, as a copy of every gradient (~8 ms a step at 16,384 latents). Over a size-1
    axis, "split" and "replicated" are the same layout; typed as split, there is no psum.
    """
    if not spec:
        return spec
    first = spec[0]
    if first is None:
        merged: Any = DATA
    else:
        merged = (DATA, *first) if isinstance(first, tuple) else (DATA, first)
    return PartitionSpec(merged, *spec[1:])


def unsharded_copy(tree: Any) -> Any:
    """Host copy of a (possibly sharded) pytree: for comparisons and exports."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
