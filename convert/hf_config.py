"""Hugging Face `config.json` (and tokenizer / generation configs) -> jaxvlm `ModelConfig`.

This is the only place Hugging Face names meet jaxvlm's: each family is a set of behavioural flags.
Both the transformers 5 layout (`rope_parameters`) and the older one (`rope_theta`, `rope_scaling`) are read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxvlm.config import DecoderConfig, ModelConfig, RopeConfig, TokensConfig, longrope_attention_factor

SUPPORTED = ("gemma", "gemma2", "phi3", "qwen3")

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "silu": "silu", "swish": "silu", "gelu": "gelu"}


class ConfigError(ValueError):
    pass


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no config.json in the checkpoint folder")
    cfg = read_json(path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"{path}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    return cfg


def _get(cfg: dict, key: str, default: Any = None, *, required: bool = False):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ConfigError(f"config.json: missing {key!r}")
    return default


def _rope(cfg: dict, head_dim: int) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", _get(cfg, "rope_theta", 10_000.0)))
    fraction = float(params.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0)))
    if kind == "default":
        return RopeConfig(theta=theta, rotary_fraction=fraction)
    if kind not in ("longrope", "su"):  # "su" is LongRoPE's old name
        raise ConfigError(f"config.json: unsupported rope type {kind!r} (supported: default, longrope)")
    # Phi-3 keeps the pre-training length outside the rope dict, and it takes precedence there.
    original = int(_get(cfg, "original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or cfg["max_position_embeddings"])
    scale = params.get("factor") or cfg["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor") or longrope_attention_factor(scale, original)
    return RopeConfig(theta=theta, rotary_fraction=fraction, short_factor=tuple(map(float, params["short_factor"])),
                      long_factor=tuple(map(float, params["long_factor"])), original_max_position=original,
                      attention_factor=float(attention_factor))


def _layer_types(cfg: dict, depth: int, sliding: int | None) -> tuple[str, ...]:
    """Per-layer "local" (sliding window) or "global", with each family's default when the file has none."""
    if sliding is None:
        return ()
    names = {"sliding_attention": "local", "full_attention": "global"}
    if cfg.get("layer_types"):
        return tuple(names[t] for t in cfg["layer_types"])
    t = cfg["model_type"]
    if t == "gemma2":  # alternating, the first layer local
        return tuple("local" if i % 2 == 0 else "global" for i in range(depth))
    if t == "qwen3":  # the window applies from max_window_layers on
        start = _get(cfg, "max_window_layers", 28)
        return tuple("local" if i >= start else "global" for i in range(depth))
    return ("local",) * depth  # Phi-3: every layer


def decoder_config(cfg: dict) -> DecoderConfig:
    t = cfg["model_type"]
    width, heads = _get(cfg, "hidden_size", required=True), _get(cfg, "num_attention_heads", required=True)
    head_dim = _get(cfg, "head_dim") or width // heads
    depth = _get(cfg, "num_hidden_layers", required=True)
    act = _get(cfg, "hidden_activation") or _get(cfg, "hidden_act", "silu")
    if t == "gemma" and act == "gelu":  # Gemma's legacy "gelu" means the tanh approximation (as transformers)
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ConfigError(f"config.json: unsupported activation {act!r}")
    gemma = t in ("gemma", "gemma2")
    sliding = _get(cfg, "sliding_window") if t != "gemma" else None
    if t == "qwen3" and not _get(cfg, "use_sliding_window", False):
        sliding = None
    layer_types = _layer_types(cfg, depth, sliding)
    return DecoderConfig(
        vocab_size=_get(cfg, "vocab_size", required=True),
        width=width,
        depth=depth,
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=_get(cfg, "intermediate_size", required=True),
        mlp_activation=_ACTIVATIONS[act],
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        norm_scale_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        qkv_bias=bool(_get(cfg, "attention_bias", False)),
        out_bias=bool(_get(cfg, "attention_bias", False)),
        use_qk_norm=t == "qwen3",
        use_post_norms=t == "gemma2",
        query_pre_attn_scalar=_get(cfg, "query_pre_attn_scalar") if t == "gemma2" else None,
        attn_logit_softcap=_get(cfg, "attn_logit_softcapping") if t == "gemma2" else None,
        final_logit_softcap=_get(cfg, "final_logit_softcapping") if t == "gemma2" else None,
        sliding_window=sliding,
        layer_types=layer_types,
        rope=_rope(cfg, head_dim),
        max_position_embeddings=_get(cfg, "max_position_embeddings", 8192),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", gemma)),
    )


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def tokens_config(hf_dir: str, cfg: dict) -> TokensConfig:
    gen_path = os.path.join(hf_dir, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    tok_path = os.path.join(hf_dir, "tokenizer_config.json")
    tok = read_json(tok_path) if os.path.isfile(tok_path) else {}
    eos = tuple(dict.fromkeys(_ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if eos else 0
    # Gemma and Llama-style tokenizers (Phi-3) start prompts with BOS; Qwen's do not.
    add_bos = bool(tok.get("add_bos_token", cfg["model_type"] in ("gemma", "gemma2", "phi3"))) and bos is not None
    return TokensConfig(bos_id=bos, eos_ids=eos, pad_id=int(pad), add_bos=add_bos)


def model_config(hf_dir: str) -> tuple[ModelConfig, dict]:
    """(jaxvlm config, the raw HF config) for the checkpoint folder `hf_dir`."""
    cfg = load_hf_config(hf_dir)
    try:
        return ModelConfig(decoder=decoder_config(cfg), tokens=tokens_config(hf_dir, cfg)), cfg
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{os.path.join(hf_dir, 'config.json')}: missing or malformed field {e}") from None
