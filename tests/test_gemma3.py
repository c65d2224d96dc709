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


def test_exports_to_identical_logits(gemma3, tmp_path):
    """export_hf writes a folder transformers loads as Gemma3ForConditionalGeneration, with the logits of the
    model it was converted from; its config is read back to the same jaxvlm config."""
    import transformers
    import jaxvlm
    hf, jx, rows, pixels = gemma3
    out = jx.export_hf(tmp_path / "out")
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = hf_models.left_pad(rows)
    np.testing.assert_array_equal(hf_logits(back, ids, mask, pixels), hf_logits(hf, ids, mask, pixels))
    assert jaxvlm.load(out).config == jx.config


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


# --- what a user gets: a prompt with image markers and image files in, the processor's inputs and text out ---
MARKERS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
PAN_AND_SCAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=3,
                    pan_and_scan_min_ratio_to_activate=1.2)


@pytest.fixture(scope="module")
def gemma3_with_processor(tmp_path_factory, gemma_tokenizer):
    """A Gemma 3 folder as Hugging Face writes it (model, tokenizer, processor asking for pan and scan), the
    transformers model and processor, and three images: wide (cut into 3 crops), square, tall (2 crops)."""
    import PIL.Image
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, GemmaTokenizer

    root = tmp_path_factory.mktemp("gemma3_user")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    gemma_tokenizer(str(hf_dir), symbols=MARKERS)
    tokenizer = GemmaTokenizer.from_pretrained(str(hf_dir), add_bos_token=True, extra_special_tokens=dict(
        zip(("boi_token", "eoi_token", "image_token"), MARKERS)))
    begin, end, image = tokenizer.convert_tokens_to_ids(list(MARKERS))
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **PAN_AND_SCAN)
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16)
    model = hf_models.build_vlm("gemma3", seed=8, eos_token_id=1, vocab=120, image_token=image, frame=(begin, end))
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(20, 50), (24, 24), (41, 18)]):
        paths.append(str(root / f"image{i}.png"))
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return str(hf_dir), model, processor, paths


PROMPTS = ["compare <start_of_image> with <start_of_image>", "<start_of_image> what is it"]


