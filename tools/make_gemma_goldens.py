"""Regenerate the Gemma 3 270M golden values in tests/lm/golden/ from transformers (torch, CPU).

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 transformers accelerate gguf sentencepiece protobuf
    .venv/bin/python -c "from dictlearn.lm import default_gguf_path; print(default_gguf_path())"
    /tmp/refenv/bin/python tools/make_gemma_goldens.py [--gguf PATH] [--out tests/lm/golden]

It needs neither jax nor dictlearn: the reference is transformers loading the same GGUF as
``Gemma3ForCausalLM`` in float32 with eager attention. Written files:

* ``gemma3_270m_acts.npz``: token ids, and for a 600-token sequence (longer than the 512-token
  sliding window) and a batch of two 32-token ones: the residual stream after every block, plus
  attention and MLP outputs (after Gemma's post-norms) of a few blocks, as full rows at chosen
  positions; every position's row norm and projection onto 4 fixed random directions per block;
  final logits on a slice of the vocabulary at the chosen positions, and every position's
  logsumexp over the whole vocabulary and argmax.
* ``tokenizer_ids.json``: transformers' ids (BOS included) for a sample of real text.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pydoc_data.topics
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM

HOOK_LAYERS = (0, 5, 6, 11, 17)
N_PROJ = 4
LONG_LEN = 600
LONG_POSITIONS = (0, 1, 7, 100, 300, 510, 511, 512, 513, 599)
SHORT_LEN = 32
SHORT_POSITIONS = (0, 3, 17, 31)
N_RANDOM_VOCAB = 192
TOP_VOCAB = 16


def long_text() -> str:
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in ("assignment", "augassign", "class", "for", "if"))


def short_texts() -> list[str]:
    return [
        "The quick brown fox jumps over the lazy dog. " * 6,
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
        "fibonacci(n - 2)\n\nprint([fibonacci(i) for i in range(10)])\n",
    ]


def tokenizer_sample() -> list[str]:
    """Real prose and code from the stdlib, plus cases that stress the tokenizer's edges."""
    import collections
    import json as json_mod
    import pathlib
    import textwrap

    texts = []
    for module in (collections, json_mod, pathlib, textwrap, argparse, inspect):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 80:
                texts.append(doc)
    texts = texts[:120]
    texts.append(inspect.getsource(textwrap)[:6000])
    topics = pydoc_data.topics.topics
    texts += [topics[k][:3000] for k in ("with", "while", "try", "lambda", "numbers")]
    texts += [
        "",
        " leading space",
        "two  spaces,   three,    four,\ttab\nnewline\n\n\nthree newlines  ",
        "Unicode: café, naïve, Zürich, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, العربية",
        "Emoji 🙂🚀 and rare bytes \x00\x07 and U+FFFD \ufffd",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "<bos>literal special tokens<eos> <pad> <unk> <mask>",
        "Numbers 1234567890 3.14159 1e-6 0xDEADBEEF",
    ]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gguf",
        type=Path,
        default=Path.home() / ".cache" / "dictlearn" / "gemma-3-270m-q4_k_m.gguf",
    )
    parser.add_argument("--out", type=Path, default=Path("tests/lm/golden"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    directory, name = str(args.gguf.parent), args.gguf.name

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    samples = tokenizer_sample()
    with_bos = [tok(t, add_special_tokens=True)["input_ids"] for t in samples]
    (args.out / "tokenizer_ids.json").write_text(
        json.dumps([{"text": t, "ids": ids} for t, ids in zip(samples, with_bos, strict=True)])
    )

    model = Gemma3ForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    d_model, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((d_model, N_PROJ)).astype(np.float32)

    def encode(text: str, length: int) -> list[int]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if ids[0] != cfg.bos_token_id:
            ids = [cfg.bos_token_id, *ids]
        assert len(ids) >= length, (len(ids), length)
        return ids[:length]

    out: dict[str, np.ndarray] = {"proj_dirs": proj, "hook_layers": np.array(HOOK_LAYERS)}
    cases = {
        "long": ([encode(long_text(), LONG_LEN)], LONG_POSITIONS),
        "short": ([encode(t, SHORT_LEN) for t in short_texts()], SHORT_POSITIONS),
    }
    for case, (ids, positions) in cases.items():
        tokens = torch.tensor(ids, dtype=torch.long)
        captured: dict[str, torch.Tensor] = {}

        def save(key: str, captured: dict[str, torch.Tensor] = captured):
            def hook(_module, _inputs, output):
                captured[key] = (output[0] if isinstance(output, tuple) else output).detach()

            return hook

        handles = []
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.register_forward_hook(save(f"resid_post.{i}")))
            handles.append(
                layer.post_attention_layernorm.register_forward_hook(save(f"attn_out.{i}"))
            )
            handles.append(
                layer.post_feedforward_layernorm.register_forward_hook(save(f"mlp_out.{i}"))
            )
        with torch.no_grad():
            result = model(input_ids=tokens, output_hidden_states=True)
        for h in handles:
            h.remove()
        # The hooks and transformers' own hidden_states must agree (the last one is final-normed).
        for i in range(n_layers - 1):
            assert torch.equal(captured[f"resid_post.{i}"], result.hidden_states[i + 1])

        pos = np.array(positions)
        resid = np.stack([captured[f"resid_post.{i}"].numpy() for i in range(n_layers)])
        out[f"{case}_tokens"] = np.array(ids, dtype=np.int32)
        out[f"{case}_positions"] = pos
        out[f"{case}_resid_post"] = resid[:, :, pos]
        out[f"{case}_resid_norms"] = np.linalg.norm(resid, axis=-1)
        out[f"{case}_resid_proj"] = resid @ proj
        for site in ("attn_out", "mlp_out"):
            out[f"{case}_{site}"] = np.stack(
                [captured[f"{site}.{i}"].numpy()[:, pos] for i in HOOK_LAYERS]
            )
        logits = result.logits.float()
        top = torch.topk(logits[:, pos], TOP_VOCAB, dim=-1).indices.flatten().unique().numpy()
        random_ids = rng.choice(cfg.vocab_size, N_RANDOM_VOCAB, replace=False)
        vocab_ids = np.unique(np.concatenate([top, random_ids]))
        out[f"{case}_logit_ids"] = vocab_ids
        out[f"{case}_logits"] = logits[:, pos][..., vocab_ids].numpy()
        out[f"{case}_logsumexp"] = torch.logsumexp(logits, dim=-1).numpy()
        top2 = torch.topk(logits, 2, dim=-1)
        out[f"{case}_argmax"] = top2.indices[..., 0].numpy().astype(np.int32)
        out[f"{case}_top2_gap"] = (top2.values[..., 0] - top2.values[..., 1]).numpy()

    np.savez_compressed(args.out / "gemma3_270m_acts.npz", **out)
    for path in sorted(args.out.iterdir()):
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
