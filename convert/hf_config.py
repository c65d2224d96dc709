"""Hugging Face `config.json` (and tokenizer / generation configs) -> jaxvlm `ModelConfig`.

Hugging Face names meet jaxvlm's here, through each family's record (`convert.families`): its defaults,
the behaviours it fixes, the fields it reads; what is read the same way for every family is read here.
Both the transformers 5 layout (`rope_parameters`) and the older one (`rope_theta`, `rope_scaling`) are read.
Every field is read with its type checked (`convert.fields`), and every file from inside the folder.
"""

from __future__ import annotations

import os

from convert.families import (LAYER_TYPE_NAMES, TEXT_FAMILIES, VISION_FAMILIES, VISION_LANGUAGE_FAMILIES, TextFamily,
                              VisionFamily)
from convert.fields import ConfigError, Fields
from jaxvlm import files
from jaxvlm.config import (RESAMPLE_FILTERS, DecoderConfig, FrequencySmoothing, GenerationDefaults, HeadConfig,
                           ImageProcessing, ModelConfig, PanAndScan, PatchGrid, RopeConfig, TokensConfig, VisionConfig,
                           longrope_attention_factor)

SUPPORTED = tuple(TEXT_FAMILIES) + tuple(VISION_LANGUAGE_FAMILIES) + tuple(t for t, f in VISION_FAMILIES.items()
                                                                           if f.standalone)

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "gelu": "gelu", "quick_gelu": "quick_gelu"}


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


def _rope(params: Fields, cfg: Fields, theta: float, family: TextFamily | None = None,
          head_dim: int = 0) -> RopeConfig:
    """One rotary embedding from its parameters (`params`: rope_parameters, rope_scaling or one layer
    type's entry), `theta` when they name none; M-RoPE as `family` has it (its section where they give
    none, checked against `head_dim`; its streams interleaved or not, whatever they say, as transformers
    reads them)."""
    kind = params.text("rope_type", params.text("type", "default"))
    theta = params.number("rope_theta", theta)
    fraction = params.number("partial_rotary_factor", cfg.number("partial_rotary_factor", 1.0))
    if family is not None and family.mrope is not None:  # ("mrope": the old files' name; default frequencies)
        if kind not in ("default", "mrope"):
            raise ConfigError(f"{cfg.path}: unsupported rope type {kind!r} with M-RoPE (supported: default)")
        section = params.integers("mrope_section") if params.has("mrope_section") else family.mrope
        half = int(head_dim * fraction) // 2
        if len(section) != 3 or sum(section) != half:
            params.fail("mrope_section", f"three counts (time, height, width) adding up to half the rotary "
                                         f"dimension, {half}", list(section))
        return RopeConfig(theta=theta, rotary_fraction=fraction, mrope_section=tuple(section),
                          mrope_interleaved=family.mrope_interleaved)
    if kind == "default":
        return RopeConfig(theta=theta, rotary_fraction=fraction)
    if kind == "linear":
        return RopeConfig(theta=theta, rotary_fraction=fraction, linear_factor=params.number("factor"))
    if kind == "llama3":  # every field required, as transformers requires them
        smoothing = FrequencySmoothing(factor=params.number("factor"), low_freq_factor=params.number("low_freq_factor"),
                                       high_freq_factor=params.number("high_freq_factor"))
        return RopeConfig(theta=theta, rotary_fraction=fraction, smoothing=smoothing,
                          original_max_position=params.integer("original_max_position_embeddings"))
    if kind not in ("longrope", "su"):  # "su" is LongRoPE's old name
        raise ConfigError(f"{cfg.path}: unsupported rope type {kind!r} (supported: default, linear, llama3, "
                          "longrope)")
    # Phi-3 keeps the pre-training length outside the rope dict, and it takes precedence there.
    original = cfg.integer("original_max_position_embeddings", None) \
        or params.integer("original_max_position_embeddings", None) or cfg.integer("max_position_embeddings")
    scale = params.number("factor", None) or cfg.integer("max_position_embeddings") / original
    attention_factor = params.number("attention_factor", None) or longrope_attention_factor(scale, original)
    return RopeConfig(theta=theta, rotary_fraction=fraction, short_factor=params.numbers("short_factor"),
                      long_factor=params.numbers("long_factor"), original_max_position=original,
                      attention_factor=float(attention_factor))


