"""Qwen3-VL against transformers: its image encoder (16-pixel patches, learned positions resampled to each
image, LayerNorms), DeepStack (inner vision layers' features added to the first decoder layers' outputs at
the image tokens) and its interleaved M-RoPE; a batch of two rows with images of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import hf_models

# two rows with images of different sizes: a wide one; a tall one and a small one
ROW_GRIDS = [[(1, 4, 6)], [(1, 6, 4), (1, 2, 2)]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def qwen3_vl(convert_and_load):
    """(torch model, jaxvlm model, rows, patches, grids): EOS is a token the greedy run really produces."""
    rows = hf_models.qwen_vl_prompts(1, ROW_GRIDS)
    grids = [g for row in ROW_GRIDS for g in row]
    values = hf_models.patch_values(0, grids, patch=16)
    hf = hf_models.build_qwen3_vl(seed=3)
    free = _hf_generate(hf, rows, values, grids)
    hf.config.eos_token_id = hf.generation_config.eos_token_id = int(free[1, 6])
    return hf, convert_and_load(hf, "qwen3_vl"), rows, values, grids


def _hf_generate(hf, rows, values, grids):
    ids, mask = hf_models.left_pad(rows)
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), **hf_models.qwen_vl_kwargs(ids, mask, values, grids), do_sample=False,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=0, pad_token_id=0)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, NEW_TOKENS - new.shape[1])))


def test_the_converted_model_reads_qwen3_vl(qwen3_vl):
    _, jx, _, _, _ = qwen3_vl
    c = jx.config
    assert (c.model_type, c.decoder.model_type, c.vision.model_type) == ("qwen3_vl", "qwen3_vl_text",
                                                                         "qwen3_vl_vision")
    assert c.decoder.rope.mrope_section == (2, 3, 3) and c.decoder.rope.mrope_interleaved and c.decoder.use_qk_norm
    assert (c.vision.position_grid, c.vision.deepstack_layers, c.vision.window, c.vision.norm) == (4, (0, 1), None,
                                                                                                   "layer")


def test_image_features_and_deepstack_match(qwen3_vl):
    """The merged tokens and DeepStack's, for images of two sizes at once."""
    import jax
    from jaxvlm.inputs import Images
    from jaxvlm.patches import PatchImages
    from jaxvlm.vlm import VisionLanguageModel
    hf, jx, _, values, grids = qwen3_vl
    with torch.no_grad():
        want = hf.model.visual(torch.from_numpy(values), grid_thw=torch.tensor(grids))
    images = Images.of_rows([PatchImages(values, np.asarray(grids, np.int32))])
    patches, _ = images.bucketed(jx.config.vision)
    tokens, inner = jax.jit(lambda p, x: VisionLanguageModel(jx.config.computation).apply(
        {"params": p}, x, method="_patch_tokens"))(jx.params, patches)
    n = len(want.pooler_output)
    np.testing.assert_allclose(np.asarray(tokens)[0, :n], want.pooler_output.numpy(), atol=1e-5, rtol=1e-4)
    assert len(inner) == len(want.deepstack_features) == 2
    for mine, theirs in zip(inner, want.deepstack_features):
        np.testing.assert_allclose(np.asarray(mine)[0, :n], theirs.numpy(), atol=1e-5, rtol=1e-4)


def test_qwen3_vl_logits_match_on_rows_with_images_of_different_sizes(qwen3_vl):
    hf, jx, rows, values, grids = qwen3_vl
    ids, mask = hf_models.left_pad(rows)
    with torch.no_grad():
        want = hf(torch.tensor(ids), **hf_models.qwen_vl_kwargs(ids, mask, values, grids)).logits.numpy()
    got = jx.logits(ids, mask, values, image_grid_thw=grids)
    diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"max |logits diff| {diff}"


def test_qwen3_vl_greedy_tokens_match(qwen3_vl):
    hf, jx, rows, values, grids = qwen3_vl
    ids, mask = hf_models.left_pad(rows)
    want = _hf_generate(hf, rows, values, grids)
    got = jx.generate_ids(ids, mask, values, max_new_tokens=NEW_TOKENS, image_grid_thw=grids)
    np.testing.assert_array_equal(got, want)
    assert (got == jx.config.tokens.eos_ids[0]).any(), "the test should exercise end-of-sequence"
    assert len({tuple(r) for r in got[:, :6]}) == 2 and len(set(got[0, :6])) > 1, "degenerate generations"


def test_qwen3_vl_stacked_layers_and_export(qwen3_vl, tmp_path):
    """scan_layers (DeepStack's additions indexed by the scanned layer) gives the unrolled logits; export
    back loads in transformers to the same logits."""
    import jaxvlm
    from transformers import Qwen3VLForConditionalGeneration
    hf, jx, rows, values, grids = qwen3_vl
    ids, mask = hf_models.left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=values, image_grid_thw=grids)
    stacked = jaxvlm.load(jx.save(tmp_path / "saved"), scan_layers=True)
    np.testing.assert_allclose(stacked.logits(**inputs), jx.logits(**inputs), atol=1e-5, rtol=0)
    again = Qwen3VLForConditionalGeneration.from_pretrained(jx.export_hf(tmp_path / "out"),
                                                            attn_implementation="eager").eval()
    kwargs = hf_models.qwen_vl_kwargs(ids, mask, values, grids)
    with torch.no_grad():
        want, got = (m(torch.tensor(ids), **kwargs).logits.numpy() for m in (hf, again))
    np.testing.assert_array_equal(got[mask.astype(bool)], want[mask.astype(bool)])


def test_qwen3_vl_in_the_engine_and_in_int8(qwen3_vl, tmp_path):
    """Rows with images of other sizes share the engine's slots and get generate's tokens (DeepStack's
    additions made at prefill, none at decode); int8 weights in the encoder, its mergers and the decoder
    give logits near the float ones."""
    import jax.numpy as jnp
    import jaxvlm
    from jaxvlm.engine import Engine, Request
    _, jx, rows, values, grids = qwen3_vl
    ids, mask = hf_models.left_pad(rows)
    want = jx.generate_ids(ids, mask, values, max_new_tokens=8, image_grid_thw=grids)
    _, _, _, images = jx._inputs(ids, mask, values, image_grid_thw=grids)
    engine = Engine(jx, slots=2, cache_size=128, chunk=4)
    submitted = []
    for i, row in enumerate(rows):
        submitted.append(engine.submit(Request(tokens=row, pixels=images.of_row(i), max_tokens=8)))
        engine.step()
    done = engine.run()
    for i, request_id in enumerate(submitted):
        np.testing.assert_array_equal(done[request_id].tokens, want[i, :len(done[request_id].tokens)])
    int8 = jaxvlm.load(jx.save(tmp_path / "saved"), quantize="int8")
    assert int8.params["deepstack_projector_0"]["mlp"]["fc1"]["kernel"].dtype == jnp.int8
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=values, image_grid_thw=grids)
    full, quantized = jx.logits(**inputs), int8.logits(**inputs)
    valid = mask.astype(bool)
    assert np.abs(quantized - full)[valid].max() / np.abs(full[valid]).max() < 0.05
