"""Config translation, including older config.json layouts that real checkpoints still carry."""

import dataclasses

import pytest
import transformers

from convert.hf_config import decoder_config

NAMES = {"sliding_attention": "local", "full_attention": "global"}


def legacy(config) -> dict:
    """config.json as older transformers wrote it: no layer_types, rope_theta at the top level."""
    d = config.to_dict()
    d.pop("layer_types", None)
    rope = d.pop("rope_parameters", None) or {}
    d["rope_theta"] = rope.get("rope_theta", 10000.0)
    return d


@pytest.mark.parametrize("config", [
    transformers.Gemma2Config(num_hidden_layers=5, sliding_window=16),
    transformers.Qwen3Config(num_hidden_layers=6, use_sliding_window=True, sliding_window=32, max_window_layers=4),
    transformers.Qwen3Config(num_hidden_layers=3),
    transformers.Phi3Config(num_hidden_layers=3, sliding_window=64),
    transformers.GemmaConfig(num_hidden_layers=2),
], ids=["gemma2", "qwen3_window", "qwen3", "phi3", "gemma"])
def test_layer_types_default_like_transformers(config):
    ours = decoder_config(legacy(config))
    window = config.sliding_window if config.model_type != "gemma" else None
    want = [NAMES[t] for t in getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers]
    if config.model_type == "phi3" and window is not None:
        want = ["local"] * config.num_hidden_layers  # transformers' Phi-3 windows every layer
    got = [ours.window(i) for i in range(ours.depth)]
    assert got == [window if t == "local" else None for t in want]
    assert ours.rope.theta == legacy(config)["rope_theta"]


def test_phi3_su_rope_scaling_is_longrope():
    d = transformers.Phi3Config(num_hidden_layers=1, hidden_size=64, num_attention_heads=4).to_dict()
    d.pop("rope_parameters")
    d.update(rope_theta=10000.0, original_max_position_embeddings=4096, max_position_embeddings=131072,
             rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    rope = decoder_config(d).rope
    assert rope.is_longrope and rope.original_max_position == 4096
    assert abs(rope.attention_factor - 1.1902380714238083) < 1e-12  # sqrt(1 + ln 32 / ln 4096)


def test_unsupported_rope_type():
    d = transformers.Qwen3Config(num_hidden_layers=1).to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        decoder_config(d)


# The config.json of google/paligemma-3b-pt-224 as published: its text and vision parts list only what
# differs from transformers' class defaults.
PALIGEMMA_3B = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1,
                    "torch_dtype": "float32", "vocab_size": 257216},
    "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
    "vocab_size": 257216,
}


def _published(tmp_path, data: dict, stem: str):
    """(config, family, layout, the tensor shapes predicted) for a published config.json, whose predicted
    tensors must be transformers' own model's (`stem`ForConditionalGeneration, its head tied)."""
    import json
    import torch
    from convert.families import tensor_rules
    from convert.hf_config import model_config
    (tmp_path / "config.json").write_text(json.dumps(data))
    config, family, layout = model_config(str(tmp_path))
    with torch.device("meta"):  # shapes only, nothing allocated
        hf = getattr(transformers, f"{stem}ForConditionalGeneration")(getattr(transformers, f"{stem}Config")(**data))
    want = {n: tuple(t.shape) for n, t in hf.state_dict().items() if n != "lm_head.weight"}  # tied
    got = {n: r.shape for n, r in tensor_rules(config).items()}
    assert len(got) == len(want) and sorted(got.values()) == sorted(want.values())
    return config, family, layout, got


def test_published_paligemma_config(tmp_path):
    """transformers' defaults fill the gaps: the tensors predicted are transformers' own model's."""
    import math
    config, family, layout, got = _published(tmp_path, PALIGEMMA_3B, "PaliGemma")
    d, v = config.decoder, config.vision
    assert (family.model_type, layout) == ("gemma", "vlm")
    assert (d.width, d.depth, d.num_heads, d.num_kv_heads, d.head_dim, d.mlp_dim, d.vocab_size) == \
        (2048, 18, 8, 1, 256, 16384, 257216)
    assert d.mlp_activation == "gelu_tanh" and d.tie_embeddings and d.embed_scale and d.norm_scale_offset == 1
    assert (v.image_size, v.patch_size, v.width, v.depth, v.num_heads, v.mlp_dim, v.num_features) == \
        (224, 14, 1152, 27, 16, 4304, 256)
    assert v.activation == "gelu_tanh" and not v.class_token and not v.attention_pool and v.feature_layer is None
    assert config.image_token_id == 257152 and config.prefix_lm and config.position_offset == 1
    assert config.tokens.bos_id == 2 and config.tokens.eos_ids == (1,)
    p = config.image_processing
    assert p.size == (224, 224) and p.crop_size is None and p.mean == p.std == (0.5,) * 3
    assert sum(math.prod(s) for s in got.values()) == 2_923_466_480


