"""The inference object every exported or loaded SAE becomes, whoever trained it.

An :class:`InferenceSAE` works on RAW activations of its hook: the input normalisation used in
training is folded into the weights at export, exactly as SAELens and Gemma Scope files expect
(``normalize_activations: none``). Three activation rules cover every architecture we train or
load:

- ``topk``: the ``k`` largest pre-activations of each token, ReLU'd (TopK SAEs);
- ``jumprelu``: ``pre * (pre > threshold)`` per latent (JumpReLU, and BatchTopK's inference
  form with one threshold for every latent);
- ``relu``: ``max(pre, 0)`` (ReLU + L1, SAELens's ``standard``).

``pre = (x - b_dec) @ W_enc + b_enc`` and ``x_hat = f @ W_dec + b_dec`` in every case.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn.errors import UserError
from dictlearn.sae.topk_select import top_k

ActivationRule = Literal["topk", "jumprelu", "relu"]
ACTIVATION_RULES: tuple[str, ...] = ("topk", "jumprelu", "relu")

WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class ExportError(UserError):
    """An SAE file, directory or export request is unusable; the message names it and the fix."""


@dataclass(frozen=True, eq=False)
class InferenceSAE:
    """A trained SAE in raw-activation space, ready for inference.

    Attributes:
        architecture: the activation rule (``topk``, ``jumprelu`` or ``relu``).
        W_enc: ``[d_in, d_sae]`` float32.
        b_enc: ``[d_sae]``.
        W_dec: ``[d_sae, d_in]``.
        b_dec: ``[d_in]``.
        threshold: ``[d_sae]`` for ``jumprelu``, else None.
        k: active latents per token for ``topk``, else None.
        metadata: where the SAE reads from and how it was made: ``model_name``, ``hook_name``,
            ``hook_layer``, ``trained_architecture`` and whatever the file recorded.
        source: the URL it was loaded from (empty for an SAE built in memory).
        log_feature_density: ``[d_sae]`` log10 firing frequency of each latent, if known.
    """

    architecture: ActivationRule
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray | None = None
    k: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    log_feature_density: np.ndarray | None = None

    def __post_init__(self) -> None:
        where = self.source or "SAE"
        if self.architecture not in ACTIVATION_RULES:
            raise ExportError(
                f"{where}: architecture {self.architecture!r} is not one of {ACTIVATION_RULES}"
            )
        d_in, d_sae = np.shape(self.W_enc)
        expected = {
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
        }
        if self.threshold is not None:
            expected["threshold"] = (d_sae,)
        if self.log_feature_density is not None:
            expected["log_feature_density"] = (d_sae,)
        for name, shape in expected.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise ExportError(
                    f"{where}: {name} has shape {got}, expected {shape} for W_enc [{d_in}, {d_sae}]"
                )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise ExportError(f"{where}: a jumprelu SAE needs a threshold [d_sae]")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise ExportError(f"{where}: a topk SAE needs k in [1, d_sae={d_sae}], got {self.k}")

    # --- shape ------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        """Input (activation) width."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.W_enc.shape[1])

    @property
    def hook_name(self) -> str | None:
        """The hook point the SAE reads (``resid_post.6``), if recorded."""
        return self.metadata.get("hook_name")

    @property
    def digest(self) -> str:
        """sha256 of the weights (names, shapes, dtypes and bytes): identifies the SAE."""
        h = hashlib.sha256(self.architecture.encode())
        h.update(str(self.k).encode())
        for name, array in self.arrays().items():
            if name == "log_feature_density":
                continue
            a = np.ascontiguousarray(array)
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights by their SAELens names (``threshold`` only where the rule has one)."""
        out = {name: getattr(self, name) for name in WEIGHT_NAMES}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.log_feature_density is not None:
            out["log_feature_density"] = self.log_feature_density
        return out

    # --- inference --------------------------------------------------------------------------
    def params(self) -> SAEParams:
        """The arrays as a :class:`SAEParams` pytree on the default device (cached)."""
        cached = self.__dict__.get("_params")
        if cached is None:
            cached = SAEParams(
                W_enc=jnp.asarray(self.W_enc),
                b_enc=jnp.asarray(self.b_enc),
                W_dec=jnp.asarray(self.W_dec),
                b_dec=jnp.asarray(self.b_dec),
                threshold=None if self.threshold is None else jnp.asarray(self.threshold),
                rule=self.architecture,
                k=self.k or 0,
            )
            object.__setattr__(self, "_params", cached)
        return cached

    def preactivations(self, x: jax.Array | np.ndarray) -> jax.Array:
        """``(x - b_dec) @ W_enc + b_enc`` for raw activations ``[..., d_in]``."""
        self._check_input(x)
        return _preactivations(self.params(), jnp.asarray(x, jnp.float32))

    def encode(self, x: jax.Array | np.ndarray) -> jax.Array:
        """Latents ``[..., d_sae]`` of raw activations ``[..., d_in]``."""
        self._check_input(x)
        return _encode(self.params(), jnp.asarray(x, jnp.float32))

    def decode(self, latents: jax.Array | np.ndarray) -> jax.Array:
        """Reconstructions ``[..., d_in]`` (raw activation space) of latents ``[..., d_sae]``."""
        if np.shape(latents)[-1] != self.d_sae:
            raise ExportError(
                f"{self.source or 'SAE'}: latents have width {np.shape(latents)[-1]}, "
                f"the SAE has d_sae {self.d_sae}"
            )
        return _decode(self.params(), jnp.asarray(latents, jnp.float32))

    def reconstruct(self, x: jax.Array | np.ndarray) -> jax.Array:
        """``decode(encode(x))`` (for TopK from the ``k`` active decoder rows alone)."""
        self._check_input(x)
        return _reconstruct(self.params(), jnp.asarray(x, jnp.float32))

    def features(self, x: jax.Array | np.ndarray, top: int = 10) -> tuple[jax.Array, jax.Array]:
        """The ``top`` most active latents of each row: ``(values, indices)``, each ``[..., top]``."""
        return jax.lax.top_k(self.encode(x), min(top, self.d_sae))

    def _check_input(self, x: jax.Array | np.ndarray) -> None:
        if np.shape(x)[-1] != self.d_in:
            hook = f" (hook {self.hook_name})" if self.hook_name else ""
            raise ExportError(
                f"{self.source or 'SAE'}: activations have width {np.shape(x)[-1]}, the SAE "
                f"reads d_in {self.d_in}{hook}"
            )


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
    meta_fields=["rule", "k"],
)
@dataclass(frozen=True)
class SAEParams:
    """An SAE's arrays as a pytree (the rule and ``k`` static), for use inside jitted code.

    Interventions (``dictlearn.inspect.edits``) carry one across ``jax.jit`` boundaries; the
    encode / decode here are THE implementation :class:`InferenceSAE` calls too.
    """

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    threshold: jax.Array | None
    rule: str
    k: int

    def preactivations(self, x: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: jax.Array) -> jax.Array:
        """Dense latents ``[..., d_sae]``."""
        if self.rule != "topk":
            pre = self.preactivations(x)
            if self.rule == "relu":
                return jax.nn.relu(pre)
            return jnp.where(pre > self.threshold, pre, 0.0)
        values, indices = self.top_k(x)
        flat_values, flat_indices = values.reshape(-1, self.k), indices.reshape(-1, self.k)
        rows = jnp.arange(flat_values.shape[0])[:, None]
        latents = jnp.zeros((flat_values.shape[0], self.W_enc.shape[1]), jnp.float32)
        latents = latents.at[rows, flat_indices].set(flat_values)
        return latents.reshape(*values.shape[:-1], self.W_enc.shape[1])

    def top_k(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """TopK's ``k`` ReLU'd values and their latent indices, ``[..., k]`` each.

        Exactly ``lax.top_k`` of the pre-activations (same tie order), through the trainer's
        top-k (the native kernel on CPU, where XLA's TopK is single-threaded).
        """
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        values, indices = top_k((flat - self.b_dec) @ self.W_enc, self.k, self.b_enc)
        shape = (*x.shape[:-1], self.k)
        return jax.nn.relu(values).reshape(shape), indices.reshape(shape)

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents @ self.W_dec + self.b_dec

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """``decode(encode(x))``; for TopK from the ``k`` active rows of ``W_dec`` alone."""
        if self.rule != "topk":
            return self.decode(self.encode(x))
        values, indices = self.top_k(x)
        return jnp.einsum("...k,...kd->...d", values, self.W_dec[indices]) + self.b_dec


@jax.jit
def _preactivations(sae: SAEParams, x: jax.Array) -> jax.Array:
    return sae.preactivations(x)


@jax.jit
def _encode(sae: SAEParams, x: jax.Array) -> jax.Array:
    return sae.encode(x)


@jax.jit
def _decode(sae: SAEParams, latents: jax.Array) -> jax.Array:
    return sae.decode(latents)


@jax.jit
def _reconstruct(sae: SAEParams, x: jax.Array) -> jax.Array:
    return sae.reconstruct(x)
