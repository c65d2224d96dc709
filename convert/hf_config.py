"""Hugging Face `config.json` (and tokenizer / generation configs) -> jaxvlm `ModelConfig`.

This is the only place Hugging Face names meet jaxvlm's: each family is a set of behavioural flags.
Both the transformers 5 layout (`rope_parameters`) and the older one (`rope_theta`, `rope_scaling`) are read.
Every field is read with its type checked (`convert.fields`), and every file from inside the folder.
"""

from __future__ import annotations

import os

from convert.fields import ConfigError, Fields
from jaxvlm import files
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



def read_json(hf_dir: str, name: str) -> Fields | None:
    """The JSON object `name` in `hf_dir` as typed fields, or None when the folder has no such file."""
    path = files.optional_file(hf_dir, name)
    return None if path is None else Fields(files.read_json(path), path)


def load_hf_config(hf_dir: str) -> Fields:
    cfg = read_json(hf_dir, "config.json")
    if cfg is None:
        raise ConfigError(f"{os.path.join(hf_dir, 'config.json')}: no config.json in the checkpoint folder")
    model_type = cfg.raw("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"{cfg.path}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    return cfg


def _fields(cfg: Fields | dict) -> Fields:
    return cfg if isinstance(cfg, Fields) else Fields(cfg, "config.json")


def _rope(cfg: Fields) -> RopeConfig:
    params = cfg.sub("rope_parameters") if cfg.has("rope_parameters") else cfg.sub("rope_scaling")
    kind = params.text("rope_type", params.text("type", "default"))
    theta = params.number("rope_theta", cfg.number("rope_theta", 10_000.0))
    fraction = params.number("partial_rotary_factor", cfg.number("partial_rotary_factor", 1.0))
    if kind == "default":
        return RopeConfig(theta=theta, rotary_fraction=fraction)
    if kind not in ("longrope", "su"):  # "su" is LongRoPE's old name
        raise ConfigError(f"{cfg.path}: unsupported rope type {kind!r} (supported: default, longrope)")
    # Phi-3 keeps the pre-training length outside the rope dict, and it takes precedence there.
    original = cfg.integer("original_max_position_embeddings", None) \
        or params.integer("original_max_position_embeddings", None) or cfg.integer("max_position_embeddings")
    scale = params.number("factor", None) or cfg.integer("max_position_embeddings") / original
    attention_factor = params.number("attention_factor", None) or longrope_attention_factor(scale, original)
    return RopeConfig(theta=theta, rotary_fraction=fraction, short_factor=params.numbers("short_factor"),
                      long_factor=params.numbers("long_factor"), original_max_position=original,
                      attention_factor=float(attention_factor))


LAYER_TYPE_NAMES = {"sliding_attention": "local", "full_attention": "global"}


def _layer_types(cfg: Fields, depth: int, sliding: int | None) -> tuple[str, ...]:
    """Per-layer "local" (sliding window) or "global", with each family's default when the file has none."""
    if sliding is None:
        return ()
    if cfg.has("layer_types"):
        names = cfg.texts("layer_types")
        unknown = [t for t in names if t not in LAYER_TYPE_NAMES]
        if unknown:
            cfg.fail("layer_types", f"a list of {' or '.join(LAYER_TYPE_NAMES)}", unknown[0])
        return tuple(LAYER_TYPE_NAMES[t] for t in names)
    t = cfg.raw("model_type")
    if t == "gemma2":  # alternating, the first layer local
        return tuple("local" if i % 2 == 0 else "global" for i in range(depth))
    if t == "qwen3":  # the window applies from max_window_layers on
        start = cfg.integer("max_window_layers", 28)
        return tuple("local" if i >= start else "global" for i in range(depth))
    return ("local",) * depth  # Phi-3: every layer


def decoder_config(cfg: Fields | dict) -> DecoderConfig:
    cfg = _fields(cfg)
    t = cfg.raw("model_type")
    cfg = cfg.with_defaults(FAMILY_DEFAULTS.get(t, {}))
    width, heads = cfg.integer("hidden_size"), cfg.integer("num_attention_heads")
    if heads <= 0:
        cfg.fail("num_attention_heads", "a positive integer", heads)
    head_dim = cfg.integer("head_dim", None) or width // heads
    depth = cfg.integer("num_hidden_layers")
    act = cfg.text("hidden_activation", None) or cfg.text("hidden_act", "silu")
    if t == "gemma" and act == "gelu":  # Gemma's legacy "gelu" means the tanh approximation (as transformers)
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{cfg.path}: unsupported activation {act!r}")
    gemma = t in ("gemma", "gemma2")
    sliding = cfg.integer("sliding_window", None) if t != "gemma" else None
    if t == "qwen3" and not cfg.flag("use_sliding_window", False):
        sliding = None
    bias = cfg.flag("attention_bias", False)
    gemma2 = t == "gemma2"
    return DecoderConfig(
        vocab_size=cfg.integer("vocab_size"),
        width=width,
        depth=depth,
        num_heads=heads,
        num_kv_heads=cfg.integer("num_key_value_heads", None) or heads,
        head_dim=head_dim,
        mlp_dim=cfg.integer("intermediate_size"),
        mlp_activation=_ACTIVATIONS[act],
        norm_eps=cfg.number("rms_norm_eps", 1e-6),
        norm_scale_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        qkv_bias=bias,
        out_bias=bias,
        use_qk_norm=t == "qwen3",
        use_post_norms=gemma2,
        query_pre_attn_scalar=cfg.number("query_pre_attn_scalar", None) if gemma2 else None,
        attn_logit_softcap=cfg.number("attn_logit_softcapping", None) if gemma2 else None,
        final_logit_softcap=cfg.number("final_logit_softcapping", None) if gemma2 else None,
        sliding_window=sliding,
        layer_types=_layer_types(cfg, depth, sliding),
        rope=_rope(cfg),
        max_position_embeddings=cfg.integer("max_position_embeddings", 8192),
        tie_embeddings=cfg.flag("tie_word_embeddings", gemma),
    )


def tokens_config(hf_dir: str, cfg: Fields | dict) -> TokensConfig:
    cfg = _fields(cfg)
    gen = read_json(hf_dir, "generation_config.json") or Fields({}, "generation_config.json")
    tok = read_json(hf_dir, "tokenizer_config.json") or Fields({}, "tokenizer_config.json")
    eos = tuple(dict.fromkeys(cfg.token_ids("eos_token_id") + gen.token_ids("eos_token_id")))
    bos = gen.token_id("bos_token_id", cfg.token_id("bos_token_id"))
    pad = gen.token_id("pad_token_id", cfg.token_id("pad_token_id"))
    if pad is None:
        pad = eos[0] if eos else 0
    # Gemma and Llama-style tokenizers (Phi-3) start prompts with BOS; Qwen's do not.
    add_bos = tok.flag("add_bos_token", cfg.raw("model_type") in ("gemma", "gemma2", "phi3")) and bos is not None
    return TokensConfig(bos_id=bos, eos_ids=eos, pad_id=pad, add_bos=add_bos)


def vision_config(cfg: Fields | dict, **composition) -> VisionConfig:
    """A SigLIP or CLIP vision config; `composition` adds what the enclosing model decides (feature layer, ...)."""
    cfg = _fields(cfg)
    t = cfg.text("model_type", "siglip_vision_model")
    if t not in VISION_FAMILIES:
        raise ConfigError(f"{cfg.path}: unsupported vision model_type {t!r} (supported: {', '.join(VISION_FAMILIES)})")
    cfg = cfg.with_defaults(FAMILY_DEFAULTS[t])
    act = cfg.text("hidden_act")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{cfg.path}: unsupported vision activation {act!r}")
    clip = t == "clip_vision_model"
    return VisionConfig(
        image_size=cfg.integer("image_size"), patch_size=cfg.integer("patch_size"), width=cfg.integer("hidden_size"),
        depth=cfg.integer("num_hidden_layers"), num_heads=cfg.integer("num_attention_heads"),
        mlp_dim=cfg.integer("intermediate_size"), activation=_ACTIVATIONS[act], norm_eps=cfg.number("layer_norm_eps"),
        patch_bias=not clip, class_token=clip, pre_norm=clip, post_norm_class_only=clip, **composition)


def image_processing(hf_dir: str, vision: VisionConfig, clip_style: bool) -> ImageProcessing:
    """From `preprocessor_config.json` (or the `image_processor` entry of `processor_config.json`, where
    transformers 5 writes it), else the processor's defaults at the encoder's image size."""
    p = read_json(hf_dir, "preprocessor_config.json")
    if p is None:
        processor = read_json(hf_dir, "processor_config.json")
        p = processor.sub("image_processor") if processor is not None else Fields({}, "preprocessor_config.json")
    size = vision.image_size
    if clip_style:  # CLIPImageProcessor: shortest edge, centre crop, OpenAI statistics
        defaults = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
                        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    else:  # SiglipImageProcessor: a square, no crop, mean = std = 0.5
        defaults = dict(size={"height": size, "width": size}, do_center_crop=False, image_mean=[0.5] * 3,
                        image_std=[0.5] * 3)
    p = p.with_defaults(defaults)

    def hw(key: str) -> tuple[int, int]:
        value = p.raw(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return (value, value)
        if isinstance(value, dict):
            sub = p.sub(key)
            return (sub.integer("height"), sub.integer("width"))
        p.fail(key, "an integer or {height, width}", value)

    def channels(key: str) -> tuple[float, float, float]:
        values = p.numbers(key)
        if len(values) != 3:
            p.fail(key, "three numbers (one per channel)", list(values))
        return values

    resize = p.flag("do_resize", True)
    size_field = p.raw("size")
    shortest = p.sub("size").integer("shortest_edge", None) if isinstance(size_field, dict) else None
    if isinstance(size_field, int) and clip_style:  # older CLIP configs: an int is the shortest edge
        shortest = p.integer("size")
    normalize = p.flag("do_normalize", True)
    return ImageProcessing(
        size=hw("size") if resize and shortest is None else None,
        shortest_edge=shortest if resize else None,
        resample=p.integer("resample", 3),
        crop_size=hw("crop_size") if p.flag("do_center_crop") else None,
        rescale_factor=p.number("rescale_factor", 1 / 255) if p.flag("do_rescale", True) else None,
        mean=channels("image_mean") if normalize else None,
        std=channels("image_std") if normalize else None,
    )


def _text_part(cfg: Fields, default_type: str) -> Fields:
    text = cfg.sub("text_config")
    text = Fields(dict(text.data), text.path, text.prefix)
    text.data.setdefault("model_type", default_type)
    if text.raw("model_type") not in TEXT_FAMILIES:
        raise ConfigError(f"{cfg.path}: unsupported text model_type {text.raw('model_type')!r} "
                          f"(supported: {', '.join(TEXT_FAMILIES)})")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # special ids may sit at either level
        if text.raw(key) is None and cfg.raw(key) is not None:
            text.data[key] = cfg.raw(key)
    return text


def _vlm_config(hf_dir: str, cfg: Fields) -> tuple[ModelConfig, str]:
    t = cfg.raw("model_type")
    if t == "paligemma":
        text = _text_part(cfg, "gemma")
        vision = vision_config(cfg.sub("vision_config"))
        image_token = cfg.token_id("image_token_index", cfg.token_id("image_token_id", 256000))
        extra = dict(projector="linear", prefix_lm=True, position_offset=1, prompt_format="paligemma",
                     image_token_id=image_token)
    else:  # llava
        text = _text_part(cfg, "llama")
        strategy = cfg.text("vision_feature_select_strategy", "default")
        layer = cfg.raw("vision_feature_layer", -2)
        if isinstance(layer, list):
            raise ConfigError(f"{cfg.path}: vision_feature_layer {layer!r}: only a single layer is supported")
        layer = cfg.integer("vision_feature_layer", -2)
        if strategy not in ("default", "full"):
            raise ConfigError(f"{cfg.path}: unsupported vision_feature_select_strategy {strategy!r}")
        act = cfg.text("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"{cfg.path}: unsupported projector_hidden_act {act!r} (supported: gelu)")
        vision_fields = cfg.sub("vision_config") if cfg.has("vision_config") else \
            Fields({"model_type": "clip_vision_model"}, cfg.path, "vision_config.")
        vision = vision_config(vision_fields, feature_layer=layer, keep_class_token=strategy == "full")
        seq = cfg.integer("image_seq_length", None)
        if seq is not None and seq != vision.num_features:
            raise ConfigError(f"{cfg.path}: image_seq_length {seq} but the vision tower gives "
                              f"{vision.num_features} features per image")
        extra = dict(projector="mlp", projector_bias=cfg.flag("multimodal_projector_bias", True),
                     prompt_format="llava", image_token_id=cfg.token_id("image_token_index", 32000))
    decoder = decoder_config(text)
    processing = image_processing(hf_dir, vision, clip_style=vision.class_token)
    config = ModelConfig(decoder=decoder, tokens=tokens_config(hf_dir, text), vision=vision,
                         image_processing=processing, **extra)
    return config, text.raw("model_type")


HEAD_ARCHITECTURES = {"ForSequenceClassification": "sequence_classification",
                      "ForTokenClassification": "token_classification"}


def head_config(cfg: Fields) -> HeadConfig | None:
    """The classification head `architectures` names (transformers' `score` Linear), or None for a causal LM."""
    kinds = [kind for arch in cfg.texts("architectures") for suffix, kind in HEAD_ARCHITECTURES.items()
             if arch.endswith(suffix)]
    if not kinds:
        return None
    id2label = cfg.sub("id2label").data
    num_labels = len(id2label) or cfg.integer("num_labels", 2)
    labels = tuple(str(id2label.get(str(i), f"LABEL_{i}")) for i in range(num_labels))
    # The sequence head has no bias; the token head's follows `token_classification_bias` (default True).
    bias = kinds[0] == "token_classification" and cfg.flag("token_classification_bias", True)
    return HeadConfig(kind=kinds[0], labels=labels, bias=bias)


def model_config(hf_dir: str) -> tuple[ModelConfig, str | None, str]:
    """(jaxvlm config, the decoder's family, the tensor-name layout) for the checkpoint folder `hf_dir`."""
    cfg = load_hf_config(hf_dir)
    t = cfg.raw("model_type")
    try:
        if t in TEXT_FAMILIES:
            return ModelConfig(decoder=decoder_config(cfg), tokens=tokens_config(hf_dir, cfg),
                               head=head_config(cfg)), t, "text"
        if t in VLM_FAMILIES:
            return (*_vlm_config(hf_dir, cfg), "vlm")
        projection = cfg.integer("projection_dim", None) \
            if "CLIPVisionModelWithProjection" in cfg.texts("architectures") else None
        vision = vision_config(cfg, attention_pool=t == "siglip_vision_model" and cfg.flag("vision_use_head", True),
                               projection_dim=projection)
        processing = image_processing(hf_dir, vision, clip_style=vision.class_token)
        return ModelConfig(vision=vision, image_processing=processing), None, "vision"
    except (ConfigError, files.FileError):  # already name their file and field
        raise
    except ValueError as e:  # a value the jaxvlm config refuses (e.g. heads that do not divide)
        raise ConfigError(f"{cfg.path}: {e}") from None
