"""Spliced evaluation and steering: exact on constructed SAEs (tiny model), then end to end on the
real Gemma 3 270M from its PyPI package, through the CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn import lm
from dictlearn.export import InferenceSAE
from dictlearn.export.formats import write_export
from dictlearn.inspect import SourceModel, splice
from dictlearn.inspect.evaluate import EvalConfig, _eval_batch, _finish, evaluate
from dictlearn.inspect.steer import SteerConfig, steer
from launch.cli import main as cli_main

from ..lm.test_gemma3 import TINY


def _sae(w_enc, w_dec, b_enc=None, b_dec=None, rule="relu", **metadata) -> InferenceSAE:
    d_in, d_sae = w_enc.shape
    return InferenceSAE(
        architecture=rule,
        W_enc=np.asarray(w_enc, np.float32),
        b_enc=np.zeros(d_sae, np.float32) if b_enc is None else np.asarray(b_enc, np.float32),
        W_dec=np.asarray(w_dec, np.float32),
        b_dec=np.zeros(d_in, np.float32) if b_dec is None else np.asarray(b_dec, np.float32),
        metadata=metadata,
    )


def _lossless(d: int, **metadata) -> InferenceSAE:
    """relu(x) - relu(-x) = x: reconstructs every activation exactly."""
    eye = np.eye(d)
    return _sae(np.concatenate([eye, -eye], 1), np.concatenate([eye, -eye], 0), **metadata)


@pytest.fixture(scope="module")
def tiny() -> tuple[lm.Params, jax.Array]:
    params = lm.init_params(jax.random.key(0), TINY)
    tokens = jax.random.randint(jax.random.key(3), (3, 10), 3, TINY.vocab_size, dtype=jnp.int32)
    tokens = tokens.at[:, 0].set(TINY.bos_id).at[1, 5].set(TINY.bos_id)  # a separator too
    return params, tokens


def _metrics(params, tokens, sae: InferenceSAE, hook: str = "resid_post.3") -> dict[str, float]:
    sums = jax.device_get(_eval_batch(params, TINY, hook, sae.params(), tokens))
    return _finish({k: np.asarray(v, np.float64) for k, v in sums.items()}, 0.1)


def test_a_lossless_sae_recovers_all_the_loss(tiny):
    params, tokens = tiny
    m = _metrics(params, tokens, _lossless(TINY.d_model))
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert m["ce_zero_ablated"] > m["ce_clean"]


def test_a_zero_sae_is_zero_ablation(tiny):
    params, tokens = tiny
    d = TINY.d_model
    m = _metrics(params, tokens, _sae(np.zeros((d, 4)), np.zeros((4, d))))
    assert m["ce_spliced"] == pytest.approx(m["ce_zero_ablated"], abs=1e-5)
    assert m["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert m["l0"] == 0 and m["dead_fraction"] == 1.0


def test_spliced_numbers_match_a_direct_computation(tiny):
    """Chunked CE/KL and the BOS masking against plain full-logit arithmetic."""
    params, tokens = tiny
    rng = np.random.default_rng(0)
    d, f = TINY.d_model, 48
    sae = _sae(rng.normal(size=(d, f)) / 4, rng.normal(size=(f, d)) / 4, rng.normal(size=f) / 4)
    m = _metrics(params, tokens, sae)
    keep = tokens != TINY.bos_id
    clean = jax.nn.log_softmax(lm.logits(params, TINY, tokens), -1)[:, :-1]
    spliced = jax.nn.log_softmax(
        lm.logits(params, TINY, tokens, edits={"resid_post.3": splice(sae, keep)}), -1
    )[:, :-1]
    targets = np.asarray(tokens[:, 1:])
    counted = targets != TINY.bos_id

    def ce(logp):
        nll = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
        return nll[counted].mean()

    kl = np.sum(np.exp(clean) * (clean - spliced), -1)[counted].mean()
    assert m["ce_clean"] == pytest.approx(ce(clean), rel=1e-5)
    assert m["ce_spliced"] == pytest.approx(ce(spliced), rel=1e-5)
    assert m["kl_spliced"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    acts = np.asarray(lm.forward(params, TINY, tokens, hooks=("resid_post.3",))["resid_post.3"])
    x = acts[np.asarray(keep)]
    recon = np.asarray(sae.reconstruct(x))
    fvu = np.sum((recon - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert m["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    assert m["l0"] == pytest.approx(float((np.asarray(sae.encode(x)) > 0).sum(1).mean()), rel=1e-6)


# --- the real Gemma 3 270M ------------------------------------------------------------------

HOOK = "resid_post.12"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> tuple[InferenceSAE, SourceModel, str]:
    """An SAE whose feature 0 writes the embedding of ' Paris' (and a lossless pair basis)."""
    d = 640
    rng = np.random.default_rng(1)
    w_dec = rng.normal(size=(16, d)).astype(np.float32)
    tokenizer = lm.Tokenizer.from_gguf()
    (paris,) = tokenizer.encode(" Paris", add_bos=False)
    params, _ = lm.load_gguf(max_layer=0)
    w_dec[0] = np.asarray(params["embed"][paris])
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    sae = _sae(w_dec.T, w_dec, model_name="gemma3-270m", hook_name=HOOK)
    out = tmp_path_factory.mktemp("sae")
    write_export(sae, str(out), "native")
    return sae, SourceModel.for_sae(sae, full=True), str(out)


def test_steering_moves_the_next_token_towards_the_promoted_tokens(gemma):
    sae, model, _ = gemma
    # Residual norms at layer 12 are ~16k (BOS ~100k): a scale of 1,000 is a nudge of ~6 %.
    config = SteerConfig(
        sae="-", feature=0, prompt="The weather today is", scale=1000.0, max_new_tokens=6
    )
    result = steer(sae, model, config)
    assert " Paris" in result.promoted_tokens[:3]
    assert result.promoted_mass_before < 0.01
    assert result.promoted_mass_after > 0.1
    assert "Paris" in result.steered and "Paris" not in result.unsteered
    ablated = steer(sae, model, config.model_copy(update={"scale": None, "ablate": True}))
    assert ablated.mode == "ablate"


def test_eval_and_steer_through_the_cli(gemma, capsys):
    _, _, url = gemma
    assert cli_main(["eval", url, "context_length=64", "--tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "loss recovered" in out and "fvu" in out
    assert (
        cli_main(
            [
                "steer",
                url,
                "--feature",
                "0",
                "--scale",
                "40",
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert "steered (steer +40)" in capsys.readouterr().out


def test_eval_result_on_the_real_model(gemma):
    sae, model, _ = gemma
    result = evaluate(sae, model, EvalConfig(sae="-", tokens=256, context_length=64))
    m = result.metrics
    assert result.tokens > 200 and result.lm_tokens == 256
    assert 0 < m["ce_clean"] < m["ce_zero_ablated"]
    assert m["dead_fraction"] + m["dense_fraction"] <= 1


def test_bad_input_is_one_line(gemma, tmp_path, capsys):
    _, _, url = gemma

    def fails(*argv: str) -> str:
        assert cli_main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "feature 99 is out of range" in fails(
        "steer", url, "--feature", "99", "--scale", "1", "--prompt", "x"
    )
    narrow = _lossless(32, model_name="gemma3-270m", hook_name=HOOK)
    write_export(narrow, str(tmp_path / "narrow"), "native")
    assert "reads d_in 32, but gemma3-270m's resid_post.12 has width 640" in fails(
        "eval", str(tmp_path / "narrow"), "--tokens", "64"
    )
    wrong_hook = _lossless(320, model_name="gemma3-270m", hook_name="resid_post.30")
    write_export(wrong_hook, str(tmp_path / "hook"), "native")
    assert "layer 30" in fails("eval", str(tmp_path / "hook"))
    long_prompt = "word " * 40000
    assert "longer than gemma3-270m's context" in fails(
        "steer", url, "--feature", "0", "--scale", "1", "--prompt", long_prompt
    )