def _ropes(cfg: Fields, family: TextFamily, head_dim: int) -> tuple[RopeConfig, RopeConfig | None]:
    """(the rotary embedding, the sliding-window layers' own or None). transformers 5 writes one entry per
    layer type in `rope_parameters` where they differ (Gemma 3); older files give the local layers' base
    as `rope_local_base_freq`, and `rope_scaling` then applies to the global layers alone."""
    params = cfg.sub("rope_parameters") if cfg.has("rope_parameters") else cfg.sub("rope_scaling")
    theta = cfg.number("rope_theta", 10_000.0)
    if params.has("full_attention") or params.has("sliding_attention"):
        return (_rope(params.sub("full_attention"), cfg, theta),
                _rope(params.sub("sliding_attention"), cfg, cfg.number("rope_local_base_freq", theta)))
    local = cfg.number("rope_local_base_freq", None)
    return (_rope(params, cfg, theta, family, head_dim),
            None if local is None else _rope(Fields({}, cfg.path), cfg, local))


def _layer_types(cfg: Fields, family: TextFamily, depth: int, sliding: int | None) -> tuple[str, ...]:
    """Per-layer "local" (sliding window) or "global": config.json's `layer_types`, else the family's pattern."""
    if sliding is None:
        return ()
    if cfg.has("layer_types"):
        names = cfg.texts("layer_types")
        unknown = [t for t in names if t not in LAYER_TYPE_NAMES]
        if unknown:
            cfg.fail("layer_types", f"a list of {' or '.join(LAYER_TYPE_NAMES)}", unknown[0])
        return tuple(LAYER_TYPE_NAMES[t] for t in names)
    return family.pattern(cfg, depth)


def decoder_config(cfg: Fields | dict) -> DecoderConfig:
    cfg = _fields(cfg)
    family = TEXT_FAMILIES[cfg.raw("model_type")]
    cfg = cfg.with_defaults(family.defaults)
    width, heads = cfg.integer("hidden_size"), cfg.integer("num_attention_heads")
    if heads <= 0:
        cfg.fail("num_attention_heads", "a positive integer", heads)
    head_dim = cfg.integer("head_dim", None) or width // heads
    depth = cfg.integer("num_hidden_layers")
    act = cfg.text("hidden_activation", None) or cfg.text("hidden_act", "silu")
    act = family.legacy_activations.get(act, act)
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{cfg.path}: unsupported activation {act!r}")
    for key, want in family.requires.items():
        if cfg.raw(key, want) != want:
            cfg.fail(key, f"{want!r} (jaxvlm reads {family.model_type} models with it so)", cfg.raw(key))
    sliding = family.window(cfg)
    bias = cfg.flag("attention_bias", False)
    rope, local_rope = _ropes(cfg, family, head_dim)
    fields = dict(qkv_bias=bias, out_bias=bias, model_type=family.model_type)
    fields.update(family.behaviours)  # (Qwen2 fixes its biases: on q, k, v, never on the output)
    fields.update({field: cfg.number(name, None) for name, field in family.numbers.items()})
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
        sliding_window=sliding,
        layer_types=_layer_types(cfg, family, depth, sliding),
        rope=rope,
        local_rope=local_rope,
        max_position_embeddings=cfg.integer("max_position_embeddings", 8192),
        tie_embeddings=cfg.flag("tie_word_embeddings", False),
        moe=None if family.moe is None else family.moe(cfg, depth),
        **fields,
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
    add_bos = tok.flag("add_bos_token", TEXT_FAMILIES[cfg.raw("model_type")].add_bos) and bos is not None
    return TokensConfig(bos_id=bos, eos_ids=eos, pad_id=pad, add_bos=add_bos)


SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens",
                   "max_new_tokens")


def generation_defaults(hf_dir: str) -> GenerationDefaults | None:
    """The sampling settings of `generation_config.json` (None when it has none of them), with transformers'
    `GenerationConfig` defaults for the fields it leaves out."""
    gen = read_json(hf_dir, "generation_config.json")
    if gen is None or not any(gen.has(k) for k in SAMPLING_FIELDS):
        return None
    top_k = gen.integer("top_k", 50)
    values = dict(do_sample=gen.flag("do_sample", False), temperature=gen.number("temperature", 1.0),
                  top_k=top_k or None, top_p=gen.number("top_p", 1.0),
                  repetition_penalty=gen.number("repetition_penalty", 1.0),
                  min_new_tokens=gen.integer("min_new_tokens", 0), max_new_tokens=gen.integer("max_new_tokens", None))
    for key, ok, expected in [("temperature", values["temperature"] >= 0, "a number >= 0"),
                              ("top_k", top_k >= 0, "an integer >= 0"),
                              ("top_p", 0 < values["top_p"] <= 1, "a number in (0, 1]"),
                              ("repetition_penalty", values["repetition_penalty"] > 0, "a number > 0"),
                              ("min_new_tokens", values["min_new_tokens"] >= 0, "an integer >= 0"),
                              ("max_new_tokens", values["max_new_tokens"] is None or values["max_new_tokens"] > 0,
                               "an integer > 0")]:
        if not ok:
            gen.fail(key, expected, gen.raw(key))
    return GenerationDefaults(**values)


