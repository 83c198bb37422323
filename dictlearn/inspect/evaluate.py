"""``dictlearn eval``: the SAE spliced into its language model, Gemma Scope's headline numbers.

    dictlearn eval runs/default/train-<hash>/ --tokens 8192

``main(config) -> EvalResult`` is the entry point. On held-out text the LM runs four ways per
batch: clean; with the SAE's reconstruction spliced in at its hook; with the hook's activation
zero-ablated; with it mean-ablated (the batch mean). Reported:

- ``ce_clean``, ``ce_spliced``, ``ce_zero_ablated``, ``ce_mean_ablated``: next-token
  cross-entropy (nats per token);
- ``loss_recovered``: ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (Gemma Scope's
  fraction of loss recovered), and ``loss_recovered_mean`` against mean ablation;
- ``kl_spliced``: KL(clean || spliced) of the next-token distributions, per token;
- ``fvu``, ``l0``, ``dead_fraction`` (never fired on these tokens), ``dense_fraction`` (fired on
  more than ``dense_threshold`` of them).

BOS positions (the first of every context and the separators between documents) are neither
spliced nor counted: their activations are an outlier SAEs are not trained on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from dictlearn import lm
from dictlearn.activations.config import ModelConfig
from dictlearn.config import StrictModel
from dictlearn.corpus import CorpusConfig, iter_documents, plan_corpus_shards
from dictlearn.corpus.builtin import PYTHON_DOCS, PYTHON_STDLIB
from dictlearn.corpus.packing import batch_contexts, pack_documents
from dictlearn.export import load_sae
from dictlearn.export.model import ExportError, InferenceSAE, SAEParams
from dictlearn.inspect.edits import _splice
from dictlearn.inspect.text import SourceModel
from dictlearn.lm.interventions import _replace

EVAL_CORPUS_SEED = 1
"""The default corpus is the pipeline's (Python docs + stdlib) read in ANOTHER document order
(seed 1 instead of generate's 0), so its first tokens are mostly documents generation did not
reach. For a guarantee, point ``corpus`` at text of your own."""


def default_eval_corpus() -> CorpusConfig:
    """The built-in corpora in the evaluation's document order."""
    return CorpusConfig(paths=[PYTHON_DOCS, PYTHON_STDLIB], seed=EVAL_CORPUS_SEED)


class EvalSettings(StrictModel):
    """How a spliced evaluation runs, whatever SAE it is given (pipelines and sweeps set these
    once for every SAE they train)."""

    corpus: CorpusConfig = Field(
        default_factory=default_eval_corpus,
        description="Held-out text (default: the built-in corpora in another document order).",
    )
    tokens: int = Field(8192, gt=0, description="LM tokens to evaluate on (whole contexts).")
    context_length: int = Field(128, ge=2, description="Tokens per context, BOS included.")
    batch_size: int = Field(4, gt=0, description="Contexts per forward pass.")
    model: ModelConfig | None = Field(
        None, description="The LM; null: the one the SAE's metadata names (model_name)."
    )
    dense_threshold: float = Field(
        0.1, gt=0, le=1, description="A latent firing on more than this fraction is dense."
    )


class EvalConfig(EvalSettings):
    """What ``dictlearn eval`` measures, on which text."""

    sae: str = Field(description="An SAE: export directory, params.npz or training run.")


@dataclass
class EvalResult:
    """The spliced-evaluation numbers (see the module docstring) and what they came from."""

    sae: str
    hook: str
    tokens: int
    """Next-token predictions counted (BOS targets and positions left out)."""
    metrics: dict[str, float]
    seconds: float
    lm_tokens: int
    """LM tokens run (contexts x context length)."""
    details: dict[str, object] = field(default_factory=dict)


def main(config: EvalConfig) -> EvalResult:
    """Load the SAE and its source model, then evaluate on ``config.tokens`` tokens."""
    sae = load_sae(config.sae)
    model = SourceModel.for_sae(sae, config.model, full=True)
    return evaluate(sae, model, config)


def _contexts(config: EvalConfig, tokenizer: lm.Tokenizer) -> Iterator[np.ndarray]:
    n_contexts = max(1, config.tokens // config.context_length)
    corpus = config.corpus.model_copy(update={"n_shards": 1})
    (shard,) = plan_corpus_shards(corpus)
    packed = pack_documents(iter_documents(shard), tokenizer, config.context_length)
    for i, context in enumerate(packed):
        if i == n_contexts:
            return
        yield context


def evaluate(sae: InferenceSAE, model: SourceModel, config: EvalConfig) -> EvalResult:
    """Spliced evaluation of ``sae`` in ``model`` (see the module docstring).

    Raises:
        ExportError: the corpus yields no full context.
    """
    start = time.perf_counter()
    n_contexts = max(1, config.tokens // config.context_length)
    totals: dict[str, np.ndarray] = {}
    batches = batch_contexts(
        _contexts(config, model.tokenizer), config.batch_size, drop_remainder=False
    )
    bar = tqdm(total=n_contexts * config.context_length, unit="tok", desc="eval", leave=False)
    real_contexts = 0
    params = sae.params()
    for batch in batches:
        real_contexts += len(batch)
        bar.update(batch.size)
        if len(batch) < config.batch_size:  # pad to the compiled shape; padding is not counted
            pad = np.full((config.batch_size - len(batch), batch.shape[1]), model.config.bos_id)
            batch = np.concatenate([batch, pad.astype(np.int32)])
        sums = jax.device_get(_eval_batch(model.params, model.config, model.hook, params, batch))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0) + np.asarray(value, np.float64)
    bar.close()
    if not totals or totals["n_targets"] == 0:
        raise ExportError(
            f"the corpus {config.corpus.paths} gave no full context of {config.context_length} "
            "tokens to evaluate on; use a larger corpus or a shorter context_length"
        )
    metrics = _finish(totals, config.dense_threshold)
    return EvalResult(
        sae=sae.source,
        hook=model.hook,
        tokens=int(totals["n_targets"]),
        metrics=metrics,
        seconds=time.perf_counter() - start,
        lm_tokens=real_contexts * config.context_length,
    )


def _finish(t: dict[str, np.ndarray], dense_threshold: float) -> dict[str, float]:
    n = t["n_targets"]
    ce = {name: float(t[f"ce_{name}"] / n) for name in ("clean", "spliced", "zero", "mean")}
    m = t["n_positions"]
    mean = t["sum_x"] / m
    total_var = float(np.sum(t["sum_x2"] - m * mean * mean))
    density = t["fire_counts"] / m
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "ce_mean_ablated": ce["mean"],
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "loss_recovered_mean": (ce["mean"] - ce["spliced"]) / (ce["mean"] - ce["clean"]),
        "kl_spliced": float(t["kl_spliced"] / n),
        "fvu": float(t["sq_err"] / total_var),
        "l0": float(t["l0"] / m),
        "dead_fraction": float(np.mean(density == 0)),
        "dense_fraction": float(np.mean(density > dense_threshold)),
    }


def _ce_and_kl(
    params: lm.Params, hidden: dict[str, jax.Array], targets: jax.Array, counted: jax.Array
) -> dict[str, jax.Array]:
    """Summed cross-entropy of each variant and KL(clean || spliced), one row at a time.

    Projecting onto the 262k-token vocabulary row by row keeps one ``[T, vocab]`` block live
    per variant instead of ``[B, T, vocab]``.
    """

    def row(args):
        h_row, t_row, c_row = args
        clean = jax.nn.log_softmax(lm.unembed(params, h_row["clean"]), axis=-1)
        out = {}
        for name, h in h_row.items():
            logp = clean if name == "clean" else jax.nn.log_softmax(lm.unembed(params, h), axis=-1)
            nll = -jnp.take_along_axis(logp, t_row[:, None], axis=-1)[:, 0]
            out[f"ce_{name}"] = jnp.sum(jnp.where(c_row, nll, 0.0))
            if name == "spliced":
                kl = jnp.sum(jnp.exp(clean) * (clean - logp), axis=-1)
                out["kl_spliced"] = jnp.sum(jnp.where(c_row, kl, 0.0))
        return out

    per_row = jax.lax.map(row, (hidden, targets, counted))
    return {k: jnp.sum(v) for k, v in per_row.items()}


@partial(jax.jit, static_argnames=("config", "hook"))
def _eval_batch(
    params: lm.Params, config: lm.Gemma3Config, hook: str, sae: SAEParams, tokens: jax.Array
) -> dict[str, jax.Array]:
    keep = tokens != config.bos_id  # positions spliced and measured
    hidden_clean, acts = lm.final_hidden_and_hooks(params, config, tokens, hooks=(hook,))
    x = acts[hook].astype(jnp.float32)
    kept = keep[..., None]
    n_positions = jnp.sum(keep)
    batch_mean = jnp.sum(jnp.where(kept, x, 0.0), axis=(0, 1)) / jnp.maximum(n_positions, 1)
    edits = {
        "spliced": jax.tree_util.Partial(_splice, sae, keep),
        "zero": jax.tree_util.Partial(_replace, jnp.zeros_like(batch_mean), keep),
        "mean": jax.tree_util.Partial(_replace, batch_mean, keep),
    }
    hidden = {"clean": hidden_clean}
    for name, edit in edits.items():
        hidden[name] = lm.final_hidden(params, config, tokens, edits={hook: edit})
    # Position t predicts token t + 1; BOS targets (document separators) are not counted.
    targets = tokens[:, 1:]
    counted = targets != config.bos_id
    sums = _ce_and_kl(params, {k: h[:, :-1] for k, h in hidden.items()}, targets, counted)
    latents = sae.encode(x)
    recon = sae.reconstruct(x)
    fired = (latents > 0) & kept
    return sums | {
        "n_targets": jnp.sum(counted),
        "n_positions": n_positions,
        "sum_x": jnp.sum(jnp.where(kept, x, 0.0), axis=(0, 1)),
        "sum_x2": jnp.sum(jnp.where(kept, x * x, 0.0), axis=(0, 1)),
        "sq_err": jnp.sum(jnp.where(kept, (recon - x) ** 2, 0.0)),
        "l0": jnp.sum(fired),
        "fire_counts": jnp.sum(fired, axis=(0, 1), dtype=jnp.int32),
    }
