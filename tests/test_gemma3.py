"""Gemma 3 vision-language parity with transformers (Gemma3ForConditionalGeneration): SigLIP, the pooling
projector, images attending to themselves in both directions within the sliding window, several images a
row; and Gemma3Processor's prompts and pixels, pan and scan included.

A tiny random model (every parameter re-randomised), saved with `save_pretrained`, converted with the
convert command and loaded; a batch with one image in a row and two in the other.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import hf_models

NEW_TOKENS = 16
IMAGES_PER_ROW = [1, 2]


@pytest.fixture(scope="module")
def gemma3(convert_and_load):
    """(torch model, jaxvlm model, rows, pixels [3 images, row order]); EOS a token greedy decoding produces."""
    rows = hf_models.gemma3_prompts(1, IMAGES_PER_ROW)
    pixels = hf_models.pixels(0, sum(IMAGES_PER_ROW))
    model = hf_models.build_vlm("gemma3", seed=8)
    free_run = hf_generate(model, rows, pixels, NEW_TOKENS)
    model.config.eos_token_id = model.generation_config.eos_token_id = int(free_run[1, 6])
    return model, convert_and_load(model, "gemma3"), rows, pixels


def hf_generate(model, rows, pixels, max_new_tokens: int) -> np.ndarray:
    import torch
    ids, mask = hf_models.left_pad(rows)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), **hf_models.gemma3_kwargs(ids, mask, pixels),
                             max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=0, do_sample=False)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])))


def hf_logits(model, ids, mask, pixels) -> np.ndarray:
    import torch
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return model(torch.tensor(ids), position_ids=torch.tensor(positions),
                     **hf_models.gemma3_kwargs(ids, mask, pixels)).logits.float().numpy()


def test_image_features_match(gemma3):
    """SigLIP, the 8x8 patch grid average-pooled to 4x4, the soft-embedding norm and the projection."""
    hf, jx, _, pixels = gemma3
    import torch
    with torch.no_grad():
        want = hf.model.get_image_features(hf_models.to_torch_pixels(pixels)).pooler_output.numpy()
    got = jx.encode_image(pixels)
    assert got.shape == want.shape == (3, 16, jx.config.decoder.width)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_logits_match_with_one_and_two_images_a_row(gemma3):
    hf, jx, rows, pixels = gemma3
    ids, mask = hf_models.left_pad(rows)
    got, want = jx.logits(ids, mask, pixels), hf_logits(hf, ids, mask, pixels)
    diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"max |logits diff| {diff}"
    # the processor's token types are taken as they come, and change nothing
    types = (ids == hf_models.IMAGE_TOKEN).astype(int)
    np.testing.assert_array_equal(jx.logits(ids, mask, pixels, token_type_ids=types), got)


def test_greedy_tokens_match(gemma3):
    hf, jx, rows, pixels = gemma3
    ids, mask = hf_models.left_pad(rows)
    want = hf_generate(hf, rows, pixels, NEW_TOKENS)
    got = jx.generate_ids(ids, mask, pixels, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(got, want)
    assert (got == jx.config.tokens.eos_ids[0]).any(), "the test should exercise end-of-sequence"
    assert len({tuple(r) for r in got[:, :6]}) == 2 and len(set(got[0, :6])) > 1, "degenerate generations"


def test_padded_rows_match_each_prompt_alone(gemma3):
    _, jx, rows, pixels = gemma3
    ids, mask = hf_models.left_pad(rows)
    batch = jx.generate_ids(ids, mask, pixels, max_new_tokens=6)
    starts = np.cumsum([0] + IMAGES_PER_ROW)
    for i, row in enumerate(rows):
        alone = jx.generate_ids(row[None], None, pixels[starts[i]:starts[i + 1]], max_new_tokens=6)[0]
        np.testing.assert_array_equal(batch[i], alone, err_msg=f"row {i}")


def test_images_attend_both_ways_within_the_window(gemma3):
    """A change to an image's last token reaches its first token (which a causal mask would hide), and not
    the other image's tokens before it."""
    _, jx, rows, pixels = gemma3
    row = rows[1]
    images = np.flatnonzero(row == hf_models.IMAGE_TOKEN)
    first, second = images[:16], images[16:]
    other = pixels.copy()[1:]
    other[1, :, 16:] = -other[1, :, 16:]  # the second image's lower half: its last patches' tokens
    a = jx.logits(row[None], None, pixels[1:])
    b = jx.logits(row[None], None, other)
    reached = np.abs(a - b).max(axis=-1)[0] > 1e-6
    assert reached[second[0]] and reached[second].all() and not reached[first].any()


def test_bad_image_counts_are_one_line_errors(gemma3, tmp_path):
    _, jx, rows, pixels = gemma3
    ids, mask = hf_models.left_pad(rows)
    with pytest.raises(ValueError, match="pixel_values hold 2 images; the rows' image tokens ask for 3"):
        jx.logits(ids, mask, pixels[:2])
    many = hf_models.gemma3_prompts(2, [jx.config.max_images + 1])
    with pytest.raises(ValueError, match=f"holds {jx.config.max_images + 1} images; this model takes at most "
                                         f"{jx.config.max_images} per prompt"):
        jx.logits(many[0][None], None, hf_models.pixels(1, jx.config.max_images + 1))
    with pytest.raises(ValueError, match="token_type_ids must be 1 exactly at the image tokens"):
        jx.logits(ids, mask, pixels, token_type_ids=np.zeros_like(ids))
