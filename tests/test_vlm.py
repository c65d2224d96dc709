"""Vision-language parity with transformers: PaliGemma (Gemma), PaliGemma 2 (Gemma 2), LLaVA (CLIP + Phi-3).

Tiny random models, every parameter re-randomised, saved with `save_pretrained`, converted and
loaded (in this process; the command's own tests below run it as a user does); a batch of 2 images with
prompts of different lengths.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import jaxvlm
from jaxvlm import generate as generate_module
from jaxvlm import engine as engine_module
from jaxvlm.vision import VisionEncoder
from tests import hf_models

NEW_TOKENS = 24
TEXT_LENGTHS = [5, 9]
SEEDS = {"llava": 7}  # (seed 4's LLaVA-1.5 repeats one token from the start)


@pytest.fixture(scope="module", params=list(hf_models.VLMS))
def vlm(request, convert_and_load):
    """(name, torch model, jaxvlm model, prompts, pixels); EOS is a token the greedy run really produces."""
    name = request.param
    rows = hf_models.vlm_prompts(name, 1, TEXT_LENGTHS)
    pixels = hf_models.pixels(0, 2)
    model = hf_models.build_vlm(name, seed=SEEDS.get(name, 4))
    free_run = hf_models.hf_vlm_generate(model, name, rows, pixels, NEW_TOKENS)
    eos = int(free_run[1, 6])
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    return name, model, convert_and_load(model, name), rows, pixels


def test_image_features_match(vlm):
    name, hf, jx, _, pixels = vlm
    import torch
    with torch.no_grad():
        want = hf.model.get_image_features(hf_models.to_torch_pixels(pixels)).pooler_output
    want = np.stack([np.asarray(w) for w in want])
    assert jx.encode_image(pixels).shape == want.shape == (2, 16, jx.config.decoder.width)
    np.testing.assert_allclose(jx.encode_image(pixels), want, atol=1e-5, rtol=1e-5, err_msg=name)  # float32 rounding


def test_logits_match(vlm):
    name, hf, jx, rows, pixels = vlm
    ids, mask = hf_models.left_pad(rows)
    want = hf_models.hf_vlm_logits(hf, name, ids, mask, pixels, jx.config.position_offset)
    got = jx.logits(ids, mask, pixels)
    diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"{name}: max |logits diff| {diff}"


def test_greedy_tokens_match(vlm):
    name, hf, jx, rows, pixels = vlm
    ids, mask = hf_models.left_pad(rows)
    want = hf_models.hf_vlm_generate(hf, name, rows, pixels, NEW_TOKENS)
    got = jx.generate_ids(ids, mask, pixels, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(got, want, err_msg=name)
    eos = jx.config.tokens.eos_ids[0]
    assert (got == eos).any(), "the test should exercise end-of-sequence"
    assert len({tuple(r) for r in got[:, :8]}) == 2 and len(set(got[0, :8])) > 1, "degenerate generations"


def test_padded_rows_match_each_prompt_alone(vlm):
    name, _, jx, rows, pixels = vlm
    ids, mask = hf_models.left_pad(rows)
    batch = jx.generate_ids(ids, mask, pixels, max_new_tokens=8)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(batch[i], jx.generate_ids(row[None], None, pixels[i:i + 1], max_new_tokens=8)[0],
                                      err_msg=f"{name} row {i}")


def test_image_is_encoded_once_at_prefill(vlm, monkeypatch):
    """Tracing prefill and decode afresh calls the image encoder once: in the prefill that every request of
    the batch runs (one image each), never in the decode step."""
    name, _, jx, rows, pixels = vlm
    calls = []
    features = VisionEncoder.features
    monkeypatch.setattr(VisionEncoder, "features", lambda self, x: calls.append(x.shape) or features(self, x))
    generate_module.prefill.clear_cache()
    generate_module.decode.clear_cache()
    engine_module.decode_rows.clear_cache()
    ids, mask = hf_models.left_pad(rows)
    jx.generate_ids(ids, mask, pixels, max_new_tokens=NEW_TOKENS)
    assert calls == [(1, 32, 32, 3)], name


# --- PaliGemma's prefix-LM mask ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paligemma(convert_and_load):
    model = hf_models.build_vlm("paligemma", seed=6)
    return model, convert_and_load(model, "paligemma_prefix")


def test_prefix_is_bidirectional_and_suffix_causal(paligemma):
    hf, jx = paligemma
    row = hf_models.vlm_prompts("paligemma", 3, [10])[0]
    ids, pixels = row[None], hf_models.pixels(1, 1)
    T, first_text = len(row), 17  # 16 image tokens, BOS, then text

    def changed_at(position, token_type_ids=None):
        other = ids.copy()
        other[0, position] = 3 if ids[0, position] != 3 else 4
        a = jx.logits(ids, pixel_values=pixels, token_type_ids=token_type_ids)
        b = jx.logits(other, pixel_values=pixels, token_type_ids=token_type_ids)
        return np.abs(a - b).max(axis=-1)[0] > 1e-6  # bool[T]: outputs the change reached

    # The whole prompt is the prefix: its last token reaches every earlier position, images included.
    assert changed_at(T - 1).all()
    # With the last 4 tokens as a suffix, a suffix token reaches only itself and later positions.
    types = np.zeros((1, T), int)
    types[0, T - 4:] = 1
    reached = changed_at(T - 2, types)
    assert not reached[:T - 2].any() and reached[T - 2:].all()
    # ... and a prefix token still reaches every position, earlier prefix ones included.
    assert changed_at(first_text + 2, types).all()
    # transformers gives the same logits for the same token types.
    mask = np.ones((1, T), int)
    want = hf_models.hf_vlm_logits(hf, "paligemma", ids, mask, pixels, 1, token_type_ids=types)
    assert np.abs(jx.logits(ids, pixel_values=pixels, token_type_ids=types) - want).max() <= 1e-4


def test_generated_tokens_are_causal(paligemma):
    """Generation equals teacher forcing with the generated tokens as a causal suffix."""
    _, jx = paligemma
    row, pixels = hf_models.vlm_prompts("paligemma", 5, [6])[0], hf_models.pixels(2, 1)
    new = jx.generate_ids(row[None], pixel_values=pixels, max_new_tokens=12)[0]
    full = np.concatenate([row, new])[None]
    types = np.concatenate([np.zeros(len(row), int), np.ones(len(new), int)])[None]
    logits = jx.logits(full, pixel_values=pixels, token_type_ids=types)
    np.testing.assert_array_equal(logits[0, len(row) - 1:-1].argmax(-1), new)


# --- what a user gets: plain text and an image file in, the text transformers produces out ---------------
@pytest.fixture(scope="module")
def paligemma_with_processor(tmp_path_factory, gemma_tokenizer):
    """A PaliGemma checkpoint folder as Hugging Face writes it (model, tokenizer, processor), and the
    transformers model and processor it came from."""
    import PIL.Image
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    root = tmp_path_factory.mktemp("paligemma_user")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    tokenizer = gemma_tokenizer(str(hf_dir), symbols=("<image>",))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=3, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    model = hf_models.build_vlm("paligemma", seed=9, eos_token_id=1, vocab=120, image_token=image_id)
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(40, 52), (24, 24)]):
        paths.append(str(root / f"image{i}.png"))
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return str(hf_dir), model, processor, paths


def hf_answer(model, processor, prompts, paths, max_new_tokens):
    import PIL.Image
    import torch
    inputs = processor(images=[PIL.Image.open(p) for p in paths], text=prompts, return_tensors="pt", padding="longest")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return inputs, processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def user_folder(paligemma_with_processor, tmp_path_factory, convert_command):
    """The processor's checkpoint converted by the `convert` command, as a user does (read it)."""
    return convert_command(paligemma_with_processor[0], str(tmp_path_factory.mktemp("user") / "jax"))


