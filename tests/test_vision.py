"""Image encoders alone against transformers: SigLIP with its attention-pool head, CLIP with its projection.

Every hidden state (transformers' list: embeddings, then each layer), the final output and the pooled
image embedding are compared on tiny random models converted with the convert command.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import hf_models


@pytest.fixture(scope="module", params=["siglip", "clip"])
def encoder(request, convert_and_load):
    name = request.param
    model = hf_models.build_vision(name, seed=8)
    return name, model, convert_and_load(model, name)


def test_hidden_states_output_and_pooled_match(encoder):
    import torch
    name, hf, jx = encoder
    pixels = hf_models.pixels(3, 2)
    with torch.no_grad():
        want = hf(hf_models.to_torch_pixels(pixels), output_hidden_states=True)
    got = jx.vision_hidden_states(pixels)
    assert len(got) == len(want.hidden_states) == 4
    for i, (a, b) in enumerate(zip(got, want.hidden_states)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"{name} hidden state {i}")
    np.testing.assert_allclose(jx.encode_image(pixels), want.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    pooled = want.pooler_output if name == "siglip" else want.image_embeds  # attention pool; projected class token
    assert jx.image_embeddings(pixels).shape == tuple(pooled.shape)
    np.testing.assert_allclose(jx.image_embeddings(pixels), pooled.numpy(), atol=1e-5, rtol=1e-5)


def test_encoder_alone_has_no_decoder(encoder):
    _, _, jx = encoder
    with pytest.raises(ValueError, match="image encoder alone"):
        jx.logits(np.zeros((1, 3), int))


@pytest.fixture(scope="module")
def clip(convert_and_load):
    return convert_and_load(hf_models.build_vision("clip", seed=9), "clip_features")


@pytest.mark.parametrize("keep_class_token", [False, True], ids=["default", "full"])
def test_feature_layer_and_class_token(clip, keep_class_token):
    """LLaVA's selection: hidden_states[feature_layer], the class token dropped ("default") or kept ("full")."""
    import dataclasses
    from jaxvlm.vision import VisionEncoder
    config = dataclasses.replace(clip.config.vision, feature_layer=-2, keep_class_token=keep_class_token)
    pixels = hf_models.pixels(4, 1)
    features = VisionEncoder(config).apply({"params": clip.params["vision"]}, pixels, method="features")
    want = clip.vision_hidden_states(pixels)[-2]
    assert features.shape[1] == config.num_features == 16 + keep_class_token
    np.testing.assert_allclose(np.asarray(features), want if keep_class_token else want[:, 1:], atol=1e-5, rtol=1e-5)
