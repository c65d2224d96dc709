"""Configs: JSON round trip and validation errors that name the field."""

import dataclasses

import pytest

from jaxvlm.config import DecoderConfig, ModelConfig, RopeConfig, TokensConfig

BASE = dict(vocab_size=10, width=8, depth=2, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16)


def test_json_round_trip_and_hashable():
    config = ModelConfig(
        decoder=DecoderConfig(**BASE, sliding_window=3, layer_types=("local", "global"),
                              rope=RopeConfig(short_factor=(1.0, 2.0), long_factor=(3.0, 4.0),
                                              original_max_position=16, attention_factor=1.2)),
        tokens=TokensConfig(bos_id=2, eos_ids=(1, 5), pad_id=0, add_bos=True))
    again = ModelConfig.from_json(config.to_json())
    assert again == config and hash(again) == hash(config)


@pytest.mark.parametrize("change, message", [
    (dict(num_kv_heads=3), "DecoderConfig.num_kv_heads: 3 does not divide num_heads=2"),
    (dict(depth=0), "DecoderConfig.depth: must be a positive int"),
    (dict(mlp_activation="relu"), "DecoderConfig.mlp_activation"),
    (dict(layer_types=("local",)), "DecoderConfig.layer_types: has 1 entries for depth=2"),
    (dict(layer_types=("local", "global")), "DecoderConfig.sliding_window: local layers need a sliding_window"),
    (dict(rope=RopeConfig(short_factor=(1.0,), long_factor=(1.0,), original_max_position=4)),
     "DecoderConfig.rope: LongRoPE factors need rotary_dim/2 = 2 entries"),
])
def test_validation_names_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DecoderConfig(**{**BASE, **change})


def test_unknown_field_in_json():
    text = ModelConfig(decoder=DecoderConfig(**BASE)).to_json().replace('"depth"', '"layers"')
    with pytest.raises(ValueError, match="unknown field 'decoder.layers'"):
        ModelConfig.from_json(text)


def test_vision_language_config_round_trip():
    from jaxvlm.config import ImageProcessing, VisionConfig
    config = ModelConfig(
        decoder=DecoderConfig(**BASE),
        vision=VisionConfig(image_size=32, patch_size=8, width=8, depth=2, num_heads=2, mlp_dim=16, class_token=True,
                            pre_norm=True, post_norm_class_only=True, feature_layer=-2),
        image_processing=ImageProcessing(shortest_edge=40, crop_size=(32, 32), mean=(0.1, 0.2, 0.3),
                                         std=(0.4, 0.5, 0.6)),
        projector="mlp", image_token_id=9, prompt_format="image_marker")
    again = ModelConfig.from_json(config.to_json())
    assert again == config and hash(again) == hash(config)
    assert config.vision.num_tokens == 17 and config.vision.num_features == 16
    # folders written when prompt formats were named after families still load
    old = ModelConfig.from_json(config.to_json().replace('"image_marker"', '"llava"'))
    assert old == config


@pytest.mark.parametrize("change, message", [
    (dict(patch_size=5), "VisionConfig.patch_size: 5 does not divide image_size=32"),
    (dict(num_heads=3), "VisionConfig.num_heads: 3 does not divide width=8"),
    (dict(activation="relu"), "VisionConfig.activation"),
    (dict(feature_layer=-4), "VisionConfig.feature_layer: -4 is not a hidden-state index for depth=2"),
])
def test_vision_validation_names_the_field(change, message):
    from jaxvlm.config import VisionConfig
    with pytest.raises(ValueError, match=message):
        VisionConfig(**{**dict(image_size=32, patch_size=8, width=8, depth=2, num_heads=2, mlp_dim=16), **change})


def test_vision_language_model_needs_an_image_token():
    from jaxvlm.config import VisionConfig
    with pytest.raises(ValueError, match="ModelConfig.image_token_id: a vision-language model needs one"):
        ModelConfig(decoder=DecoderConfig(**BASE),
                    vision=VisionConfig(image_size=32, patch_size=8, width=8, depth=2, num_heads=2, mlp_dim=16))


def test_the_pre_training_length_stands_without_longrope():
    """Llama 3's frequency smoothing reads original_max_position alone; LongRoPE's factors need it."""
    assert not RopeConfig(original_max_position=8192).is_longrope
    with pytest.raises(ValueError, match="RopeConfig.original_max_position: LongRoPE needs the pre-training length"):
        RopeConfig(short_factor=(1.0,), long_factor=(2.0,))
    with pytest.raises(ValueError, match="RopeConfig.long_factor: LongRoPE needs short_factor and long_factor"):
        RopeConfig(short_factor=(1.0,), original_max_position=4096)
