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

ActivationRule = Literal["topk", "jumprelu", "relu"]
ACTIVATION_RULES: tuple[str, ...] = ("topk", "jumprelu", "relu")

WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class ExportError(ValueError):
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
    def preactivations(self, x: jax.Array | np.ndarray) -> jax.Array:
        """``(x - b_dec) @ W_enc + b_enc`` for raw activations ``[..., d_in]``."""
        self._check_input(x)
        return _preactivations(jnp.asarray(x, jnp.float32), self.W_enc, self.b_enc, self.b_dec)

    def encode(self, x: jax.Array | np.ndarray) -> jax.Array:
        """Latents ``[..., d_sae]`` of raw activations ``[..., d_in]``."""
        self._check_input(x)
        return _encode(
            jnp.asarray(x, jnp.float32),
            self.W_enc,
            self.b_enc,
            self.b_dec,
            self.threshold,
            rule=self.architecture,
            k=self.k or 0,
        )

    def decode(self, latents: jax.Array | np.ndarray) -> jax.Array:
        """Reconstructions ``[..., d_in]`` (raw activation space) of latents ``[..., d_sae]``."""
        if np.shape(latents)[-1] != self.d_sae:
            raise ExportError(
                f"{self.source or 'SAE'}: latents have width {np.shape(latents)[-1]}, "
                f"the SAE has d_sae {self.d_sae}"
            )
        return _decode(jnp.asarray(latents, jnp.float32), self.W_dec, self.b_dec)

    def reconstruct(self, x: jax.Array | np.ndarray) -> jax.Array:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

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


@jax.jit
def _preactivations(x, w_enc, b_enc, b_dec):
    return (x - b_dec) @ w_enc + b_enc


@partial(jax.jit, static_argnames=("rule", "k"))
def _encode(x, w_enc, b_enc, b_dec, threshold, *, rule: str, k: int):
    pre = _preactivations(x, w_enc, b_enc, b_dec)
    if rule == "relu":
        return jax.nn.relu(pre)
    if rule == "jumprelu":
        return jnp.where(pre > threshold, pre, 0.0)
    values, indices = jax.lax.top_k(pre, k)
    flat_pre = pre.reshape(-1, pre.shape[-1])
    rows = jnp.arange(flat_pre.shape[0])[:, None]
    latents = (
        jnp.zeros_like(flat_pre)
        .at[rows, indices.reshape(-1, k)]
        .set(jax.nn.relu(values.reshape(-1, k)))
    )
    return latents.reshape(pre.shape)


@jax.jit
def _decode(latents, w_dec, b_dec):
    return latents @ w_dec + b_dec
