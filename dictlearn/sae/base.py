"""What every SAE architecture shares: parameters, the registry, and the pieces of a loss.

An architecture is a small class with ``init``, ``encode``, ``decode`` and ``loss``. The loss is
written from the point of view of ONE device inside ``shard_map``: it sees its slice of the batch
(``batch/data``) and its slice of the features (``features/model``), and uses explicit collectives
(``psum`` over ``model`` to finish a reconstruction, over ``data`` to finish a mean). The same code
therefore runs on a 1x1 mesh (the single-device reference) and on any larger mesh.

Conventions (the field's, see SAELens / OpenAI / Anthropic):
    W_enc [d_model, n_features], b_enc [n_features], W_dec [n_features, d_model], b_dec [d_model].
    pre = (x - b_dec) @ W_enc + b_enc;  x_hat = f @ W_dec + b_dec.
    Inputs are normalised (x * norm_scale) so E||x||^2 = d_model; the reconstruction loss is the
    mean over tokens of the squared error summed over d_model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from dictlearn.config import StrictModel
from dictlearn.errors import UserError
from sharding import BATCH, D_MODEL, FEATURES, mesh_axis
from sharding.varying import vary_over

Params = dict[str, jax.Array]
ArchState = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


EncoderDtype = Literal["float32", "bfloat16"]
"""Input dtype of the encoder's forward matmul (``BaseSAEConfig.encoder_dtype``)."""


DEAD_WINDOW_AVERAGE_FIRES = 128
"""The default dead window holds this many fires of a latent at the average rate: at 16,384
latents and L0 32 that is 65,536 tokens, the window measured best at 1M-4M tokens on planted
data and on Gemma 3 270M (``docs/real_quality.md``)."""
ASSUMED_L0 = 32
"""The L0 the default dead window assumes where the config sets none (ReLU-L1; JumpReLU without
``target_l0`` or ``init_l0``)."""
MAX_DEAD_WINDOW_TOKENS = 1 << 30
"""A latent's tokens-since-fired counter is int32; the window plus a batch must fit in it."""


class BaseSAEConfig(StrictModel):
    """Fields every architecture has. Subclasses add their own and a literal ``architecture``."""

    architecture: str = Field(description="Registered architecture name.")
    sparsity_penalty: ClassVar[bool] = False
    """Whether the loss has a sparsity penalty (what optimizer.sparsity_warmup_steps ramps)."""
    n_features: int = Field(16384, gt=0, description="Number of latents (d_sae).")
    d_model: int | None = Field(
        None, gt=0, description="Input width; None takes it from the activation dataset."
    )
    decoder_init_norm: float = Field(
        1.0, gt=0, description="L2 norm of each decoder row at initialisation."
    )
    init_b_dec_to_mean: bool = Field(
        True, description="Initialise b_dec at the (normalised) data mean."
    )
    learn_b_dec: bool = Field(
        True,
        description="Train b_dec (False: keep it where it was initialised, the data mean).",
    )
    encoder_dtype: EncoderDtype = Field(
        "float32",
        description=(
            "Input dtype of the encoder's dense forward matmul, the step's one dense matmul "
            "(it picks the active latents and their values); it accumulates in float32, and "
            "the sparse decoder, the backward pass, the optimizer and evaluation stay float32. "
            "bfloat16 runs it on bf16 matrix units: on an H200 at 1.3-1.8x the TF32 rate, a "
            "1M-latent TopK step 23 % shorter (docs/gpu.md); on CPUs with AMX the matmul 3-4x."
        ),
    )
    dead_window_tokens: int | None = Field(
        None,
        gt=0,
        le=MAX_DEAD_WINDOW_TOKENS,
        description=(
            "A latent that has not fired for this many tokens counts as dead (and AuxK, where the "
            "architecture has it, pulls it back). None: the tokens in which a latent firing at "
            "the average rate (L0 / n_features per token, L0 the architecture's k, target_l0 or "
            "init_l0, else 32) fires 128 times: 65,536 at 16,384 latents and L0 32, 262,144 at "
            "65,536. A window fixed in tokens counts a wide SAE's rare latents as dead: on Gemma "
            "3 270M at 65,536 latents and 1M tokens, 65,536 counted 55 % dead by the end (AuxK "
            "ran on every step, at 30 % fewer tokens/s) and 58 % fired on no held-out row, "
            "against 33 % with the derived 262,144 at equal FVU; at 32,768 latents 65,536 left "
            "fewer dead (5.8 % against 13.7 %) but a higher spliced loss (CE 2.840 against 2.822; "
            "docs/real_quality.md). With 10M (sparsify's default) AuxK never ran in a 1M-4M-token "
            "run at 16,384 latents; 65,536 took planted data's held-out dead fraction at 1M "
            "tokens from 1.1 % to 0.5 % (bench/planted_quality.py). On Gemma 3 270M, 32,768 took "
            "BatchTopK from 1.8 % to 0.3 % dead at 1M tokens for 2 % more FVU, but cost it 7 % "
            "FVU at 4M (TopK 6 %)."
        ),
    )

    @property
    def nominal_l0(self) -> float:
        """The L0 the architecture trains towards (its k or L0 target); what the default dead
        window assumes. :data:`ASSUMED_L0` where the config sets none."""
        return ASSUMED_L0

    @property
    def dead_window(self) -> int:
        """Tokens without a fire after which a latent counts as dead: ``dead_window_tokens``, or
        where that is None, the tokens in which a latent at the average rate
        (``nominal_l0 / n_features`` per token) fires :data:`DEAD_WINDOW_AVERAGE_FIRES` times."""
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        window = round(DEAD_WINDOW_AVERAGE_FIRES * self.n_features / self.nominal_l0)
        return min(MAX_DEAD_WINDOW_TOKENS, max(1, window))


