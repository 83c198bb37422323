"""Text queries run the real Gemma 3 270M (from its PyPI package) to the SAE's hook."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dictlearn import lm
from dictlearn.export import ExportError, InferenceSAE
from dictlearn.inspect import SourceModel, token_features

HOOK = "resid_post.1"


def _sae(d_in: int = 640, **metadata) -> InferenceSAE:
    rng = np.random.default_rng(0)
    d_sae = 256
    w_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return InferenceSAE(
        architecture="topk",
        W_enc=w_dec.T.copy(),
        b_enc=np.zeros(d_sae, np.float32),
        W_dec=w_dec,
        b_dec=np.zeros(d_in, np.float32),
        k=8,
        metadata={"model_name": "gemma3-270m", "hook_name": HOOK} | metadata,
    )


@pytest.fixture(scope="module")
def source() -> tuple[InferenceSAE, SourceModel]:
    sae = _sae()
    return sae, SourceModel.for_sae(sae)


def test_token_features_are_the_sae_of_the_hook_activations(source):
    sae, model = source
    text = "The Golden Gate Bridge is in San Francisco."
    tokens = token_features(sae, model, text, top=3)
    ids = model.tokenizer.encode(text)
    assert ids[0] == model.config.bos_id
    assert [t.token_id for t in tokens] == ids[1:]  # BOS left out
    assert "".join(t.text for t in tokens) == text

    params, config = model.params, model.config
    acts = lm.forward(params, config, np.asarray([ids], np.int32), hooks=(HOOK,))[HOOK][0]
    values, indices = jax.device_get(jax.lax.top_k(sae.encode(acts), 3))
    for t in tokens:
        expected = [
            (int(i), float(v))
            for v, i in zip(values[t.position], indices[t.position], strict=True)
            if v > 0
        ]
        assert [f for f, _ in t.features] == [f for f, _ in expected]
        np.testing.assert_allclose([v for _, v in t.features], [v for _, v in expected], rtol=1e-5)
    assert any(t.features for t in tokens)


def test_text_query_refuses_sae_of_another_model_or_width():
    with pytest.raises(ExportError, match="does not come from a language model"):
        SourceModel.for_sae(_sae(model_name="planted"))
    with pytest.raises(
        ExportError, match=r"reads d_in 32, but gemma3-270m.s resid_post\.1 has width 640"
    ):
        SourceModel.for_sae(_sae(d_in=32))
    with pytest.raises(ExportError, match="not a model we can run"):
        SourceModel.for_sae(_sae(model_name="gpt2-small"))
    with pytest.raises(ExportError, match="layer"):
        SourceModel.for_sae(_sae(hook_name="resid_post.40"))


def test_neighbors_by_text_through_the_cli(source, tmp_path, capsys):
    from dictlearn.export.formats import write_export
    from launch.cli import main as cli_main

    sae, _ = source
    url = str(tmp_path / "sae")
    write_export(sae, url, "native")
    assert cli_main(["neighbors", url, "--text", "Golden Gate", "--top", "2", "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"features of {url}")
    assert len(out) == 1 + len(sae_tokens := [line for line in out[1:] if line.strip()])
    assert all("(" in line for line in sae_tokens)  # every token lists features with neighbours
    assert cli_main(["neighbors", url, "3", "--text", "x"]) == 2
    assert "one of FEATURE" in capsys.readouterr().err
