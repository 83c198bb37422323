"""``dictlearn steer``: generate with one SAE feature steered, clamped or ablated, beside the
unsteered text.

    dictlearn steer runs/default/train-<hash> --feature 123 --scale 8 --prompt "My favourite place is"
    dictlearn steer SAE_URL --feature 123 --clamp 20 --prompt "..."    # Golden-Gate style
    dictlearn steer SAE_URL --feature 123 --ablate --prompt "..."

``main(config) -> SteerResult`` is the entry point. Steering adds ``scale`` times the feature's
decoder direction at the SAE's hook (the feature's activation raised by ``scale``); clamping sets
the feature's activation to a value; ablation removes its contribution. Every position but BOS
is edited, the prompt's and the generated ones'.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field, model_validator

from dictlearn import lm
from dictlearn.activations.config import ModelConfig
from dictlearn.config import StrictModel
from dictlearn.export import load_sae
from dictlearn.export.model import ExportError, InferenceSAE
from dictlearn.inspect.edits import ablate_feature, check_feature, clamp_feature, steer_feature
from dictlearn.inspect.text import SourceModel
from dictlearn.lm.interventions import only_at


class SteerConfig(StrictModel):
    """One steering experiment."""

    sae: str = Field(description="An SAE: export directory, params.npz or training run.")
    feature: int = Field(ge=0, description="The feature (latent index).")
    prompt: str = Field(min_length=1, description="The text to continue.")
    scale: float | None = Field(None, description="Add this much of the feature (steering).")
    clamp: float | None = Field(None, description="Clamp the feature's activation to this.")
    ablate: bool = Field(False, description="Remove the feature's contribution.")
    max_new_tokens: int = Field(32, gt=0, description="Tokens to generate.")
    temperature: float = Field(0.0, ge=0, description="0: greedy; else sampling temperature.")
    seed: int = Field(0, description="Sampling seed (the same for both runs).")
    promoted: int = Field(10, gt=0, description="Promoted tokens to list.")
    model: ModelConfig | None = Field(
        None, description="The LM; null: the one the SAE's metadata names."
    )

    @model_validator(mode="after")
    def _one_mode(self) -> SteerConfig:
        modes = [self.scale is not None, self.clamp is not None, self.ablate]
        if sum(modes) != 1:
            raise ValueError("give exactly one of --scale S, --clamp V or --ablate")
        return self

    @property
    def mode(self) -> str:
        if self.scale is not None:
            return f"steer +{self.scale:g}"
        if self.clamp is not None:
            return f"clamp {self.clamp:g}"
        return "ablate"


@dataclass
class SteerResult:
    """Both continuations, and how the next token's distribution moved."""

    prompt: str
    feature: int
    mode: str
    unsteered: str
    steered: str
    promoted_tokens: list[str]
    """Tokens the feature's decoder direction promotes most through the unembedding."""
    promoted_mass_before: float
    """Next-token probability on the promoted tokens right after the prompt, unsteered."""
    promoted_mass_after: float
    """The same, steered."""


def promoted_tokens(
    sae: InferenceSAE, model: SourceModel, feature: int, n: int = 10
) -> tuple[np.ndarray, list[str]]:
    """The ``n`` tokens whose unembedding the feature's decoder row points to most.

    The direct path only (decoder row times the tied embedding, the final norm left out), as
    Neuronpedia's "positive logits" are.
    """
    direction = sae.params().W_dec[check_feature(sae, feature)]
    scores = lm.unembed(model.params, direction)
    ids = np.asarray(jax.lax.top_k(scores, n)[1])
    return ids, [model.tokenizer.decode([int(i)]) for i in ids]


def _edit(sae: InferenceSAE, config: SteerConfig):
    if config.scale is not None:
        return steer_feature(sae, config.feature, config.scale)
    if config.clamp is not None:
        return clamp_feature(sae, config.feature, config.clamp)
    return ablate_feature(sae, config.feature)


def next_token_probs(
    model: SourceModel, prompt_ids: list[int], edits: dict | None = None
) -> np.ndarray:
    """Next-token distribution after ``prompt_ids`` (edits skip the BOS position)."""
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    if edits:
        keep = jnp.asarray([[i > 0 for i in range(len(prompt_ids))]])
        edits = {name: only_at(keep, edit) for name, edit in edits.items()}
    logits = _next_logits(model.params, model.config, tokens, len(prompt_ids) - 1, edits or {})
    return np.asarray(jax.nn.softmax(logits[0]))


_next_logits = jax.jit(
    lambda params, config, tokens, index, edits: lm.next_token_logits(
        params, config, tokens, index, edits=edits
    ),
    static_argnames=("config",),
)


def steer(sae: InferenceSAE, model: SourceModel, config: SteerConfig) -> SteerResult:
    """Run the experiment ``config`` describes with a loaded SAE and model."""
    check_feature(sae, config.feature)
    ids = model.tokenizer.encode(config.prompt)
    limit = model.config.max_position_embeddings
    if len(ids) + config.max_new_tokens > limit:
        raise ExportError(
            f"the prompt is {len(ids)} tokens; with max_new_tokens {config.max_new_tokens} that "
            f"is longer than {model.config.name}'s context of {limit}: shorten it"
        )
    edits = {model.hook: _edit(sae, config)}
    common = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
    }
    unsteered = lm.generate(model.params, model.config, model.tokenizer, config.prompt, **common)
    steered = lm.generate(
        model.params, model.config, model.tokenizer, config.prompt, edits=edits, **common
    )
    promoted_ids, promoted = promoted_tokens(sae, model, config.feature, config.promoted)
    before = next_token_probs(model, ids)[promoted_ids].sum()
    after = next_token_probs(model, ids, edits)[promoted_ids].sum()
    return SteerResult(
        prompt=config.prompt,
        feature=config.feature,
        mode=config.mode,
        unsteered=str(unsteered),
        steered=str(steered),
        promoted_tokens=promoted,
        promoted_mass_before=float(before),
        promoted_mass_after=float(after),
    )


def main(config: SteerConfig) -> SteerResult:
    """Load the SAE and its full source model, then :func:`steer`."""
    sae = load_sae(config.sae)
    check_feature(sae, config.feature)
    model = SourceModel.for_sae(sae, config.model, full=True)
    return steer(sae, model, config)
