"""Hugging Face `config.json` (and tokenizer / generation configs) -> jaxvlm `ModelConfig`.

This is the only place Hugging Face names meet jaxvlm's: each family is a set of behavioural flags.
Both the transformers 5 layout (`rope_parameters`) and the older one (`rope_theta`, `rope_scaling`) are read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxvlm.config import (DecoderConfig, HeadConfig, ImageProcessing, ModelConfig, RopeConfig, TokensConfig, VisionConfig,
                           longrope_attention_factor)

TEXT_FAMILIES = ("gemma", "gemma2", "phi3", "qwen3")
VLM_FAMILIES = ("paligemma", "llava")
VISION_FAMILIES = ("siglip_vision_model", "clip_vision_model")
SUPPORTED = TEXT_FAMILIES + VLM_FAMILIES + VISION_FAMILIES

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "gelu": "gelu", "quick_gelu": "quick_gelu"}

# transformers' class defaults, for the fields configs may leave out (the text and vision parts of real
# PaliGemma configs list only what differs from them).
FAMILY_DEFAULTS = {
    "gemma": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10_000.0),
    "gemma2": dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10_000.0,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=4096),
    "phi3": dict(hidden_act="silu", rms_norm_eps=1e-5),
    "qwen3": dict(hidden_act="silu", rms_norm_eps=1e-6),
    "siglip_vision_model": dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                                num_hidden_layers=12, num_attention_heads=12, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6),
    "clip_vision_model": dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
}


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


def with_defaults(cfg: dict, model_type: str) -> dict:
    return {**FAMILY_DEFAULTS.get(model_type, {}), "model_type": model_type,
            **{k: v for k, v in cfg.items() if v is not None}}


def decoder_config(cfg: dict) -> DecoderConfig:
    t = cfg["model_type"]
    cfg = with_defaults(cfg, t)
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


def vision_config(cfg: dict, **composition) -> VisionConfig:
    """A SigLIP or CLIP vision config; `composition` adds what the enclosing model decides (feature layer, ...)."""
    t = cfg.get("model_type") or "siglip_vision_model"
    if t not in VISION_FAMILIES:
        raise ConfigError(f"config.json: unsupported vision model_type {t!r} (supported: {', '.join(VISION_FAMILIES)})")
    cfg = with_defaults(cfg, t)
    act = cfg["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ConfigError(f"config.json: unsupported vision activation {act!r}")
    clip = t == "clip_vision_model"
    return VisionConfig(
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
        activation=_ACTIVATIONS[act], norm_eps=float(cfg["layer_norm_eps"]), patch_bias=not clip, class_token=clip,
        pre_norm=clip, post_norm_class_only=clip, **composition)


def image_processing(hf_dir: str, vision: VisionConfig, clip_style: bool) -> ImageProcessing:
    """From `preprocessor_config.json` (or the `image_processor` entry of `processor_config.json`, where
    transformers 5 writes it), else the processor's defaults at the encoder's image size."""
    path = os.path.join(hf_dir, "preprocessor_config.json")
    p = {}
    if os.path.isfile(path):
        p = read_json(path)
    elif os.path.isfile(processor_path := os.path.join(hf_dir, "processor_config.json")):
        path, p = processor_path, read_json(processor_path).get("image_processor") or {}
    size = vision.image_size
    if clip_style:  # CLIPImageProcessor: shortest edge, centre crop, OpenAI statistics
        defaults = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
                        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    else:  # SiglipImageProcessor: a square, no crop, mean = std = 0.5
        defaults = dict(size={"height": size, "width": size}, do_center_crop=False, image_mean=[0.5] * 3,
                        image_std=[0.5] * 3)
    p = {**defaults, **{k: v for k, v in p.items() if v is not None}}

    def hw(value, what):
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, dict) and "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        raise ConfigError(f"{path}: unsupported {what} {value!r}")

    resize = p.get("do_resize", True)
    size_field = p["size"]
    shortest = size_field.get("shortest_edge") if isinstance(size_field, dict) else None
    if isinstance(size_field, int) and clip_style:  # older CLIP configs: an int is the shortest edge
        shortest = size_field
    return ImageProcessing(
        size=hw(size_field, "size") if resize and shortest is None else None,
        shortest_edge=int(shortest) if resize and shortest is not None else None,
        resample=int(p.get("resample", 3)),
        crop_size=hw(p["crop_size"], "crop_size") if p.get("do_center_crop") else None,
        rescale_factor=float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else None,
        mean=tuple(map(float, p["image_mean"])) if p.get("do_normalize", True) else None,
        std=tuple(map(float, p["image_std"])) if p.get("do_normalize", True) else None,
    )


def _text_part(cfg: dict, default_type: str) -> dict:
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", default_type)
    if text["model_type"] not in TEXT_FAMILIES:
        raise ConfigError(f"config.json: unsupported text model_type {text['model_type']!r} "
                          f"(supported: {', '.join(TEXT_FAMILIES)})")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # special ids may sit at either level
        if text.get(key) is None and cfg.get(key) is not None:
            text[key] = cfg[key]
    return text


def _vlm_config(hf_dir: str, cfg: dict) -> tuple[ModelConfig, str]:
    t = cfg["model_type"]
    if t == "paligemma":
        text = _text_part(cfg, "gemma")
        vision = vision_config(cfg.get("vision_config") or {})
        extra = dict(projector="linear", prefix_lm=True, position_offset=1, prompt_format="paligemma",
                     image_token_id=int(_get(cfg, "image_token_index", _get(cfg, "image_token_id", 256000))))
    else:  # llava
        text = _text_part(cfg, "llama")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"config.json: vision_feature_layer {layer!r}: only a single layer is supported")
        if strategy not in ("default", "full"):
            raise ConfigError(f"config.json: unsupported vision_feature_select_strategy {strategy!r}")
        act = cfg.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"config.json: unsupported projector_hidden_act {act!r} (supported: gelu)")
        vision = vision_config(cfg.get("vision_config") or {"model_type": "clip_vision_model"}, feature_layer=layer,
                               keep_class_token=strategy == "full")
        seq = cfg.get("image_seq_length")
        if seq is not None and seq != vision.num_features:
            raise ConfigError(f"config.json: image_seq_length {seq} but the vision tower gives "
                              f"{vision.num_features} features per image")
        extra = dict(projector="mlp", projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
                     prompt_format="llava", image_token_id=int(_get(cfg, "image_token_index", 32000)))
    decoder = decoder_config(text)
    processing = image_processing(hf_dir, vision, clip_style=vision.class_token)
    config = ModelConfig(decoder=decoder, tokens=tokens_config(hf_dir, text), vision=vision,
                         image_processing=processing, **extra)
    return config, text["model_type"]


HEAD_ARCHITECTURES = {"ForSequenceClassification": "sequence_classification",
                      "ForTokenClassification": "token_classification"}


def head_config(cfg: dict) -> HeadConfig | None:
    """The classification head `architectures` names (transformers' `score` Linear), or None for a causal LM."""
    kinds = [kind for arch in cfg.get("architectures") or [] for suffix, kind in HEAD_ARCHITECTURES.items()
             if arch.endswith(suffix)]
    if not kinds:
        return None
    id2label = cfg.get("id2label") or {}
    num_labels = len(id2label) or int(cfg.get("num_labels", 2))
    labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels))
    # The sequence head has no bias; the token head's follows `token_classification_bias` (default True).
    bias = kinds[0] == "token_classification" and cfg.get("token_classification_bias", True)
    return HeadConfig(kind=kinds[0], labels=labels, bias=bool(bias))


def model_config(hf_dir: str) -> tuple[ModelConfig, str | None, str]:
    """(jaxvlm config, the decoder's family, the tensor-name layout) for the checkpoint folder `hf_dir`."""
    cfg = load_hf_config(hf_dir)
    t = cfg["model_type"]
    try:
        if t in TEXT_FAMILIES:
            return ModelConfig(decoder=decoder_config(cfg), tokens=tokens_config(hf_dir, cfg),
                               head=head_config(cfg)), t, "text"
        if t in VLM_FAMILIES:
            return (*_vlm_config(hf_dir, cfg), "vlm")
        projection = cfg.get("projection_dim") if "CLIPVisionModelWithProjection" in cfg.get("architectures", []) \
            else None
        vision = vision_config(cfg, attention_pool=t == "siglip_vision_model" and cfg.get("vision_use_head", True),
                               projection_dim=projection)
        processing = image_processing(hf_dir, vision, clip_style=vision.class_token)
        return ModelConfig(vision=vision, image_processing=processing), None, "vision"
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{os.path.join(hf_dir, 'config.json')}: missing or malformed field {e}") from None