def test_prompts_and_pixels_equal_gemma3_processor(gemma3_with_processor):
    """Two prompts, the first with two images (one cut into crops), the second with one (cut too): the same
    ids as Gemma3Processor (asked for pan and scan, as the folder's processor config is), the same pixels."""
    import PIL.Image
    import jaxvlm
    hf_dir, _, processor, paths = gemma3_with_processor
    jx = jaxvlm.load(hf_dir)
    assert jx.config.image_processing.pan_and_scan is not None
    images = [[PIL.Image.open(paths[0]), PIL.Image.open(paths[1])], [PIL.Image.open(paths[2])]]
    want = processor(images=images, text=PROMPTS, padding="longest", return_tensors="np", **PAN_AND_SCAN)
    got = jx.encode(PROMPTS, image=[[paths[0], paths[1]], [paths[2]]])
    assert len(got.pixel_values) == 1 + 3 + 1 + 1 + 2
    np.testing.assert_array_equal(got.input_ids, want["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])
    np.testing.assert_allclose(got.pixel_values, want["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)


def test_two_images_give_transformers_answer(gemma3_with_processor):
    import PIL.Image
    import torch
    import jaxvlm
    hf_dir, model, processor, paths = gemma3_with_processor
    jx = jaxvlm.load(hf_dir)
    inputs = processor(images=[[PIL.Image.open(paths[0]), PIL.Image.open(paths[1])]], text=PROMPTS[:1],
                       return_tensors="pt", **PAN_AND_SCAN)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert jx.generate(PROMPTS[0], image=[paths[0], paths[1]], max_new_tokens=8) == want
    assert "".join(jx.stream(PROMPTS[0], image=[paths[0], paths[1]], max_new_tokens=8)) == want


def test_image_markers_must_match_the_images(gemma3_with_processor):
    import jaxvlm
    hf_dir, _, _, paths = gemma3_with_processor
    jx = jaxvlm.load(hf_dir)
    with pytest.raises(ValueError, match=r"has 2 image markers <start_of_image> for 1 image; write one marker"):
        jx.encode(PROMPTS[0], image=[paths[1]])
    with pytest.raises(ValueError, match=r"has 1 image marker <start_of_image> for 2 images"):
        jx.encode(PROMPTS[1], image=[paths[1], paths[1]])
    with pytest.raises(ValueError, match=r"has 1 image marker <start_of_image> for 0 images"):
        jx.encode(PROMPTS[1])
    too_many = " ".join(["<start_of_image>"] * 3)
    with pytest.raises(ValueError, match=r"prompt 0 has 11 images \(pan-and-scan crops included\); this model takes "
                                         r"at most 8 per prompt"):
        jx.encode(too_many, image=[paths[0], paths[0], paths[2]])
    assert jx.generate("no image here", max_new_tokens=2)  # a text prompt needs no image
    # the image token's own text typed into a prompt is the prompt's fault, not input_ids'
    with pytest.raises(ValueError, match=r"^prompt 1 holds the image token '<image_soft_token>' as text \(1 extra\)"):
        jx.encode(["no image here", "an <image_soft_token> typed"])


def test_generate_command_with_two_images(gemma3_with_processor):
    import subprocess
    import sys
    import jaxvlm
    hf_dir, _, _, paths = gemma3_with_processor
    want = jaxvlm.load(hf_dir).generate(PROMPTS[0], image=paths[:2], max_new_tokens=6)
    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", hf_dir, "--image", paths[0],
                             "--image", paths[1], "--prompt", PROMPTS[0], "--max-new-tokens", "6"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == want + "\n"


def test_an_export_without_processor_files_works_with_auto_processor(gemma3_with_processor, tmp_path):
    """A model whose folder has no processor files (trained here, or converted without them) exports the
    processor settings transformers' AutoProcessor needs (image tokens per image, ...)."""
    import shutil
    import PIL.Image
    import jaxvlm
    from transformers import AutoProcessor
    hf_dir, _, _, paths = gemma3_with_processor
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (bare / name).exists():
            (bare / name).unlink()
    jx = jaxvlm.load(bare)
    processor = AutoProcessor.from_pretrained(jx.export_hf(tmp_path / "out"))
    inputs = processor(text=PROMPTS[1], images=[PIL.Image.open(paths[1])], return_tensors="np")
    np.testing.assert_array_equal(inputs["input_ids"], jx.encode(PROMPTS[1], image=[paths[1]]).input_ids)


CONTENT_PARTS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for item in message.content %}"
    "{% if item.type == 'image' %}<start_of_image>{% elif item.type == 'text' %}{{ item.text }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_chat_with_image_content_parts_as_the_processor_takes_them(gemma3_with_processor, tmp_path):
    """Messages whose content is a list of text and image parts, rendered by a Gemma-3-style template: the
    same ids and pixels as Gemma3Processor.apply_chat_template, the images taken from the parts."""
    import shutil
    import jaxvlm
    hf_dir, _, processor, paths = gemma3_with_processor
    folder = tmp_path / "chat"
    shutil.copytree(hf_dir, folder)
    (folder / "chat_template.jinja").write_text(CONTENT_PARTS_TEMPLATE)
    jx = jaxvlm.load(folder)
    messages = [{"role": "user", "content": [{"type": "image", "path": paths[1]}, {"type": "text", "text": "what is "},
                                             {"type": "image", "path": paths[0]}, {"type": "text", "text": "it"}]}]
    want = processor.apply_chat_template(messages, chat_template=CONTENT_PARTS_TEMPLATE, add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="np",
                                         **PAN_AND_SCAN)  # the folder's settings (see the test above)
    prompt = jx.apply_chat_template(messages)
    inputs = jx.processor.encode(prompt, [paths[1], paths[0]], add_bos=False)
    np.testing.assert_array_equal(inputs.input_ids, want["input_ids"])
    np.testing.assert_allclose(inputs.pixel_values, want["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)
    answer = jx.chat(messages, max_new_tokens=4)
    assert answer == jx._generate_text(prompt, [paths[1], paths[0]], False, max_new_tokens=4)
    with pytest.raises(ValueError, match="the messages hold image parts already"):
        jx.chat(messages, image=paths[0])


def test_the_engine_answers_rows_of_one_and_two_images(gemma3):
    """Gemma 3 requests with one and two images each share the engine's slots and get generate's tokens."""
    from jaxvlm.engine import Engine, Request
    _, jx, rows, pixels = gemma3
    ids, mask = hf_models.left_pad(rows)
    want = jx.generate_ids(ids, mask, pixels, max_new_tokens=8)
    _, _, _, images = jx._inputs(ids, mask, pixels)
    engine = Engine(jx, slots=2, cache_size=128, chunk=4)
    submitted = []
    for i, row in enumerate(rows):
        submitted.append(engine.submit(Request(tokens=row, pixels=images.of_row(i), max_tokens=8)))
        engine.step()
    done = engine.run()
    for i, request_id in enumerate(submitted):
        tokens = done[request_id].tokens
        np.testing.assert_array_equal(tokens, want[i, :len(tokens)], err_msg=f"row {i}")


def test_the_same_image_asked_again_reuses_its_cache(gemma3):
    """A second question about the same image runs only its end (no image encoded again); its tokens are
    those without the prefix cache. Another image with the same question shares nothing past the text."""
    from jaxvlm.engine import Engine, Request
    _, jx, rows, pixels = gemma3
    ids, mask = hf_models.left_pad(rows)
    _, _, _, images = jx._inputs(ids, mask, pixels)
    row, image = rows[0], images.of_row(0)  # row 0 has one image, row 1 two others
    again = np.concatenate([row, row[-5:][::-1], row[-5:]])  # the same image, a longer question
    requests = [Request(tokens=row, pixels=image, max_tokens=8), Request(tokens=again, pixels=image, max_tokens=8),
                Request(tokens=row, pixels=images.of_row(1)[:1], max_tokens=8)]
    answers = []
    for budget in (1 << 30, 0):
        engine = Engine(jx, slots=2, cache_size=128, chunk=4, prefix_cache_bytes=budget)
        done = {}
        for request in requests:  # one after another: each finds the ones before it kept
            submitted = engine.submit(request)
            done[submitted] = engine.run()[submitted]
        answers.append([out.tokens for out in done.values()])
        if budget:
            assert engine.prefix_cache.hits == 1 and engine.prefix_cache.reused == len(again) - 16
    assert answers[0] == answers[1]
    assert answers[0][0] == list(jx.generate_ids(row[None], pixel_values=image, max_new_tokens=8)[0][:len(answers[0][0])])
