"""Losses against transformers' own: CLIP's softmax and SigLIP's sigmoid contrastive losses on the
embeddings their models produce, and PaliGemma's next-token loss on the answer tokens."""

from __future__ import annotations

import numpy as np
import pytest

from jaxvlm.data import Batch
from jaxvlm.losses import clip_loss, next_token_loss, siglip_loss
from jaxvlm.train import _batch_arrays, loss_fn
from jaxvlm.vlm import VisionLanguageModel
from tests import hf_models

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8)


def _contrastive_outputs(kind: str, batch: int = 5):
    import torch
    import transformers
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
        model = transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
        model = transformers.SiglipModel(config)
    model = hf_models._randomise(model.to(torch.float32), seed=1)
    with torch.no_grad():  # away from the initial temperature and bias, so both enter the loss visibly
        model.logit_scale.fill_(1.7)
        if kind == "siglip":
            model.logit_bias.fill_(-2.5)
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(1, 64, size=(batch, 7)))
    pixels = torch.tensor(rng.uniform(-1, 1, size=(batch, 3, 16, 16)), dtype=torch.float32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    return model, out


def test_clip_loss_matches_transformers():
    model, out = _contrastive_outputs("clip")
    got = clip_loss(out.image_embeds.numpy(), out.text_embeds.numpy(), model.logit_scale.item())
    np.testing.assert_allclose(float(got), out.loss.item(), rtol=1e-5)


def test_siglip_loss_matches_transformers():
    model, out = _contrastive_outputs("siglip")
    got = siglip_loss(out.image_embeds.numpy(), out.text_embeds.numpy(), model.logit_scale.item(),
                      model.logit_bias.item())
    np.testing.assert_allclose(float(got), out.loss.item(), rtol=1e-5)


def test_contrastive_losses_reward_matching_pairs():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 8)).astype(np.float32)
    matched, shuffled = images + 0.01 * rng.standard_normal((6, 8)), images[::-1]
    assert clip_loss(images, matched, 2.0) < clip_loss(images, shuffled, 2.0)
    assert siglip_loss(images, matched, 2.0, -1.0) < siglip_loss(images, shuffled, 2.0, -1.0)


def test_next_token_loss_counts_masked_targets_only():
    logits = np.zeros((1, 4, 5), np.float32)
    logits[0, 1, 3] = 2.0  # position 1 predicts token 2 (= 3) with odds e^2 : 1 : 1 : 1 : 1
    tokens = np.array([[0, 1, 3, 4]])
    mask = np.array([[False, False, True, False]])
    loss, count = next_token_loss(logits, tokens, mask)
    assert float(count) == 1
    np.testing.assert_allclose(float(loss), -np.log(np.exp(2) / (np.exp(2) + 4)), rtol=1e-6)


@pytest.fixture(scope="module")
def paligemma(convert_and_load):
    hf = hf_models.build_vlm("paligemma")
    return hf, convert_and_load(hf, "paligemma-loss")


def test_answer_loss_matches_paligemma(paligemma):
    """The training loss on a right-padded batch of prompt + answer rows equals the loss transformers'
    PaliGemma computes with the processor's labels (-100 over the prefix) and token types (1 = suffix)."""
    import torch
    hf, jx = paligemma
    prompts = hf_models.vlm_prompts("paligemma", 3, [4, 7])
    answers = hf_models.prompts(4, [5, 2])
    rows = [np.concatenate([p, a, [1]]) for p, a in zip(prompts, answers)]
    T = max(len(r) for r in rows)
    ids = np.zeros((2, T), np.int64)
    mask, suffix = np.zeros((2, T), bool), np.zeros((2, T), bool)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, :len(r)], mask[i, :len(r)], suffix[i, len(p):len(r)] = r, True, True
    pixels = hf_models.pixels(5, 2)
    labels = np.where(suffix, ids, -100)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                  pixel_values=hf_models.to_torch_pixels(pixels), token_type_ids=torch.tensor(suffix.astype(np.int64)),
                  labels=torch.tensor(labels)).loss.item()
    batch = Batch(ids.astype(np.int32), mask, mask & ~suffix, suffix, pixels)
    loss, count = loss_fn(VisionLanguageModel(jx.config), jx.params, _batch_arrays(batch, jx.config))
    assert int(count) == suffix[:, 1:].sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
