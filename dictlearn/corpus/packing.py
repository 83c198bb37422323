"""Packing documents into fixed-length token contexts, and masks of the positions to keep.

The layout follows SAELens' default (``prepend_bos=True``): documents are tokenized without BOS
and concatenated into one token stream, with a separator token (BOS by default) between
consecutive documents; the stream is cut into pieces of ``context_length - 1`` tokens and each
context is BOS followed by one piece::

    docs:     "ab"  "cde"  "f"            (one token per letter, S = separator, B = BOS)
    stream:   a b S c d e S f
    contexts (context_length=4): [B a b S] [B c d e]      (the tail "S f" is dropped)

So every context starts with BOS, as the LM saw in training, and no token of the stream is lost
or repeated except the final partial context. Documents longer than a context simply continue
into the next one (without their beginning in view). Empty documents are skipped.

The BOS position's residual stream is an outlier (on Gemma its norm is ~12x a normal token's), so
activation writers exclude it with :func:`position_mask`; :func:`token_mask` also drops separator
BOS tokens in the middle of a context.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextTokenizer(Protocol):
    """What packing needs from a tokenizer: ``encode`` and the id of BOS."""

    bos_id: int

    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of ``text``, preceded by BOS when ``add_bos``."""
        ...


def pack_documents(
    docs: Iterable[str],
    tokenizer: TextTokenizer,
    context_length: int,
    *,
    add_bos: bool = True,
    separator: Literal["bos", "none"] | int = "bos",
) -> Iterator[np.ndarray]:
    """Tokenize documents and yield packed contexts, each an int32 array ``[context_length]``.

    Args:
        docs: Documents in order (e.g. :func:`dictlearn.corpus.iter_documents` of a shard).
        tokenizer: Any :class:`TextTokenizer`; called with ``add_bos=False``.
        context_length: Tokens per context, BOS included.
        add_bos: Start every context with ``tokenizer.bos_id``.
        separator: Token between consecutive documents: ``"bos"`` (SAELens' default),
            ``"none"``, or an explicit id (e.g. EOS).

    Yields:
        Contexts in stream order; the final partial context is dropped.
    """
    body = context_length - 1 if add_bos else context_length
    if body < 1:
        raise ValueError(f"context_length={context_length} leaves no room for text after BOS")
    if separator == "bos":
        sep_id: int | None = tokenizer.bos_id
    elif separator == "none":
        sep_id = None
    else:
        sep_id = int(separator)
    prefix = np.array([tokenizer.bos_id] if add_bos else [], dtype=np.int32)

    pending: list[np.ndarray] = []  # Stream tokens not yet emitted; fewer than `body` between docs.
    n_pending = 0
    first = True
    for doc in docs:
        ids = tokenizer.encode(doc, add_bos=False)
        if not ids:
            continue
        if not first and sep_id is not None:
            pending.append(np.array([sep_id], dtype=np.int32))
            n_pending += 1
        first = False
        pending.append(np.asarray(ids, dtype=np.int32))
        n_pending += len(ids)
        if n_pending < body:
            continue
        stream = np.concatenate(pending)
        n_full = len(stream) // body
        for i in range(n_full):
            yield np.concatenate([prefix, stream[i * body : (i + 1) * body]])
        rest = stream[n_full * body :]
        pending, n_pending = [rest], len(rest)


def batch_contexts(
    contexts: Iterable[np.ndarray], batch_size: int, *, drop_remainder: bool = False
) -> Iterator[np.ndarray]:
    """Group contexts into int32 arrays ``[batch_size, context_length]``.

    The last batch is smaller unless ``drop_remainder`` (a fixed shape avoids a recompile).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch: list[np.ndarray] = []
    for context in contexts:
        batch.append(context)
        if len(batch) == batch_size:
            yield np.stack(batch).astype(np.int32, copy=False)
            batch = []
    if batch and not drop_remainder:
        yield np.stack(batch).astype(np.int32, copy=False)


def position_mask(context_length: int, exclude_positions: Sequence[int] = (0,)) -> np.ndarray:
    """Boolean ``[context_length]``: True where a position's activations are written.

    Args:
        context_length: Tokens per context.
        exclude_positions: Positions to drop; the default drops BOS at position 0.

    Raises:
        ValueError: if a position is outside ``[0, context_length)``.
    """
    mask = np.ones(context_length, dtype=bool)
    for pos in exclude_positions:
        if not 0 <= pos < context_length:
            raise ValueError(f"excluded position {pos} is outside [0, {context_length})")
        mask[pos] = False
    return mask


def token_mask(tokens: np.ndarray, exclude_token_ids: Sequence[int]) -> np.ndarray:
    """Boolean mask of ``tokens``' shape: False where the token is one of ``exclude_token_ids``.

    AND it with :func:`position_mask` to also drop separator BOS tokens inside a context.
    """
    return ~np.isin(tokens, np.asarray(exclude_token_ids, dtype=tokens.dtype))
