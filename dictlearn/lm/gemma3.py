"""The Gemma 3 text decoder as pure JAX functions over a plain params pytree.

The model is a function, not an object: ``forward(params, config, tokens, hooks=...)`` returns the
activations named by ``hooks`` and computes no layer past the last one they need, which is what
activation generation for sparse autoencoders wants (an SAE on layer 6 of an 18-layer model pays
for 7 layers, not 18). ``logits`` runs the whole model.

Params layout (every leaf a ``jax.Array``; logical axes from ``param_logical_axes``)::

    {
      "embed": [vocab, d_model],                 # tied input/output embedding
      "final_norm": [d_model],
      "layers": [                                # one dict per block
        {
          "attn_norm": [d_model], "q": [d_model, heads, head_dim],
          "k": [d_model, kv_heads, head_dim], "v": [d_model, kv_heads, head_dim],
          "q_norm": [head_dim], "k_norm": [head_dim], "o": [heads, head_dim, d_model],
          "post_attn_norm": [d_model], "pre_ffw_norm": [d_model],
          "gate": [d_model, ffn], "up": [d_model, ffn], "down": [ffn, d_model],
          "post_ffw_norm": [d_model],
        },
        ...
      ],
    }

Interventions: every entry point takes ``edits={"resid_post.6": edit, ...}``, functions that
replace the activation at a hook point for everything downstream (``dictlearn.lm.interventions``
builds the common ones: add a direction, clamp, zero/mean ablate, replace). Edits are
``jax.tree_util.Partial`` objects, so their arrays are traced arguments and one compiled program
serves any values.

RMSNorm scales are stored *with* Gemma's ``+1`` folded in (the GGUF convention): a norm computes
``x / rms(x) * scale``. Hugging Face checkpoints store ``scale - 1``; ``weights.load_safetensors``
adds the one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from pydantic import BaseModel, ConfigDict, Field

import sharding
from dictlearn.errors import UserError
from sharding.axes import D_MODEL, FFN, HEAD_DIM, HEADS, KV_HEADS, VOCAB, Rules

Params = dict[str, Any]
"""The params pytree described in the module docstring."""


class Gemma3Config(BaseModel):
    """Architecture of a Gemma 3 text decoder (defaults: Gemma 3 270M).

    Field names follow the field (``d_model``, ``n_heads``) rather than Hugging Face's
    (``hidden_size``, ``num_attention_heads``); ``from_hf_config`` translates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("gemma3-270m", description="Preset name, used in messages and manifests.")
    vocab_size: int = Field(262144, gt=0, description="Rows of the (tied) embedding matrix.")
    d_model: int = Field(640, gt=0, description="Residual stream width (HF: hidden_size).")
    n_layers: int = Field(18, gt=0, description="Number of decoder blocks.")
    n_heads: int = Field(4, gt=0, description="Query heads per attention layer.")
    n_kv_heads: int = Field(1, gt=0, description="Key/value heads (grouped-query attention).")
    head_dim: int = Field(256, gt=0, description="Width of one attention head.")
    ffn_dim: int = Field(2048, gt=0, description="Hidden width of the GeGLU MLP.")
    sliding_window: int = Field(
        512, gt=0, description="Tokens a local layer's query sees, itself included."
    )
    sliding_window_pattern: int = Field(
        6,
        gt=0,
        description="Every this-many-th layer (1-based) is global; the others are local (5:1).",
    )
    rope_local_base: float = Field(10_000.0, gt=0, description="RoPE base of local layers.")
    rope_global_base: float = Field(1_000_000.0, gt=0, description="RoPE base of global layers.")
    rope_global_scaling: float = Field(
        1.0,
        gt=0,
        description="Linear RoPE position scaling on global layers (8 for 4B and larger).",
    )
    query_pre_attn_scalar: float = Field(
        256.0, gt=0, description="Attention logits are scaled by query_pre_attn_scalar**-0.5."
    )
    rms_norm_eps: float = Field(1e-6, gt=0, description="Epsilon inside every RMSNorm.")
    max_position_embeddings: int = Field(
        32768, gt=0, description="Longest context the checkpoint was trained for."
    )
    bos_id: int = Field(2, ge=0, description="Beginning-of-sequence token id.")
    eos_id: int = Field(1, ge=0, description="End-of-sequence token id.")
    pad_id: int = Field(0, ge=0, description="Padding token id.")

    def is_global(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) attends globally rather than in a sliding window."""
        return (layer + 1) % self.sliding_window_pattern == 0

    def check_layer(self, layer: int) -> None:
        """Raise ``ValueError`` unless ``layer`` is a valid 0-based block index."""
        if not 0 <= layer < self.n_layers:
            raise UserError(
                f"layer {layer} is out of range: {self.name} has {self.n_layers} layers "
                f"(valid indices 0..{self.n_layers - 1})"
            )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], name: str = "hf") -> Gemma3Config:
        """Build a config from a Hugging Face ``config.json`` (``gemma3_text`` or ``gemma3``).

        Raises:
            ValueError: the config describes a model this implementation does not support.
        """
        if "text_config" in hf:  # the multimodal Gemma3ForConditionalGeneration wrapper
            hf = hf["text_config"]
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise UserError(f"config.json sets {key}={hf[key]}, which Gemma 3 does not use")
        local_base = hf.get("rope_local_base_freq", 10_000.0)
        global_base = hf.get("rope_theta", 1_000_000.0)
        scaling = hf.get("rope_scaling") or {}
        # transformers >= 5 writes per-layer-type RoPE parameters instead of the two keys above.
        rope_params = hf.get("rope_parameters") or {}
        if "full_attention" in rope_params:
            global_base = rope_params["full_attention"].get("rope_theta", global_base)
            scaling = rope_params["full_attention"]
        if "sliding_attention" in rope_params:
            local_base = rope_params["sliding_attention"].get("rope_theta", local_base)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise UserError(f"unsupported rope scaling type {rope_type!r} in config.json")
        pattern = hf.get("sliding_window_pattern", 6)
        config = cls(
            name=name,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf["num_key_value_heads"],
            head_dim=hf.get("head_dim", 256),
            ffn_dim=hf["intermediate_size"],
            sliding_window=hf.get("sliding_window", 4096),
            sliding_window_pattern=pattern,
            rope_local_base=local_base,
            rope_global_base=global_base,
            rope_global_scaling=scaling.get("factor", 1.0) if rope_type == "linear" else 1.0,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_id=hf.get("bos_token_id", 2),
            eos_id=_first(hf.get("eos_token_id", 1)),
            pad_id=hf.get("pad_token_id", 0),
        )
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            expected = [
                "full_attention" if config.is_global(i) else "sliding_attention"
                for i in range(config.n_layers)
            ]
            if list(layer_types) != expected:
                raise UserError(
                    "config.json layer_types does not follow a local:global pattern of "
                    f"{pattern - 1}:1, which this implementation assumes"
                )
        return config


def _first(value: int | Sequence[int]) -> int:
    return value if isinstance(value, int) else int(value[0])


# Text-decoder dimensions from the public Gemma 3 configs. The 4B/12B/27B checkpoints are
# multimodal: their embedding has 262208 rows (262144 text tokens + image tokens), and their
# global layers use 8x linear RoPE scaling for the 128k context.
PRESETS: dict[str, Gemma3Config] = {
    "gemma3-270m": Gemma3Config(),
    "gemma3-1b": Gemma3Config(
        name="gemma3-1b", d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, ffn_dim=6912
    ),
    "gemma3-4b": Gemma3Config(
        name="gemma3-4b",
        vocab_size=262208,
        d_model=2560,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=10240,
        sliding_window=1024,
        rope_global_scaling=8.0,
        max_position_embeddings=131072,
    ),
    "gemma3-12b": Gemma3Config(
        name="gemma3-12b",
        vocab_size=262208,
        d_model=3840,
        n_layers=48,
        n_heads=16,
        n_kv_heads=8,
        ffn_dim=15360,
        sliding_window=1024,
        rope_global_scaling=8.0,
        max_position_embeddings=131072,
    ),
    "gemma3-27b": Gemma3Config(
        name="gemma3-27b",
        vocab_size=262208,
        d_model=5376,
        n_layers=62,
        n_heads=32,
        n_kv_heads=16,
        head_dim=128,
        ffn_dim=21504,
        sliding_window=1024,
        rope_global_scaling=8.0,
        query_pre_attn_scalar=168.0,  # d_model / n_heads, not head_dim, for the 27B
        max_position_embeddings=131072,
    ),
}


def get_config(name: str = "gemma3-270m") -> Gemma3Config:
    """The preset called ``name`` (``gemma3-270m``, ``gemma3-1b``, ..., or just ``270m``).

    Raises:
        ValueError: no such preset.
    """
    key = name if name.startswith("gemma3-") else f"gemma3-{name}"
    if key not in PRESETS:
        raise UserError(f"unknown Gemma 3 preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]


# ---------------------------------------------------------------------------------------------
# Hook points


HookSite = Literal["resid_post", "attn_out", "mlp_out"]
Edit = Callable[[jax.Array], jax.Array]
"""An intervention: ``[B, T, d_model]`` activation in, its replacement out."""
_HOOK_RE = re.compile(r"^(resid_post|attn_out|mlp_out)\.(\d+)$")


@dataclass(frozen=True, order=True)
class HookPoint:
    """A place in the model whose activations ``forward`` returns, ``[B, T, d_model]``.

    Sites (``L`` is the 0-based block index):

    * ``resid_post.L``: the residual stream after block ``L`` (transformers'
      ``hidden_states[L + 1]``, except that the last block's is *not* final-normed here).
    * ``attn_out.L``: the attention branch's contribution to the residual stream: the output
      projection followed by Gemma's post-attention RMSNorm, i.e. exactly what is added to the
      residual stream in block ``L``.
    * ``mlp_out.L``: likewise for the MLP: down projection then post-feedforward RMSNorm.
    """

    site: HookSite
    layer: int

    @property
    def name(self) -> str:
        """The string form, e.g. ``"resid_post.6"``; used as the key in ``forward``'s output."""
        return f"{self.site}.{self.layer}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, spec: HookPoint | str) -> HookPoint:
        """``HookPoint("resid_post", 6)`` from ``"resid_post.6"`` (a HookPoint passes through).

        Raises:
            ValueError: the string is not ``SITE.LAYER`` with a known site.
        """
        if isinstance(spec, HookPoint):
            return spec
        match = _HOOK_RE.match(spec)
        if match is None:
            raise UserError(
                f"bad hook point {spec!r}: expected 'SITE.LAYER' with SITE one of "
                "resid_post, attn_out, mlp_out (e.g. 'resid_post.6')"
            )
        return cls(match.group(1), int(match.group(2)))  # type: ignore[arg-type]


def parse_hooks(hooks: Sequence[HookPoint | str], config: Gemma3Config) -> tuple[HookPoint, ...]:
    """Parse, validate against ``config`` and de-duplicate hook points (order kept).

    Raises:
        ValueError: an unknown site, or a layer the model does not have.
    """
    parsed: list[HookPoint] = []
    for spec in hooks:
        hook = HookPoint.parse(spec)
        config.check_layer(hook.layer)
        if hook not in parsed:
            parsed.append(hook)
    return tuple(parsed)


# ---------------------------------------------------------------------------------------------
# Sharding


def param_logical_axes(config: Gemma3Config) -> Params:
    """A pytree shaped like the params whose leaves are tuples of logical axis names."""
    layer = {
        "attn_norm": (D_MODEL,),
        "q": (D_MODEL, HEADS, HEAD_DIM),
        "k": (D_MODEL, KV_HEADS, HEAD_DIM),
        "v": (D_MODEL, KV_HEADS, HEAD_DIM),
        "q_norm": (HEAD_DIM,),
        "k_norm": (HEAD_DIM,),
        "o": (HEADS, HEAD_DIM, D_MODEL),
        "post_attn_norm": (D_MODEL,),
        "pre_ffw_norm": (D_MODEL,),
        "gate": (D_MODEL, FFN),
        "up": (D_MODEL, FFN),
        "down": (FFN, D_MODEL),
        "post_ffw_norm": (D_MODEL,),
    }
    return {
        "embed": (VOCAB, D_MODEL),
        "final_norm": (D_MODEL,),
        "layers": [dict(layer) for _ in range(config.n_layers)],
    }


def param_shardings(params: Params, config: Gemma3Config, mesh: Mesh, rules: Rules | None = None):
    """``NamedSharding``s for ``params`` (which may hold fewer layers than the config)."""
    axes = param_logical_axes(config)
    axes["layers"] = axes["layers"][: len(params["layers"])]
    return jax.tree.map(
        lambda _, names: sharding.named_sharding(mesh, names, rules),
        params,
        axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def shard_params(
    params: Params, config: Gemma3Config, mesh: Mesh, rules: Rules | None = None
) -> Params:
    """Place ``params`` on ``mesh``: heads and FFN split over ``model`` by the default rules."""
    return jax.device_put(params, param_shardings(params, config, mesh, rules))


@partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(key: jax.Array, config: Gemma3Config, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random params in the real layout: for tests and tiny end-to-end runs, not for training.

    Matrices are normal with std ``1/sqrt(fan_in)``; norm scales are near 1.
    """
    axes = param_logical_axes(config)
    sizes = {
        VOCAB: config.vocab_size,
        D_MODEL: config.d_model,
        HEADS: config.n_heads,
        KV_HEADS: config.n_kv_heads,
        HEAD_DIM: config.head_dim,
        FFN: config.ffn_dim,
    }
    leaves, treedef = jax.tree.flatten(axes, is_leaf=lambda x: isinstance(x, tuple))
    shapes = [tuple(sizes[n] for n in names) for names in leaves]
    # One draw sliced into leaves: a separate jax.random call per leaf makes XLA compile a
    # threefry kernel per shape (~20 s for a 7-layer toy model on CPU).
    noise = jax.random.normal(key, (sum(math.prod(s) for s in shapes),), dtype)
    fan_in = {  # how many leading dimensions a matrix contracts over
        (D_MODEL, HEADS, HEAD_DIM): 1,
        (D_MODEL, KV_HEADS, HEAD_DIM): 1,
        (HEADS, HEAD_DIM, D_MODEL): 2,
        (D_MODEL, FFN): 1,
        (FFN, D_MODEL): 1,
        (VOCAB, D_MODEL): None,  # embedding rows: unit scale, the model multiplies by sqrt(d)
    }
    out, start = [], 0
    for names, shape in zip(leaves, shapes, strict=True):
        size = math.prod(shape)
        draw = noise[start : start + size].reshape(shape)
        start += size
        if len(names) == 1:
            out.append(1.0 + 0.1 * draw)
            continue
        n_in = fan_in[names]
        scale = 1.0 / math.sqrt(math.prod(shape[:n_in])) if n_in else 1.0 / math.sqrt(shape[1])
        out.append(scale * draw)
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# The model


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    # Normalise in fp32 whatever the activation dtype, as the reference does.
    x32 = x.astype(jnp.float32)
    out = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (out * scale.astype(jnp.float32)).astype(x.dtype)


def _rope(x: jax.Array, positions: jax.Array, base: float, scaling: float) -> jax.Array:
    """Rotary embedding, "rotate half" layout. x: [B, T, N, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)) / scaling
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def _attention(
    lp: Params,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    config: Gemma3Config,
    is_global: bool,
) -> jax.Array:
    """Grouped-query attention with QK-norm; returns the o-projection output [B, T, d_model]."""
    b, t, _ = x.shape
    n_kv = config.n_kv_heads
    group = config.n_heads // n_kv
    q = jnp.einsum("btd,dhk->bthk", x, lp["q"])
    k = jnp.einsum("btd,dhk->bthk", x, lp["k"])
    v = jnp.einsum("btd,dhk->bthk", x, lp["v"])
    q = _rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = _rms_norm(k, lp["k_norm"], config.rms_norm_eps)
    if is_global:
        base, scaling = config.rope_global_base, config.rope_global_scaling
    else:
        base, scaling = config.rope_local_base, 1.0
    q = _rope(q, positions, base, scaling)
    k = _rope(k, positions, base, scaling)
    # Query head h uses KV head h // group (transformers' repeat_kv order).
    q = q.reshape(b, t, n_kv, group, config.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    scores = scores * config.query_pre_attn_scalar**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, config.n_heads, config.head_dim)
    return jnp.einsum("bthk,hkd->btd", out, lp["o"])


def _mlp(lp: Params, x: jax.Array) -> jax.Array:
    gate = jax.nn.gelu(x @ lp["gate"], approximate=True)
    return (gate * (x @ lp["up"])) @ lp["down"]


def _masks(t: int, attention_mask: jax.Array | None, window: int) -> tuple[jax.Array, jax.Array]:
    """Boolean [B or 1, T, T] masks (query, key): global-causal and sliding-window-causal."""
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    causal = k_idx <= q_idx
    # The window counts token slots, as transformers does: a query sees itself and the
    # window - 1 slots before it.
    local = causal & (k_idx > q_idx - window)
    causal, local = causal[None], local[None]
    if attention_mask is not None:
        keys = attention_mask.astype(bool)[:, None, :]
        causal, local = causal & keys, local & keys
    return causal, local


def _embed(params: Params, config: Gemma3Config, tokens: jax.Array) -> jax.Array:
    embed = params["embed"]
    x = jnp.take(embed, tokens, axis=0)
    return x * jnp.asarray(math.sqrt(config.d_model), dtype=embed.dtype)


def _default_positions(tokens: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Left padding: the first real token is position 0.
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def _run_blocks(
    params: Params,
    config: Gemma3Config,
    tokens: jax.Array,
    n_blocks: int,
    hooks: tuple[HookPoint, ...],
    positions: jax.Array | None,
    attention_mask: jax.Array | None,
    edits: Mapping[str, Edit] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if len(params["layers"]) < n_blocks:
        raise ValueError(
            f"params hold {len(params['layers'])} layers but {n_blocks} are needed "
            "(were they loaded with a smaller max_layer?)"
        )
    if positions is None:
        positions = _default_positions(tokens, attention_mask)
    causal, local = _masks(tokens.shape[1], attention_mask, config.sliding_window)
    wanted = {h.name for h in hooks}
    edits = dict(edits or {})
    out: dict[str, jax.Array] = {}

    def site(name: str, value: jax.Array) -> jax.Array:
        # A read hook sees the activation as the model made it; an edit then replaces it for
        # everything downstream.
        if name in wanted:
            out[name] = value
        return edits[name](value).astype(value.dtype) if name in edits else value

    x = _embed(params, config, tokens)
    eps = config.rms_norm_eps
    for i in range(n_blocks):
        lp = params["layers"][i]
        is_global = config.is_global(i)
        h = _rms_norm(x, lp["attn_norm"], eps)
        h = _attention(lp, h, positions, causal if is_global else local, config, is_global)
        h = site(f"attn_out.{i}", _rms_norm(h, lp["post_attn_norm"], eps))
        x = x + h
        h = _mlp(lp, _rms_norm(x, lp["pre_ffw_norm"], eps))
        h = site(f"mlp_out.{i}", _rms_norm(h, lp["post_ffw_norm"], eps))
        x = site(f"resid_post.{i}", x + h)
    return x, out


def forward(
    params: Params,
    config: Gemma3Config,
    tokens: jax.Array,
    *,
    hooks: Sequence[HookPoint | str],
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    edits: Mapping[str, Edit] | None = None,
) -> dict[str, jax.Array]:
    """Run the model up to the last hooked block and return the hooked activations.

    Jit with ``config`` and ``hooks`` static, e.g.
    ``jax.jit(forward, static_argnames=("config", "hooks"))`` with ``hooks`` a tuple.

    Args:
        params: the params pytree (see the module docstring); may hold only the first layers.
        config: the architecture.
        tokens: ``[B, T]`` int32 token ids (BOS first, as the model was trained).
        hooks: hook points or their names (``"resid_post.6"``, ``"attn_out.3"``, ``"mlp_out.0"``).
        positions: ``[B, T]`` RoPE positions; default ``0..T-1``, or counted from the first
            unmasked token when ``attention_mask`` is given (left padding).
        attention_mask: ``[B, T]``, nonzero for real tokens; masked tokens are never attended
            to (their own outputs are meaningless).
        edits: interventions by hook name (see the module docstring); a hooked activation is
            returned as the model made it, before its own edit, after any earlier one.

    Returns:
        ``{hook.name: [B, T, d_model]}`` in the params' dtype (under ``jax.jit`` the dict
        comes back with sorted keys; look values up by name).

    Raises:
        ValueError: no hooks, a bad hook name, or a layer index out of range.
    """
    parsed = parse_hooks(hooks, config)
    if not parsed:
        raise ValueError("forward needs at least one hook point; use logits() for the full model")
    edits = _checked_edits(edits, config)
    n_blocks = max(h.layer for h in parsed) + 1
    _, out = _run_blocks(params, config, tokens, n_blocks, parsed, positions, attention_mask, edits)
    return {h.name: out[h.name] for h in parsed}


def logits(
    params: Params,
    config: Gemma3Config,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    edits: Mapping[str, Edit] | None = None,
) -> jax.Array:
    """Next-token logits ``[B, T, vocab]`` in fp32 from the full model (tied embedding)."""
    x = final_hidden(
        params, config, tokens, positions=positions, attention_mask=attention_mask, edits=edits
    )
    return unembed(params, x)


def final_hidden(
    params: Params,
    config: Gemma3Config,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    edits: Mapping[str, Edit] | None = None,
) -> jax.Array:
    """The final-normed hidden state ``[B, T, d_model]`` (what the unembedding reads).

    Losses over the 262k-token vocabulary should project it in token chunks
    (:func:`unembed`) rather than hold ``[B, T, vocab]`` logits at once.
    """
    edits = _checked_edits(edits, config)
    x, _ = _run_blocks(
        params, config, tokens, config.n_layers, (), positions, attention_mask, edits
    )
    return _rms_norm(x, params["final_norm"], config.rms_norm_eps)


def final_hidden_and_hooks(
    params: Params,
    config: Gemma3Config,
    tokens: jax.Array,
    *,
    hooks: Sequence[HookPoint | str],
    attention_mask: jax.Array | None = None,
    edits: Mapping[str, Edit] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`final_hidden` and the activations at ``hooks`` (as in :func:`forward`), in one pass."""
    parsed = parse_hooks(hooks, config)
    edits = _checked_edits(edits, config)
    x, out = _run_blocks(
        params, config, tokens, config.n_layers, parsed, None, attention_mask, edits
    )
    hidden = _rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return hidden, {h.name: out[h.name] for h in parsed}


def unembed(params: Params, hidden: jax.Array) -> jax.Array:
    """Logits (fp32) of final-normed hidden states ``[..., d_model]`` (tied embedding)."""
    return jnp.einsum("...d,vd->...v", hidden, params["embed"]).astype(jnp.float32)


def _checked_edits(edits: Mapping[str, Edit] | None, config: Gemma3Config) -> dict[str, Edit]:
    """Edits keyed by canonical hook names, every hook checked against the model."""
    if not edits:
        return {}
    return {parse_hooks([name], config)[0].name: edit for name, edit in edits.items()}


def next_token_logits(
    params: Params,
    config: Gemma3Config,
    tokens: jax.Array,
    index: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    edits: Mapping[str, Edit] | None = None,
) -> jax.Array:
    """Logits ``[B, vocab]`` (fp32) for the token after position ``index`` ([B] or scalar).

    Projects only one position onto the 262k-row embedding, which is what decoding needs.
    """
    x, _ = _run_blocks(
        params,
        config,
        tokens,
        config.n_layers,
        (),
        None,
        attention_mask,
        _checked_edits(edits, config),
    )
    index = jnp.broadcast_to(jnp.asarray(index), (tokens.shape[0],))
    last = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    last = _rms_norm(last, params["final_norm"], config.rms_norm_eps)
    return (last @ params["embed"].T).astype(jnp.float32)