def test_prompt_text_and_image_file_give_transformers_answer(paligemma_with_processor, user_folder):
    from jaxvlm.prompts import build_prompt
    hf_dir, hf, processor, paths = paligemma_with_processor
    jx = jaxvlm.load(user_folder)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(user_folder, name)), f"{name} not carried along"
    prompts = ["caption en", "what color is the circle?"]
    inputs, want = hf_answer(hf, processor, prompts, paths, 10)
    for i, prompt in enumerate(prompts):  # the processor's ids: image tokens, BOS, the prompt, a newline
        row = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].numpy()
        np.testing.assert_array_equal(build_prompt(jx.config, jx.tokenizer, prompt, with_image=True), row)
    np.testing.assert_allclose(jx.preprocess(paths), inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), atol=1e-6)
    assert all(want) and want[0] != want[1], want  # real, distinct answers
    assert jx.generate(prompts, image=paths, max_new_tokens=10) == want
    assert jx.generate(prompts[0], image=paths[0], max_new_tokens=10) == want[0]


def test_generate_command_with_image(paligemma_with_processor, user_folder):
    import subprocess
    import sys
    hf_dir, hf, processor, paths = paligemma_with_processor
    out = user_folder
    _, want = hf_answer(hf, processor, ["caption en"], paths[:1], 8)
    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", out, "--image", paths[0],
                             "--prompt", "caption en", "--max-new-tokens", "8"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == want[0]


# --- bad input: one line naming the image or argument ----------------------------------------------------
@pytest.fixture(scope="module")
def user_model(user_folder):
    return jaxvlm.load(user_folder)