# The config.json of google/gemma-3-4b-it as published: the text part leaves heads, vocabulary and RoPE
# bases to Gemma3TextConfig's defaults, and gives the older `rope_scaling`.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_published_gemma3_config(tmp_path):
    """Gemma 3 4B: five local layers to a global one, the global RoPE scaled 8x, 64x64 patches pooled to
    16x16 tokens framed by begin/end-of-image; the tensors predicted are transformers' own model's."""
    config, family, layout, _ = _published(tmp_path, GEMMA3_4B, "Gemma3")
    d, v = config.decoder, config.vision
    assert (family.model_type, layout) == ("gemma3_text", "vlm")
    assert (d.width, d.depth, d.num_heads, d.num_kv_heads, d.head_dim, d.mlp_dim, d.vocab_size) == \
        (2560, 34, 8, 4, 256, 10240, 262208)
    assert d.layer_types[:6] == ("local",) * 5 + ("global",) and d.sliding_window == 1024
    assert (d.rope.theta, d.rope.linear_factor, d.local_rope.theta, d.local_rope.linear_factor) == (1e6, 8.0, 1e4, 1.0)
    assert (v.image_size, v.patch_size, v.num_patches, config.tokens_per_image) == (896, 14, 4096, 256)
    assert config.image_token_id == 262144 and config.image_frame == (255999, 256000) and config.image_blocks
    assert config.tokens.eos_ids == (1, 106) and not config.prefix_lm and config.position_offset == 0
    p = config.image_processing
    assert p.size == (896, 896) and p.resample == 2 and p.pan_and_scan is None


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text", "phi3", "qwen3", "qwen3_moe", "llama", "mistral",
                                  "qwen2"])
def test_a_family_is_recorded_and_found_again(name, tmp_path):
    """Reading picks a family's record by model_type and the config records it (through a save and a load);
    writing takes the record named, and for a config made in code the one whose behaviours it has."""
    from convert.families import TEXT_FAMILIES, ConfigError, text_family_of
    from convert.hf_config import model_config
    from jaxvlm.config import ModelConfig
    from tests import hf_models
    config_class, kwargs = hf_models.CONFIGS[name]
    getattr(transformers, config_class)(**kwargs, vocab_size=64).to_json_file(tmp_path / "config.json")
    config, family, layout = model_config(str(tmp_path))
    assert family is TEXT_FAMILIES[name] and layout == "text"
    (tmp_path / "converted").mkdir()
    config.save(tmp_path / "converted")
    assert ModelConfig.load(tmp_path / "converted").decoder.model_type == name
    assert text_family_of(config.decoder) is family
    unnamed = dataclasses.replace(config.decoder, model_type=None)
    if name in ("phi3", "llama", "mistral", "qwen2"):  # Llama's layer, each: a config made in code names its family
        with pytest.raises(ConfigError, match=r"fit several Hugging Face families \(phi3, llama, mistral(, qwen2)?\): "
                                              "set decoder.model_type to one"):
            text_family_of(unnamed)
    else:
        assert text_family_of(unnamed) is family
    assert config.computation.decoder.model_type is None  # no compilation of its own


def test_a_recorded_family_is_checked_against_the_config(tmp_path):
    from convert.families import ConfigError, text_family_of, vision_family_of, vision_language_family_of
    from convert.hf_config import model_config
    from tests import hf_models
    config_class, kwargs = hf_models.CONFIGS["gemma2"]
    getattr(transformers, config_class)(**kwargs, vocab_size=64).to_json_file(tmp_path / "config.json")
    decoder = model_config(str(tmp_path))[0].decoder
    with pytest.raises(ConfigError, match=r"decoder.model_type 'llama9': no such Hugging Face family \(known: gemma,"):
        text_family_of(dataclasses.replace(decoder, model_type="llama9"))
    with pytest.raises(ConfigError, match="a phi3 checkpoint cannot hold this decoder's norms and embedding scale "
                                          r"\(norm_scale_offset=1.0, embed_scale=True"):
        text_family_of(dataclasses.replace(decoder, model_type="phi3"))
    from jaxvlm import presets
    vlm = presets.get("paligemma-3b-pt-224")
    assert (vlm.model_type, vlm.vision.model_type) == ("paligemma", "siglip_vision_model")
    assert vision_language_family_of(vlm).model_type == "paligemma"
    with pytest.raises(ConfigError, match="a llava checkpoint cannot hold this model's wiring .*projector='linear'"):
        vision_language_family_of(dataclasses.replace(vlm, model_type="llava"))
    with pytest.raises(ConfigError, match="a CLIP checkpoint cannot hold this encoder's class token"):
        vision_family_of(dataclasses.replace(vlm.vision, model_type="clip_vision_model"))


def test_gemma3_rope_per_layer_type_in_either_layout():
    """transformers 5 writes a rope entry per layer type; older Gemma 3 files give rope_theta (global,
    scaled by rope_scaling), rope_local_base_freq and a sliding_window_pattern."""
    from jaxvlm.config import RopeConfig
    new = transformers.Gemma3TextConfig(num_hidden_layers=7, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}).to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    for d in (new, old):
        ours = decoder_config(d)
        assert ours.rope == RopeConfig(theta=1_000_000.0, linear_factor=8.0)
        assert ours.local_rope == RopeConfig(theta=10_000.0)
        assert ours.layer_types == ("local",) * 5 + ("global", "local")
        assert ours.use_qk_norm and ours.use_post_norms and ours.embed_scale and ours.tie_embeddings
        assert ours.attn_logit_softcap is None and ours.final_logit_softcap is None
    with pytest.raises(Exception, match="use_bidirectional_attention"):
        decoder_config(dict(new, use_bidirectional_attention=True))
