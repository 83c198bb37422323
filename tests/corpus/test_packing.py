"""Packing into fixed-length contexts with BOS first, batching, and activation masks."""

from __future__ import annotations

import numpy as np
import pytest

from dictlearn.corpus import (
    TextTokenizer,
    batch_contexts,
    pack_documents,
    position_mask,
    token_mask,
)


class ByteTokenizer:
    """A real tokenizer over UTF-8 bytes: id = byte + 3 (0 PAD, 1 EOS, 2 BOS, like Gemma)."""

    bos_id = 2
    eos_id = 1

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


DOCS = ["The quick brown fox.", "", "jumps over", "the lazy dög — twice, and then some more text"]


def stream_of(docs: list[str], tok: ByteTokenizer, sep: int | None) -> list[int]:
    ids = [tok.encode(d, add_bos=False) for d in docs if d]
    out: list[int] = []
    for i, part in enumerate(ids):
        if i and sep is not None:
            out.append(sep)
        out += part
    return out


def test_byte_tokenizer_satisfies_protocol() -> None:
    assert isinstance(ByteTokenizer(), TextTokenizer)


@pytest.mark.parametrize("context_length", [2, 5, 16, 64])
def test_contexts_start_with_bos_and_preserve_the_stream(context_length: int) -> None:
    tok = ByteTokenizer()
    contexts = list(pack_documents(DOCS, tok, context_length))
    stream = stream_of(DOCS, tok, sep=tok.bos_id)
    body = context_length - 1
    assert len(contexts) == len(stream) // body  # Only the final partial context is dropped.
    for c in contexts:
        assert c.shape == (context_length,) and c.dtype == np.int32
        assert c[0] == tok.bos_id
    packed = [int(t) for c in contexts for t in c[1:]]
    assert packed == stream[: len(packed)]


def test_separator_choices_and_no_bos() -> None:
    tok = ByteTokenizer()
    docs = ["ab", "cde", "f"]
    contexts = list(pack_documents(docs, tok, 4, add_bos=False, separator=tok.eos_id))
    e = tok.eos_id
    assert [list(c) for c in contexts] == [
        [*tok.encode("ab", False), e, ord("c") + 3],
        [*tok.encode("de", False), e, ord("f") + 3],
    ]
    contexts = list(pack_documents(docs, tok, 3, separator="none"))
    assert [tok.decode(list(c)) for c in contexts] == ["ab", "cd", "ef"]
    assert all(c[0] == tok.bos_id for c in contexts)
    # The module docstring's example, verbatim.
    contexts = list(pack_documents(docs, tok, 4))
    assert [list(c) for c in contexts] == [
        [2, ord("a") + 3, ord("b") + 3, 2],
        [2, ord("c") + 3, ord("d") + 3, ord("e") + 3],
    ]


def test_too_short_context_is_rejected() -> None:
    with pytest.raises(ValueError, match="no room"):
        next(pack_documents(["text"], ByteTokenizer(), 1))


def test_batches() -> None:
    contexts = list(pack_documents(DOCS * 3, ByteTokenizer(), 8))
    batches = list(batch_contexts(contexts, 4))
    assert [b.shape for b in batches[:-1]] == [(4, 8)] * (len(batches) - 1)
    assert np.array_equal(np.concatenate(batches), np.stack(contexts))
    dropped = list(batch_contexts(contexts, 4, drop_remainder=True))
    assert all(b.shape == (4, 8) for b in dropped) and len(dropped) == len(contexts) // 4


def test_position_and_token_masks() -> None:
    assert position_mask(4).tolist() == [False, True, True, True]
    assert position_mask(5, [0, 4]).tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="outside"):
        position_mask(4, [4])
    tok = ByteTokenizer()
    (context,) = pack_documents(["ab", "cde"], tok, 7)
    keep = position_mask(7) & token_mask(context, [tok.bos_id])
    assert tok.decode(list(context[keep])) == "abcde"  # Neither BOS nor the separator survive.
