"""Our JAX Gemma 3 270M against transformers' float32 reference, via committed golden values.

The goldens come from ``tools/make_gemma_goldens.py`` (transformers + torch, run outside CI);
this test needs neither. Every block's residual stream, a few blocks' attention and MLP outputs,
and the final logits must match to 1e-4 relative error, on a 600-token sequence (past the
512-token sliding window) and on a batch of two 32-token ones.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn import lm

from . import gemma_270m

GOLDEN = Path(__file__).parent / "golden" / "gemma3_270m_acts.npz"
RTOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return dict(data)


def _row_rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Relative L2 error of every d_model row."""
    return np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


@pytest.fixture(scope="module", params=["long", "short"])
def ours(request, golden) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
    """Our hooked activations and logits for one golden case."""
    case = request.param
    params, config = gemma_270m()
    tokens = jnp.asarray(golden[f"{case}_tokens"])
    hooks = tuple(f"resid_post.{i}" for i in range(config.n_layers))
    hooks += tuple(f"{s}.{i}" for s in ("attn_out", "mlp_out") for i in golden["hook_layers"])
    fwd = jax.jit(lm.forward, static_argnames=("config", "hooks"))
    acts = {k: np.asarray(v) for k, v in fwd(params, config, tokens, hooks=hooks).items()}
    logits = np.asarray(jax.jit(lm.logits, static_argnames="config")(params, config, tokens))
    return case, acts, logits


def test_every_layer_residual_matches_reference(ours, golden):
    case, acts, _ = ours
    pos = golden[f"{case}_positions"]
    n_layers = golden[f"{case}_resid_post"].shape[0]
    assert n_layers == 18
    proj = golden["proj_dirs"]
    for layer in range(n_layers):
        resid = acts[f"resid_post.{layer}"]
        # Full rows at chosen positions (incl. 511/512/513 around the window edge and 599).
        err = _row_rel_err(resid[:, pos], golden[f"{case}_resid_post"][layer])
        assert err.max() <= RTOL, f"resid_post.{layer}: max rel err {err.max():.2e} at {case}"
        # Every position: norm and 4 random projections, relative to the row's norm.
        ref_norm = golden[f"{case}_resid_norms"][layer]
        norm_err = np.abs(np.linalg.norm(resid, axis=-1) - ref_norm) / ref_norm
        assert norm_err.max() <= RTOL, f"resid_post.{layer} norms: {norm_err.max():.2e}"
        proj_err = np.abs(resid @ proj - golden[f"{case}_resid_proj"][layer])
        proj_err /= ref_norm[..., None] * np.linalg.norm(proj, axis=0)
        assert proj_err.max() <= RTOL, f"resid_post.{layer} projections: {proj_err.max():.2e}"


def test_attn_and_mlp_outputs_match_reference(ours, golden):
    case, acts, _ = ours
    pos = golden[f"{case}_positions"]
    for site in ("attn_out", "mlp_out"):
        for j, layer in enumerate(golden["hook_layers"]):
            err = _row_rel_err(acts[f"{site}.{layer}"][:, pos], golden[f"{case}_{site}"][j])
            assert err.max() <= RTOL, f"{site}.{layer}: max rel err {err.max():.2e} at {case}"


def test_logits_match_reference(ours, golden):
    case, _, logits = ours
    pos = golden[f"{case}_positions"]
    ref = golden[f"{case}_logits"]
    sliced = logits[:, pos][..., golden[f"{case}_logit_ids"]]
    err = _row_rel_err(sliced, ref)
    assert err.max() <= RTOL, f"logits slice: max rel err {err.max():.2e}"
    # Every position, whole vocabulary: logsumexp and (where not a near tie) the argmax.
    lse = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    ref_lse = golden[f"{case}_logsumexp"]
    assert (np.abs(lse - ref_lse) / np.abs(ref_lse)).max() <= RTOL
    clear = golden[f"{case}_top2_gap"] > 1e-2
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(logits.argmax(-1)[clear], golden[f"{case}_argmax"][clear])


def test_sliding_window_matters_past_512_tokens(golden):
    """Guard against a golden that cannot tell a sliding window from global attention."""
    params, config = gemma_270m()
    tokens = jnp.asarray(golden["long_tokens"])
    glob = config.model_copy(update={"sliding_window": 100_000})
    hooks = ("resid_post.0",)
    windowed = np.asarray(lm.forward(params, config, tokens, hooks=hooks)["resid_post.0"])
    unwindowed = np.asarray(lm.forward(params, glob, tokens, hooks=hooks)["resid_post.0"])
    np.testing.assert_array_equal(windowed[:, :512], unwindowed[:, :512])
    err = _row_rel_err(unwindowed[:, 512:], windowed[:, 512:])
    assert err.min() > 1e-4, "tokens past the window must differ without it"
