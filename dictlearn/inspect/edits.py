"""Interventions made of an SAE: splice its reconstruction in, steer, clamp or ablate a feature.

Each returns a ``jax.tree_util.Partial`` (see :mod:`dictlearn.lm.interventions`) to put under the
SAE's hook: ``lm.logits(params, config, tokens, edits={sae.hook_name: clamp_feature(sae, 42,
10.0)})``. Features are in the SAE's own (raw-activation) units, so "clamp to 10" means the
feature's activation reads 10 afterwards, and steering by ``scale`` adds ``scale`` to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from dictlearn import lm
from dictlearn.export.model import ExportError, InferenceSAE, SAEParams
from dictlearn.lm.interventions import apply_at

Positions = jax.Array | None


def _splice(sae: SAEParams, positions: Positions, x: jax.Array) -> jax.Array:
    return apply_at(positions, sae.reconstruct(x).astype(x.dtype), x)


def _clamp(
    sae: SAEParams, feature: jax.Array, value: jax.Array, positions: Positions, x: jax.Array
) -> jax.Array:
    current = sae.encode(x)[..., feature]
    # Move only along the feature's decoder direction: the SAE's error term and every other
    # feature's contribution stay as they were.
    new = x + (value - current)[..., None] * sae.W_dec[feature]
    return apply_at(positions, new, x)


def check_feature(sae: InferenceSAE, feature: int) -> int:
    """``feature`` if it is a latent of ``sae``.

    Raises:
        ExportError: out of range, naming the valid range.
    """
    if not 0 <= feature < sae.d_sae:
        raise ExportError(
            f"feature {feature} is out of range: {sae.source or 'the SAE'} has features "
            f"0..{sae.d_sae - 1}"
        )
    return feature


def splice(sae: InferenceSAE, positions: Positions = None) -> Partial:
    """Replace the activation by the SAE's reconstruction (spliced evaluation)."""
    return Partial(_splice, sae.params(), positions)


def steer_feature(
    sae: InferenceSAE, feature: int, scale: float, positions: Positions = None
) -> Partial:
    """Add ``scale`` times the feature's decoder direction (its activation raised by ``scale``)."""
    return lm.add(sae.params().W_dec[check_feature(sae, feature)], scale, positions)


def clamp_feature(
    sae: InferenceSAE, feature: int, value: float, positions: Positions = None
) -> Partial:
    """Set the feature's activation to ``value`` wherever ``positions`` says (Golden Gate)."""
    return Partial(
        _clamp,
        sae.params(),
        jnp.int32(check_feature(sae, feature)),
        jnp.float32(value),
        positions,
    )


def ablate_feature(sae: InferenceSAE, feature: int, positions: Positions = None) -> Partial:
    """Remove the feature's contribution (clamp it to zero)."""
    return clamp_feature(sae, feature, 0.0, positions)