class LossContext(NamedTuple):
    """Per-step values a loss needs that are not parameters."""

    global_batch: int
    """Tokens in the global batch (static)."""
    sparsity_scale: jax.Array | float = 1.0
    """Multiplier on the sparsity penalty in [0, 1] (its warm-up); traced inside the step."""
    any_dead: bool = False
    """Static: some latent is dead, so dead-latent losses (AuxK) must be computed. The
    trainer's step holds a variant of the whole gradient per value and picks on the device
    (``TrainProgram.step_fn``), so steps without dead latents pay nothing for them (a
    ``lax.cond`` around the loss term alone would still cost a full extra pass)."""
    few_dead: bool = False
    """Static, with ``any_dead``: at most the architecture's ``dense_dead_capacity`` latents are
    dead in all, so it may compute its dead-latent loss over that many compacted latents per
    shard (AuxK: dense matmuls over the dead latents instead of a per-token selection among all
    latents and its gathers)."""
    inference: bool = False
    """Static: score the model as it is used after training (the held-out evaluation). An
    architecture whose training-time selection differs from its exported rule (BatchTopK's
    batch-wide top-k vs its learned threshold) evaluates the exported rule."""


class Architecture(abc.ABC):
    """One SAE variant. Instances are cheap and hold only the (static) config."""

    name: ClassVar[str]
    config_cls: ClassVar[type[BaseSAEConfig]]
    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm (gradient projection + renormalisation each step)."""

    @property
    def uses_dead_latents(self) -> bool:
        """Whether the loss changes when latents are dead (then the step holds a variant with
        and one without dead-latent losses, and a compact one if ``dense_dead_capacity``)."""
        return False

    @property
    def dense_dead_capacity(self) -> int:
        """Most dead latents for which the dead-latent loss has a compact variant (0: none).
        The trainer runs it (``LossContext.few_dead``) on steps with that few dead."""
        return 0

    @property
    def lr_multipliers(self) -> dict[str, float]:
        """Parameters whose optimizer update is scaled (name → factor); the rest move at the lr."""
        return {}

    def __init__(self, config: BaseSAEConfig, d_model: int):
        self.config = config
        self.d_model = d_model

    # --- parameters -------------------------------------------------------------------------
    def param_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Logical axes of every parameter (``sharding`` maps them to the mesh)."""
        return {
            "W_enc": (D_MODEL, FEATURES),
            "b_enc": (FEATURES,),
            "W_dec": (FEATURES, D_MODEL),
            "b_dec": (D_MODEL,),
        }

    def init(self, key: jax.Array, data_mean: jax.Array | None) -> Params:
        """Unit-norm (scaled) random decoder rows, encoder = decoder transpose, b_dec = mean."""
        cfg = self.config
        w_dec = jax.random.normal(key, (cfg.n_features, self.d_model), jnp.float32)
        w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True) * cfg.decoder_init_norm
        b_dec = jnp.zeros((self.d_model,), jnp.float32)
        if cfg.init_b_dec_to_mean and data_mean is not None:
            b_dec = jnp.asarray(data_mean, jnp.float32)
        return {
            "W_enc": w_dec.T,
            "b_enc": jnp.zeros((cfg.n_features,), jnp.float32),
            "W_dec": w_dec,
            "b_dec": b_dec,
        }

    def state_axes(self) -> dict[str, tuple[str | None, ...]]:
        """Logical axes of the architecture's non-trained state (e.g. a running threshold)."""
        return {}

    def init_state(self) -> ArchState:
        return {}

    # --- dense single-device API (inference, export, eval of small models) ----------------
    @abc.abstractmethod
    def encode(self, params: Params, x: jax.Array, state: ArchState) -> jax.Array:
        """Dense latents ``[batch, n_features]`` for normalised inputs (inference semantics)."""

    def decode(self, params: Params, latents: jax.Array) -> jax.Array:
        return latents @ params["W_dec"] + params["b_dec"]

    # --- training ---------------------------------------------------------------------------
    @abc.abstractmethod
    def local_loss(
        self, params: Params, x: jax.Array, state: ArchState, dead: jax.Array, ctx: LossContext
    ) -> tuple[jax.Array, LocalOutputs]:
        """Loss on one device's shard (inside ``shard_map``); see the module docstring.

        Args:
            params: this device's parameter slices.
            x: this device's normalised batch slice ``[batch/data, d_model]``.
            state: this device's slice of the architecture state.
            dead: bool ``[n_features/model]``, latents currently counted dead.
            ctx: global batch size and the sparsity warm-up scale.

        Returns:
            The GLOBAL scalar loss (already reduced over ``data``), and the outputs below.
        """

    def update_state(self, state: ArchState, stats: dict[str, jax.Array]) -> ArchState:
        """Fold per-step statistics (from ``LocalOutputs.state_stats``) into the state."""
        return state

    @property
    def initialises_from_data(self) -> bool:
        """Whether ``local_data_init`` sets parameters from the first training batch."""
        return False

    def local_data_init(self, params: Params, x: jax.Array, global_batch: int) -> Params:
        """Parameters set from the first training batch, before the first step.

        Runs inside ``shard_map`` like ``local_loss``: ``params`` is this device's feature
        slice, ``x`` its rows of the normalised batch. Only called when
        ``initialises_from_data``; the optimizer state is made anew from the result.
        """
        return params

    @property
    def calibration_batches(self) -> int:
        """Batches the trained model reads, forward only, to set its state at the end of training
        (0: none; the state is what ``update_state`` made of the steps)."""
        return 0

    def calibrated_state(self, state: ArchState, samples: dict[str, jax.Array]) -> ArchState:
        """The state of the trained model from ``calibration_batches`` batches' statistics.

        ``samples`` holds each ``LocalOutputs.state_stats`` entry of the final parameters on
        those batches, stacked along a leading axis.
        """
        return state


