"""Which features a piece of text lights up: the SAE's source LM run to its hook, token by token.

    lm_for_sae = SourceModel.for_sae(sae)            # Gemma 3 270M from its PyPI package
    for token in token_features(sae, lm_for_sae, "The Golden Gate Bridge", top=5):
        print(token.text, token.features)

Works for any SAE whose metadata names a model we can run (``model_name``) and one of its hook
points (``hook_name``: ``resid_post.L``, ``attn_out.L``, ``mlp_out.L``), ours or loaded from
another tool's files.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from dictlearn import lm
from dictlearn.activations.config import ModelConfig
from dictlearn.activations.model import ResolvedModel, resolve_model
from dictlearn.config import ConfigError
from dictlearn.export.model import ExportError, InferenceSAE


@dataclass(frozen=True)
class TokenFeatures:
    """One token of the text and its most active features."""

    position: int
    token_id: int
    text: str
    features: list[tuple[int, float]]
    """``(feature, activation)`` pairs, most active first; only features that fire."""


@dataclass
class SourceModel:
    """The LM an SAE reads, loaded up to the SAE's hook, with its tokenizer."""

    params: lm.Params
    config: lm.Gemma3Config
    tokenizer: lm.Tokenizer
    hook: str

    @classmethod
    def for_sae(
        cls, sae: InferenceSAE, model: ModelConfig | None = None, full: bool = False
    ) -> SourceModel:
        """Load the model named in ``sae.metadata`` (or ``model``) up to the SAE's hook, or
        every layer when ``full`` (for logits: spliced evaluation, steering).

        Raises:
            ExportError: as :func:`resolve_source_model`.
        """
        resolved, point = resolve_source_model(sae, model)
        spec = resolved.spec
        max_layer = None if full else point.layer
        params, _ = lm.load_gguf(spec.gguf, resolved.config, max_layer=max_layer)
        return cls(params, resolved.config, lm.Tokenizer.from_gguf(spec.gguf), point.name)

    def activations(self, token_ids: list[int]) -> np.ndarray:
        """``[T, d_model]`` activations of the hook for one token sequence."""
        if len(token_ids) > self.config.max_position_embeddings:
            raise ExportError(
                f"the text is {len(token_ids)} tokens, longer than {self.config.name}'s context "
                f"of {self.config.max_position_embeddings}; shorten it"
            )
        out = _forward(self.params, self.config, jnp.asarray([token_ids], jnp.int32), self.hook)
        return np.asarray(out[0], np.float32)


def resolve_source_model(
    sae: InferenceSAE, model: ModelConfig | None = None
) -> tuple[ResolvedModel, lm.HookPoint]:
    """The model named in ``sae.metadata`` (or ``model``) and the SAE's hook on it, checked.

    Reads only the weights' headers: cheap enough to fail fast before any work starts.

    Raises:
        ExportError: the SAE does not say which model or hook it reads, the model is not one we
            can run, the hook is not one of its hook points, or its width differs from the
            SAE's ``d_in``.
    """
    where = sae.source or "the SAE"
    hook = sae.hook_name
    if model is None:
        name = sae.metadata.get("model_name")
        if not name or name == "planted":
            raise ExportError(
                f"{where} does not come from a language model we can run (model_name "
                f"{name!r}); text queries need an SAE trained on LM activations"
            )
        model = ModelConfig(name=_preset_name(name, where))
    if not hook:
        raise ExportError(f"{where} records no hook_name; text queries need to know the hook")
    try:
        resolved = resolve_model(model)
        (point,) = lm.parse_hooks([hook], resolved.config)
    except (ConfigError, ValueError) as e:
        raise ExportError(f"{where}: {e}") from None
    if resolved.config.d_model != sae.d_in:
        raise ExportError(
            f"{where} reads d_in {sae.d_in}, but {resolved.config.name}'s {hook} has width "
            f"{resolved.config.d_model}; this SAE is not for that model"
        )
    return resolved, point


def _preset_name(model_name: str, where: str) -> str:
    """Our preset for a model name as files spell it (``gemma3-270m``, ``google/gemma-3-270m``)."""
    key = model_name.lower().split("/")[-1].replace("gemma-3", "gemma3")
    for preset in lm.PRESETS:
        if key == preset or key.startswith(preset + "-"):
            return preset
    raise ExportError(
        f"{where}: model_name {model_name!r} is not a model we can run ({', '.join(lm.PRESETS)})"
    )


_jitted_forward = jax.jit(lm.forward, static_argnames=("config", "hooks"))


def _forward(params: lm.Params, config: lm.Gemma3Config, tokens: jax.Array, hook: str):
    return _jitted_forward(params, config, tokens, hooks=(hook,))[hook]


def token_features(
    sae: InferenceSAE, model: SourceModel, text: str, top: int = 5, skip_bos: bool = True
) -> list[TokenFeatures]:
    """Each token of ``text`` with its ``top`` most active SAE features.

    Args:
        sae: the SAE (raw-activation space).
        model: its source model, from :meth:`SourceModel.for_sae`.
        text: the text; BOS is prepended as in training.
        top: features listed per token.
        skip_bos: leave the BOS position out (its activations are an outlier the SAE was not
            trained on).
    """
    ids = model.tokenizer.encode(text)
    acts = model.activations(ids)
    values, indices = jax.device_get(sae.features(acts, top))
    out = []
    for pos, token_id in enumerate(ids):
        if skip_bos and pos == 0 and token_id == model.config.bos_id:
            continue
        fired = [
            (int(i), float(v)) for v, i in zip(values[pos], indices[pos], strict=True) if v > 0
        ]
        out.append(TokenFeatures(pos, int(token_id), model.tokenizer.decode([token_id]), fired))
    return out


@dataclass(frozen=True)
class TokenNeighbors:
    """A token, its most active features, and each feature's nearest features."""

    token: TokenFeatures
    neighbors: dict[int, list[tuple[int, float]]]
    """For each of the token's features: ``(neighbour, cosine)`` pairs, nearest first."""


def text_neighbors(
    target: str, text: str, top: int = 3, k: int = 3, model: ModelConfig | None = None
) -> list[TokenNeighbors]:
    """Each token of ``text`` with its ``top`` features and their ``k`` nearest features.

    Args:
        target: an index directory (its source SAE is used) or an SAE URL.
        text: the text to run the SAE's source model on.
        top: features per token.
        k: neighbours per feature.
        model: the LM; default: the one the SAE's metadata names.

    Raises:
        ExportError: the SAE names no model or hook we can run, or the text is too long.
    """
    from dictlearn.export import load_sae
    from dictlearn.index import IndexStore, query_neighbors

    manifest = IndexStore(target).manifest()
    sae = load_sae(manifest.source if manifest is not None else target)
    source = SourceModel.for_sae(sae, model)
    out = []
    for token in token_features(sae, source, text, top=top):
        found = {}
        for feature, _ in token.features:
            result = query_neighbors(target, feature, None, k)
            found[feature] = [
                (int(n), float(c)) for n, c in zip(result.neighbors, result.cosines, strict=True)
            ]
        out.append(TokenNeighbors(token, found))
    return out
