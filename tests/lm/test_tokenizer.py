"""The tokenizer built from GGUF metadata against transformers' GGUF tokenizer.

``test_ids_match_transformers_golden`` runs in CI against ids transformers produced (see
tools/make_gemma_goldens.py); ``test_ids_match_transformers_live`` needs transformers installed.
"""

import inspect
import json
from pathlib import Path

import pytest

from dictlearn import lm

from . import tokenizer

GOLDEN = Path(__file__).parent / "golden" / "tokenizer_ids.json"


def test_special_ids_and_bos():
    tok = tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.vocab_size == 262144
    assert tok.encode("Hello world") == [2, *tok.encode("Hello world", add_bos=False)]
    assert tok.encode("", add_bos=True) == [2]
    assert tok.encode_batch(["a b", "Hello world"]) == [
        tok.encode("a b"),
        tok.encode("Hello world"),
    ]


def test_ids_match_transformers_golden():
    tok = tokenizer()
    samples = json.loads(GOLDEN.read_text())
    assert len(samples) > 100 and sum(len(s["ids"]) for s in samples) > 15_000
    for sample in samples:
        assert tok.encode(sample["text"]) == sample["ids"], sample["text"][:200]


def test_decode_round_trips_plain_text():
    tok = tokenizer()
    for sample in json.loads(GOLDEN.read_text()):
        text = sample["text"]
        if "<" in text and ">" in text:  # literal special-token strings are dropped on decode
            continue
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>")
    assert ids[1] == tok.backend.token_to_id("<start_of_turn>")  # matched whole
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>user\nHi<end_of_turn>"


def test_cache_is_reused(tmp_path):
    path = lm.default_gguf_path()
    built = lm.Tokenizer.from_gguf(path, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("tokenizer-*.json")
    again = lm.Tokenizer.from_gguf(path, cache_dir=tmp_path)
    text = "Caching must not change anything."
    assert again.encode(text) == built.encode(text) == tokenizer().encode(text)
    assert cached.stat().st_size > 1_000_000


def test_ids_match_transformers_live():
    """Needs transformers (+ torch); not run in CI. Fresh text: stdlib docstrings."""
    transformers = pytest.importorskip("transformers")
    path = lm.default_gguf_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = tokenizer()
    import email.message
    import functools
    import logging

    texts = [
        inspect.getdoc(obj)
        for module in (email.message, functools, logging)
        for _, obj in inspect.getmembers(module)
        if callable(obj) and inspect.getdoc(obj)
    ]
    assert len(texts) > 50
    for text in texts:
        assert tok.encode(text) == ref(text)["input_ids"], text[:200]