def vision_config(cfg: Fields | dict, **composition) -> VisionConfig:
    """A SigLIP or CLIP vision config; `composition` adds what the enclosing model decides (feature layer, ...)."""
    cfg = _fields(cfg)
    t = cfg.text("model_type", "siglip_vision_model")
    if t not in VISION_FAMILIES:
        raise ConfigError(f"{cfg.path}: unsupported vision model_type {t!r} (supported: {', '.join(VISION_FAMILIES)})")
    family = VISION_FAMILIES[t]
    fields = family.read(cfg.with_defaults(family.defaults))
    act = fields.pop("activation")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{cfg.path}: unsupported vision activation {act!r}")
    return VisionConfig(activation=_ACTIVATIONS[act], model_type=t, **fields, **family.behaviours, **composition)


def image_processing(hf_dir: str, vision: VisionConfig, family: VisionFamily,
                     overrides: dict | None = None) -> ImageProcessing:
    """From `preprocessor_config.json` (or the `image_processor` entry of `processor_config.json`, where
    transformers 5 writes it), else the processor's defaults at the encoder's image size (`overrides`: a
    vision-language model's own processor's defaults)."""
    p = read_json(hf_dir, "preprocessor_config.json")
    if p is None:
        processor = read_json(hf_dir, "processor_config.json")
        p = processor.sub("image_processor") if processor is not None else Fields({}, "preprocessor_config.json")
    size = vision.image_size
    if family.processor == "patches":  # Qwen2VLImageProcessor: each image's own size, OpenAI's statistics
        defaults = dict(image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    elif family.processor == "clip":  # CLIPImageProcessor: shortest edge, centre crop, OpenAI statistics
        defaults = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
                        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    else:  # SiglipImageProcessor: a square, no crop, mean = std = 0.5
        defaults = dict(size={"height": size, "width": size}, do_center_crop=False, image_mean=[0.5] * 3,
                        image_std=[0.5] * 3)
    p = p.with_defaults(dict(defaults, **(overrides or {})))

    def side(fields: Fields, key: str) -> int:
        limit = 2 * size  # nothing is resized past twice the encoder's input
        value = fields.integer(key)
        if not 0 < value <= limit:
            fields.fail(key, f"a size in [1, {limit}] (twice the encoder's {size}-pixel input at most)", value)
        return value

    def hw(key: str) -> tuple[int, int]:
        value = p.raw(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return (side(p, key),) * 2
        if isinstance(value, dict):
            sub = p.sub(key)
            return (side(sub, "height"), side(sub, "width"))
        p.fail(key, "an integer or {height, width}", value)

    def channels(key: str) -> tuple[float, float, float]:
        values = p.numbers(key)
        if len(values) != 3:
            p.fail(key, "three numbers (one per channel)", list(values))
        if key == "image_std" and 0 in values:
            p.fail(key, "three nonzero numbers (pixels are divided by them)", list(values))
        return values

    resample = p.integer("resample", 3)
    if resample not in RESAMPLE_FILTERS:
        p.fail("resample", f"a Pillow filter number ({', '.join(f'{k} {v}' for k, v in RESAMPLE_FILTERS.items())})",
               resample)
    rescale = p.number("rescale_factor", 1 / 255) if p.flag("do_rescale", True) else None
    if rescale is not None and rescale <= 0:
        p.fail("rescale_factor", "a number > 0", rescale)
    normalize = p.flag("do_normalize", True)
    mean, std = (channels("image_mean"), channels("image_std")) if normalize else (None, None)
    if family.processor == "patches":
        return ImageProcessing(patches=patch_grid(p), resample=resample, rescale_factor=rescale, mean=mean, std=std)

    resize = p.flag("do_resize", True)
    size_field = p.raw("size")
    shortest = None
    if isinstance(size_field, dict) and p.sub("size").has("shortest_edge"):
        shortest = side(p.sub("size"), "shortest_edge")
    if isinstance(size_field, int) and family.processor == "clip":  # older CLIP configs: an int is the shortest edge
        shortest = side(p, "size")
    processing = ImageProcessing(
        size=hw("size") if resize and shortest is None else None,
        shortest_edge=shortest if resize else None,
        resample=resample,
        crop_size=hw("crop_size") if p.flag("do_center_crop") else None,
        rescale_factor=rescale,
        mean=mean,
        std=std,
        pan_and_scan=_pan_and_scan(p) if p.flag("do_pan_and_scan", False) else None,
    )
    why = processing.check_encoder(size)
    if why is not None:
        raise ConfigError(f"{p.path}: the image processing (size, crop_size) {why}")
    return processing


def patch_grid(p: Fields) -> PatchGrid:
    """Qwen2-VL's image processor settings (its preprocessor_config.json): the pixel range as `size`'s
    shortest and longest edge (transformers 5), or as min_pixels and max_pixels (older files)."""
    default = PatchGrid()
    size = p.sub("size", {})
    try:
        return PatchGrid(patch_size=p.integer("patch_size", default.patch_size),
                         merge_size=p.integer("merge_size", default.merge_size),
                         temporal_patch_size=p.integer("temporal_patch_size", default.temporal_patch_size),
                         min_pixels=size.integer("shortest_edge", None) or p.integer("min_pixels", default.min_pixels),
                         max_pixels=size.integer("longest_edge", None) or p.integer("max_pixels", default.max_pixels))
    except ValueError as e:  # (a range that is empty, a size of 0): named with the file
        raise ConfigError(f"{p.path}: {e}") from None


def _pan_and_scan(p: Fields) -> PanAndScan:
    """Gemma3ImageProcessor's crop settings (null fields take the processor's defaults)."""
    default = PanAndScan()
    return PanAndScan(min_crop_size=p.integer("pan_and_scan_min_crop_size", default.min_crop_size),
                      max_crops=p.integer("pan_and_scan_max_num_crops", default.max_crops),
                      min_ratio=p.number("pan_and_scan_min_ratio_to_activate", default.min_ratio))


def _text_part(cfg: Fields, default_type: str) -> Fields:
    """text_config, or where the file has none (the hub's Qwen-VL files) its top-level fields, as
    transformers reads them; the special ids and the tying of the head from the top level too."""
    if cfg.has("text_config"):
        text = cfg.sub("text_config")
        text = Fields(dict(text.data), text.path, text.prefix)
    else:
        text = Fields({k: v for k, v in cfg.data.items() if k not in ("model_type", "vision_config")}, cfg.path)
    text.data.setdefault("model_type", default_type)
    if text.raw("model_type") not in TEXT_FAMILIES:
        raise ConfigError(f"{cfg.path}: unsupported text model_type {text.raw('model_type')!r} "
                          f"(supported: {', '.join(TEXT_FAMILIES)})")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # special ids may sit at either level
        if text.raw(key) is None and cfg.raw(key) is not None:
            text.data[key] = cfg.raw(key)
    if cfg.raw("tie_word_embeddings") is True:  # transformers 5 ties by the top level's flag (or the text's)
        text.data["tie_word_embeddings"] = True
    return text


def _vlm_config(hf_dir: str, cfg: Fields) -> tuple[ModelConfig, TextFamily]:
    family = VISION_LANGUAGE_FAMILIES[cfg.raw("model_type")]
    text = _text_part(cfg, family.default_text_type)
    vision_fields = cfg.sub("vision_config", {"model_type": family.default_vision_type})
    if vision_fields.raw("model_type", family.model_type) == family.model_type:  # (older files name the model's)
        vision_fields = Fields(dict(vision_fields.data, model_type=family.default_vision_type), vision_fields.path,
                               vision_fields.prefix)
    vision, extra = family.read(cfg, lambda **composition: vision_config(vision_fields, **composition))
    processing = image_processing(hf_dir, vision, VISION_FAMILIES[vision_fields.raw("model_type")],
                                  family.image_processor)
    config = ModelConfig(decoder=decoder_config(text), tokens=tokens_config(hf_dir, text), vision=vision,
                         image_processing=processing, image_token_id=_image_token(cfg, family.default_image_token),
                         generation=generation_defaults(hf_dir), model_type=family.model_type, **family.wiring,
                         **extra)
    return config, TEXT_FAMILIES[text.raw("model_type")]


def _image_token(cfg: Fields, default: int) -> int:
    return cfg.token_id("image_token_index", cfg.token_id("image_token_id", default))


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


def model_config(hf_dir: str) -> tuple[ModelConfig, TextFamily | None, str]:
    """(jaxvlm config, the decoder's family, the tensor-name layout) for the checkpoint folder `hf_dir`."""
    cfg = load_hf_config(hf_dir)
    t = cfg.raw("model_type")
    try:
        if t in TEXT_FAMILIES:
            return ModelConfig(decoder=decoder_config(cfg), tokens=tokens_config(hf_dir, cfg), head=head_config(cfg),
                               generation=generation_defaults(hf_dir)), TEXT_FAMILIES[t], "text"
        if t in VISION_LANGUAGE_FAMILIES:
            return (*_vlm_config(hf_dir, cfg), "vlm")
        family = VISION_FAMILIES[t]
        projection = cfg.integer("projection_dim", None) \
            if "CLIPVisionModelWithProjection" in cfg.texts("architectures") else None
        vision = vision_config(cfg, attention_pool=family.attention_pool(cfg), projection_dim=projection)
        return ModelConfig(vision=vision, image_processing=image_processing(hf_dir, vision, family)), None, "vision"
    except (ConfigError, files.FileError):  # already name their file and field
        raise
    except ValueError as e:  # a value the jaxvlm config refuses (e.g. heads that do not divide)
        raise ConfigError(f"{cfg.path}: {e}") from None