class LocalOutputs(NamedTuple):
    """What a local loss returns besides the loss."""

    metrics: Metrics
    """Global scalars (already reduced over every mesh axis)."""
    fire_counts: jax.Array
    """int32 ``[n_features/model]``: tokens of the global batch on which each latent fired."""
    state_stats: dict[str, jax.Array]
    """Architecture-specific global statistics for ``update_state``."""


# --- registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make ``cls`` selectable as ``sae.architecture: <cls.name>``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"architecture {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_architecture(config: BaseSAEConfig, d_model: int) -> Architecture:
    """Instantiate the registered architecture named by ``config.architecture``."""
    try:
        cls = _REGISTRY[config.architecture]
    except KeyError:
        raise UserError(
            f"sae.architecture={config.architecture!r} is not registered; "
            f"choose one of {sorted(_REGISTRY)}"
        ) from None
    return cls(config, d_model)


def registered_architectures() -> dict[str, type[Architecture]]:
    return dict(_REGISTRY)


# --- shared loss pieces (device-local, collective-aware) -----------------------------------
def as_varying(
    x: jax.Array, axes: tuple[str, ...] = (mesh_axis(BATCH), mesh_axis(FEATURES))
) -> jax.Array:
    """Mark ``x`` as per-device over ``axes`` (inside shard_map).

    The sparse backward rule produces per-device cotangents (each device saw different tokens
    and features); casting its replicated inputs to "varying" first makes JAX sum those
    cotangents over the axes the input was replicated on, which is exactly the gradient.
    """
    return vary_over(x, axes)


