"""Tests of dictlearn.lm. Loading the 270M GGUF takes seconds, so test modules share one copy."""

import functools

from dictlearn import lm


@functools.cache
def gemma_270m() -> tuple[lm.Params, lm.Gemma3Config]:
    """The default Gemma 3 270M, fp32, loaded once per test session."""
    return lm.load_gguf()


@functools.cache
def tokenizer() -> lm.Tokenizer:
    """The default model's tokenizer, built (or read from cache) once per test session."""
    return lm.Tokenizer.from_gguf()