@pytest.fixture(scope="module")
def text_model(convert_and_load):
    return convert_and_load(hf_models.build("gemma"), "text_only")


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_images_through_generate(user_model, tmp_path):
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    one_line_error(lambda: user_model.generate("hi", image=str(tmp_path / "nope.png")), r"image 0: .*nope.png: no such file")
    one_line_error(lambda: user_model.generate(["a", "b"], image=["/dev/null/x", str(tmp_path / "cut.png")]),
                   r"image 0: .*: no such file")
    one_line_error(lambda: user_model.generate("hi", image=str(tmp_path / "cut.png")), r"image 0: .*cut.png: cannot read")
    one_line_error(lambda: user_model.generate("hi", image=np.zeros((0, 0, 3), np.uint8)), r"image 0: the image is empty")


def test_image_missing_where_needed(user_model):
    one_line_error(lambda: user_model.generate("caption en"), "image: this vision-language model needs an image")
    ids = np.array([[user_model.config.image_token_id] * 16 + [2, 5, 6]])
    one_line_error(lambda: user_model.generate_ids(ids), "input_ids row 0 holds 16 image tokens but no pixel_values")
    one_line_error(lambda: user_model.logits(ids[:, :10], pixel_values=hf_models.pixels(0, 1)),
                   "input_ids row 0 holds 10 image tokens; its image needs exactly 16")


def test_number_of_images_must_match_prompts(user_model, paligemma_with_processor):
    paths = paligemma_with_processor[3]
    one_line_error(lambda: user_model.generate(["a", "b"], image=paths[:1]), "image: 1 images for 2 prompts")
    one_line_error(lambda: user_model.generate(["a"], image=paths), "image: 2 images for 1 prompts")
    one_line_error(lambda: user_model.generate("a", image=paths), "image: this model takes one image per prompt")
    ids = np.array([[user_model.config.image_token_id] * 16 + [2, 5, 6]] * 2)
    one_line_error(lambda: user_model.generate_ids(ids, pixel_values=hf_models.pixels(0, 1)),
                   "pixel_values hold 1 images for 2 rows of input_ids")
    one_line_error(lambda: user_model.logits(ids, pixel_values=hf_models.pixels(0, 2)[:, :16]),
                   r"pixel_values must be float \[B, 32, 32, 3\], got float32 \[2, 16, 32, 3\]")


def test_image_given_to_text_only_model(text_model, paligemma_with_processor):
    path = paligemma_with_processor[3][0]
    one_line_error(lambda: text_model.generate("hi", image=path), "image: this model has no image encoder")
    one_line_error(lambda: text_model.generate_ids(np.array([[3, 4]]), pixel_values=hf_models.pixels(0, 1)),
                   "pixel_values: this model has no image encoder")
    one_line_error(lambda: text_model.encode_image(hf_models.pixels(0, 1)), "pixel_values: this model has no image")


def test_generate_command_reports_bad_image(user_folder, tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", user_folder, "--image",
                             str(tmp_path / "missing.jpg"), "--prompt", "caption en"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: image 0: {tmp_path}/missing.jpg: no such file"]


def test_llava_prompt_equals_llava_processor(tmp_path, gemma_tokenizer):
    """LLaVA prompts: the `<image>` expanded to the image tokens after BOS, as `LlavaProcessor` does; a
    prompt without one gets it at its start, on a line of its own."""
    import PIL.Image
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    from jaxvlm.config import DecoderConfig, ModelConfig, TokensConfig, VisionConfig
    from jaxvlm.prompts import build_prompt
    from jaxvlm.tokenizer import Tokenizer

    tokenizer = gemma_tokenizer(str(tmp_path), symbols=("<image>",))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                      crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    config = ModelConfig(
        decoder=DecoderConfig(vocab_size=120, width=8, depth=1, num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8),
        vision=VisionConfig(image_size=32, patch_size=8, width=8, depth=2, num_heads=1, mlp_dim=8, class_token=True,
                            feature_layer=-2),
        tokens=TokensConfig(bos_id=2, eos_ids=(1,), add_bos=True), image_token_id=image_id, projector="mlp",
        prompt_format="image_marker")
    jx_tokenizer = Tokenizer.from_dir(str(tmp_path), config.tokens)
    assert jx_tokenizer.single_token_text(image_id) == "<image>"  # so the text is tokenized as a whole
    image = PIL.Image.new("RGB", (40, 32))
    for prompt, as_written in [("USER: <image>\nwhat is the fox? ASSISTANT:", None),
                               ("the quick brown fox", "<image>\nthe quick brown fox")]:
        want = processor(images=image, text=as_written or prompt)["input_ids"][0]
        got = build_prompt(config, jx_tokenizer, prompt, with_image=True)
        assert (got == image_id).sum() == 16
        np.testing.assert_array_equal(got, want, err_msg=prompt)
        # a tokenizer that cannot spell the image token gets the placeholders put in between the pieces
        jx_tokenizer.single_token_text = lambda token_id: None
        np.testing.assert_array_equal(build_prompt(config, jx_tokenizer, prompt, with_image=True), want)
        del jx_tokenizer.single_token_text