def global_sum(value: jax.Array) -> jax.Array:
    """Sum a per-token quantity over the data axis (each device holds different tokens)."""
    return jax.lax.psum(value, mesh_axis(BATCH))


def finish_reconstruction(partial: jax.Array, b_dec: jax.Array) -> jax.Array:
    """Sum per-shard partial reconstructions over the feature shards and add the bias."""
    return jax.lax.psum(partial, mesh_axis(FEATURES)) + b_dec


def encoder_matmul(params: Params, x: jax.Array) -> jax.Array:
    """``(x - b_dec) @ W_enc`` for this device's feature slice (pre-activations less b_enc).

    The product takes ``W_enc``'s dtype for its inputs and accumulates in float32: with a
    bfloat16 ``W_enc`` (``with_encoder_dtype``) it runs on bf16 tensor cores.
    """
    w_enc = params["W_enc"]
    centered = x - params["b_dec"]
    if w_enc.dtype == jnp.float32:
        return centered @ w_enc
    return jnp.matmul(centered.astype(w_enc.dtype), w_enc, preferred_element_type=jnp.float32)


def with_encoder_dtype(params: Params, dtype: EncoderDtype) -> Params:
    """``params`` with ``W_enc`` cast to ``dtype`` for ``encoder_matmul``: done once per step,
    outside the token-chunk loop, so the cast is not repeated per chunk. Only for the
    no-gradient selection pass (the cast has no useful gradient)."""
    if dtype == "float32":
        return params
    return params | {"W_enc": params["W_enc"].astype(jnp.dtype(dtype))}


def preactivations(params: Params, x: jax.Array) -> jax.Array:
    """``(x - b_dec) @ W_enc + b_enc`` for this device's feature slice."""
    return encoder_matmul(params, x) + params["b_enc"]


def reconstruction_metrics(
    x: jax.Array, x_hat: jax.Array, l0_per_token: jax.Array, global_batch: int
) -> tuple[jax.Array, Metrics]:
    """Reconstruction loss (global mean of summed squared error) and the standard metrics.

    ``l0_per_token`` is this device's per-token count of active latents in its feature slice;
    it is summed over ``model`` here.
    """
    err = x_hat - x
    sq = jnp.sum(err * err, axis=-1)
    sum_sq = global_sum(jnp.sum(sq))
    recon = sum_sq / global_batch
    # FVU against the batch mean: sum||x - x_hat||^2 / sum||x - mean(x)||^2.
    mean_x = global_sum(jnp.sum(x, axis=0)) / global_batch
    total_var = global_sum(jnp.sum((x - mean_x) ** 2))
    l0 = global_sum(jnp.sum(jax.lax.psum(l0_per_token, mesh_axis(FEATURES)))) / global_batch
    metrics = {
        "recon_loss": recon,
        "mse": recon / x.shape[-1],
        "fvu": sum_sq / total_var,
        "l0": l0,
    }
    return recon, metrics


def fire_counts_from_dense(active: jax.Array) -> jax.Array:
    """Per-latent number of tokens (over the global batch) on which each local latent fired."""
    return global_sum(jnp.sum(active, axis=0, dtype=jnp.int32))


def remove_parallel_component(grad_w_dec: jax.Array, w_dec: jax.Array) -> jax.Array:
    """Project out the gradient component along each (unit) decoder row (OpenAI's TopK recipe).

    Without it Adam's update partly fights the renormalisation that follows every step.
    """
    unit = w_dec / (jnp.linalg.norm(w_dec, axis=1, keepdims=True) + 1e-12)
    return grad_w_dec - jnp.sum(grad_w_dec * unit, axis=1, keepdims=True) * unit


def renormalise_rows(w_dec: jax.Array) -> jax.Array:
    return w_dec / (jnp.linalg.norm(w_dec, axis=1, keepdims=True) + 1e-12)


Reduction = Callable[[jax.Array], jax.Array]
ArchitectureName = Literal["topk", "batchtopk", "jumprelu", "relu_l1"]
