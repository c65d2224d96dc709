"""Config translation, including older config.json layouts that real checkpoints still carry."""

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
