"""Qwen2.5-VL and Qwen3-VL against transformers: images of any size as one sequence of patches (the 2-D
rotary embedding, Qwen2.5-VL's window attention with its full-attention layers, Qwen3-VL's learned
positions resampled to each image), the patch mergers, M-RoPE (in runs, interleaved) and DeepStack; the
processors, chat, the engine, the server, export, stacked layers, int8 and bad configs."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import tables
from convert.core import _set
from jaxvlm.config import VisionConfig
from jaxvlm.patches import bucket, pack
from jaxvlm.vision import VisionEncoder
from jaxvlm.vlm import Projector
from tests import hf_models

WIDTH, OUT = 32, 40
# two images of 12x20 and 8x8 patches (windows of 4x4 merged patches: 3 of a row over 2 rows, and one), and
# one of 6x10 whose windows are cut at its edges
GRIDS = [(1, 12, 20), (1, 8, 8), (1, 6, 10)]


@pytest.fixture(scope="module")
def encoder():
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    torch.manual_seed(0)
    hf_config = Qwen2_5_VLVisionConfig(depth=4, hidden_size=WIDTH, num_heads=4, intermediate_size=48,
                                       out_hidden_size=OUT, window_size=112, fullatt_block_indexes=[1, 3])
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():  # RMSNorm scales start at one: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    config = VisionConfig(image_size=None, patch_size=14, width=WIDTH, depth=4, num_heads=4, mlp_dim=48,
                          activation="silu", norm="rms", gated_mlp=True, patch_bias=False, rope_theta=10000.0,
                          temporal_patch_size=2, merge_size=2, window=4, full_attention_layers=(1, 3))
    whole = types.SimpleNamespace(vision=config, decoder=types.SimpleNamespace(width=OUT))
    rules = tables._bind(tables.QWEN_VISION, config) | tables._bind(tables.PROJECTORS["merge"](whole), whole)
    state = {tables.canonical_name("model." + k if not k.startswith("model.") else k, "vlm")[0]: v.numpy()
             for k, v in {f"model.visual.{k}": v for k, v in model.state_dict().items()}.items()}
    assert set(rules) == set(state), set(rules) ^ set(state)
    params = {}
    for name, rule in rules.items():
        assert state[name].shape == rule.shape, name
        for path, relayout in rule.targets:
            _set(params, path, jnp.asarray(relayout(state[name])))
    return model, config, params


def _patches(config, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((t * h * w, config.patch_dim)).astype(np.float32) for t, h, w in GRIDS]


def _features(config, params, packed):
    def run(params, packed):
        hidden, _ = VisionEncoder(config).apply({"params": params["vision"]}, packed,
                                                method=VisionEncoder.patch_features)
        return Projector("merge", OUT, merge=config.merge_size ** 2).apply({"params": params["projector"]}, hidden)[0]
    return jax.jit(run)(params, packed)


def test_merged_features_match_transformers(encoder):
    model, config, params = encoder
    values = _patches(config)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.concatenate(values)), grid_thw=torch.tensor(GRIDS)).pooler_output.numpy()
    packed = pack(values, GRIDS, config)
    total = sum(t * h * w for t, h, w in GRIDS)
    assert packed.values.shape[0] == bucket(total, 4) == 512
    got = np.asarray(_features(config, params, packed))
    np.testing.assert_allclose(got[:total // 4], expected, atol=1e-5, rtol=1e-4)


def test_an_image_alone_gives_its_features_in_a_batch(encoder):
    """Patches attend within their own image: an image's tokens do not depend on its neighbours."""
    model, config, params = encoder
    values = _patches(config)
    together = np.asarray(_features(config, params, pack(values, GRIDS, config)))
    alone = np.asarray(_features(config, params, pack(values[1:2], GRIDS[1:2], config)))
    start = GRIDS[0][1] * GRIDS[0][2] // 4
    np.testing.assert_allclose(together[start:start + 16], alone[:16], atol=1e-5, rtol=1e-5)


def test_windows_number_merged_squares_as_transformers_groups_them():
    from transformers.vision_utils import get_vision_window_index
    config = VisionConfig(image_size=None, patch_size=14, width=8, depth=1, num_heads=2, mlp_dim=8, rope_theta=1e4,
                          temporal_patch_size=2, merge_size=2, window=4)
    grids = [(1, 12, 20), (1, 6, 10), (2, 4, 4)]
    packed = pack([np.zeros((t * h * w, config.patch_dim)) for t, h, w in grids], grids, config)
    index, bounds = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    window_of_square = np.empty(len(index), np.int64)
    for w, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        window_of_square[index[a // 4:b // 4].numpy()] = w
    np.testing.assert_array_equal(packed.window[:4 * len(index):4], window_of_square)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_mrope_tables_match_transformers(family):
    """Three position streams (time, height, width), each turning its share of the frequencies: in runs
    (Qwen2.5-VL) or dealt out in turn (Qwen3-VL); text positions alike in every stream."""
    from jaxvlm.config import RopeConfig
    from jaxvlm.rope import rope_tables
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLTextConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding as Rotary
        section, interleaved = [4, 6, 6], False
    else:
        from transformers import Qwen3VLTextConfig as Config
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Rotary
        section, interleaved = [6, 5, 5], True
    hf = Rotary(Config(hidden_size=128, num_attention_heads=4, head_dim=32, rope_parameters=dict(
        rope_type="default", rope_theta=1e6, mrope_section=section)))
    rope = RopeConfig(theta=1e6, mrope_section=tuple(section), mrope_interleaved=interleaved)
    positions = np.random.default_rng(0).integers(0, 300, (2, 7, 3)).astype(np.int32)
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions).permute(2, 0, 1).long())
    got = rope_tables(jnp.asarray(positions), rope, 32)
    np.testing.assert_allclose(np.asarray(got[0]), cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), sin.numpy(), atol=1e-6)
    text = positions[..., 0]
    np.testing.assert_allclose(np.asarray(rope_tables(jnp.asarray(text), rope, 32)[0]),
                               np.asarray(rope_tables(jnp.asarray(np.repeat(text[..., None], 3, -1)), rope, 32)[0]))


def test_an_mrope_section_that_misses_half_the_head_is_named():
    from jaxvlm.config import DecoderConfig, RopeConfig
    with pytest.raises(ValueError, match=r"^DecoderConfig.rope.mrope_section: \[4, 6, 4\] adds up to 14, not 16"):
        DecoderConfig(vocab_size=10, width=64, depth=1, num_heads=2, num_kv_heads=2, head_dim=32, mlp_dim=8,
                      rope=RopeConfig(mrope_section=(4, 6, 4)))


def test_mrope_positions_match_transformers_rope_index():
    """Two rows, left-padded: one with two images (a wide one and a tall one) between text, one with text
    alone; positions and where decoding continues (transformers' rope_deltas + the row's length)."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    image = 9
    hf = Qwen2_5_VLModel(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=16, vocab_size=16, rope_parameters=dict(rope_type="default",
                                                                                   mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32),
        image_token_id=image))
    grids = [(1, 4, 8), (1, 6, 2)]
    first = [1, 2] + [image] * 8 + [3, 4, 5] + [image] * 3 + [6]
    second = [1, 2, 3, 4, 5]
    T = len(first) + 2
    tokens = np.zeros((2, T), np.int64)
    valid = np.zeros((2, T), bool)
    for b, row in enumerate([first, second]):
        tokens[b, T - len(row):], valid[b, T - len(row):] = row, True
    config = VisionConfig(image_size=None, patch_size=14, width=8, depth=1, num_heads=2, mlp_dim=8, rope_theta=1e4,
                          temporal_patch_size=2, merge_size=2)
    packed = pack([np.zeros((t * h * w, config.patch_dim)) for t, h, w in grids], grids, config)
    got = np.asarray(jax.jit(packed.mrope_positions, static_argnums=2)(tokens == image, valid, 2))
    expected, deltas = hf.get_rope_index(torch.from_numpy(tokens), torch.from_numpy(tokens == image).int(),
                                         image_grid_thw=torch.tensor(grids),
                                         attention_mask=torch.from_numpy(valid).long())
    np.testing.assert_array_equal(got, np.where(valid[..., None], expected.permute(1, 2, 0).numpy(), 0))
    np.testing.assert_array_equal(got[:, -1].max(-1) + 1, deltas[:, 0].numpy() + valid.sum(1))


# two rows with images of different sizes: a wide one; a tall one and a small one
ROW_GRIDS = [[(1, 4, 6)], [(1, 6, 4), (1, 2, 2)]]
NEW_TOKENS = 12


QWEN2_5 = pytest.mark.parametrize("qwen_vl", ["qwen2_5_vl"], indirect=True)  # what one family's test shows
QWEN3 = pytest.mark.parametrize("qwen_vl", ["qwen3_vl"], indirect=True)


@pytest.fixture(scope="module", params=list(hf_models.QWEN_VLS))
def qwen_vl(request, convert_and_load):
    """(torch model, jaxvlm model, rows, patches, grids) of a tiny Qwen2.5-VL or Qwen3-VL: EOS is a token
    the greedy run really produces."""
    rows = hf_models.qwen_vl_prompts(1, ROW_GRIDS)
    grids = [g for row in ROW_GRIDS for g in row]
    values = hf_models.patch_values(0, grids, patch=14 if request.param == "qwen2_5_vl" else 16)
    hf = hf_models.build_qwen_vl(request.param, seed=3)
    free = hf_models.hf_qwen_vl_generate(hf, rows, values, grids, NEW_TOKENS)
    hf.config.eos_token_id = hf.generation_config.eos_token_id = int(free[1, 6])
    return hf, convert_and_load(hf, request.param), rows, values, grids


@QWEN2_5
def test_the_converted_model_reads_qwen2_5_vl(qwen_vl):
    _, jx, _, _, _ = qwen_vl
    c = jx.config
    assert (c.model_type, c.decoder.model_type, c.vision.model_type) == ("qwen2_5_vl", "qwen2_5_vl_text",
                                                                         "qwen2_5_vl_vision")
    assert c.decoder.rope.mrope_section == (2, 3, 3) and c.decoder.qkv_bias and not c.decoder.out_bias
    assert (c.vision.window, c.vision.full_attention_layers, c.projector) == (2, (1,), "merge")


def test_qwen_vl_logits_match_on_rows_with_images_of_different_sizes(qwen_vl):
    hf, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    with torch.no_grad():
        want = hf(torch.tensor(ids), **hf_models.qwen_vl_kwargs(ids, mask, values, grids)).logits.numpy()
    got = jx.logits(ids, mask, values, image_grid_thw=grids)
    diff = np.abs(got - want)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"max |logits diff| {diff}"


def test_the_engine_answers_rows_with_images_of_different_sizes(qwen_vl):
    """Requests with one and two images of other sizes share the engine's slots and get generate's tokens
    (Qwen3-VL: DeepStack's additions made at prefill, none at decode)."""
    from jaxvlm.engine import Engine, Request
    from tests.test_engine import staggered
    _, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    want = jx.generate_ids(ids, mask, values, max_new_tokens=8, image_grid_thw=grids)
    _, _, _, images = jx._inputs(ids, mask, values, image_grid_thw=grids)
    got = staggered(Engine(jx, slots=2, cache_size=128, chunk=4),
                    [Request(tokens=row, pixels=images.of_row(i), max_tokens=8) for i, row in enumerate(rows)], [0, 1])
    for i, tokens in enumerate(got):
        np.testing.assert_array_equal(tokens, want[i, :len(tokens)], err_msg=f"row {i}")


@QWEN2_5
def test_a_second_question_about_the_same_images_reuses_their_cache(qwen_vl):
    """The reused prompt's text positions are shifted as M-RoPE numbers them past its images: the same
    tokens and log-probabilities as without the prefix cache."""
    from jaxvlm.engine import Engine, Request
    _, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    _, _, _, images = jx._inputs(ids, mask, values, image_grid_thw=grids)
    again = np.concatenate([rows[1]] + [rows[1][-4:]] * 4)  # the same images, a question 16 tokens longer
    answers = []
    for budget in (1 << 30, 0):
        engine = Engine(jx, slots=2, cache_size=128, chunk=4, prefix_cache_bytes=budget)
        for tokens in (rows[1], again):
            submitted = engine.submit(Request(tokens=tokens, pixels=images.of_row(1), max_tokens=8))
            answers.append(engine.run()[submitted])
        assert engine.prefix_cache is None or engine.prefix_cache.hits == 1
    np.testing.assert_array_equal(answers[1].tokens, answers[3].tokens)
    np.testing.assert_allclose(answers[1].logprobs, answers[3].logprobs, atol=1e-5)


@QWEN2_5
def test_qwen_vl_exports_to_identical_logits(qwen_vl, tmp_path):
    """Export back: transformers' Qwen2_5_VLForConditionalGeneration loads the folder and gives the logits
    of the model it was converted from, the config's M-RoPE section, windows and full-attention layers kept."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(jx.export_hf(tmp_path / "out"),
                                                               attn_implementation="eager").eval()
    kwargs = hf_models.qwen_vl_kwargs(ids, mask, values, grids)
    with torch.no_grad():
        want, got = (m(torch.tensor(ids), **kwargs).logits.numpy() for m in (hf, again))
    np.testing.assert_array_equal(got[mask.astype(bool)], want[mask.astype(bool)])
    assert again.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert (again.config.vision_config.window_size, again.config.vision_config.fullatt_block_indexes) == (56, [1])


@QWEN2_5
def test_stacked_layers_and_int8_weights(qwen_vl, tmp_path):
    """scan_layers: the vision tower's window and full-attention layers scanned with the decoder's, the
    unrolled logits and tokens. int8: the encoder's and the decoder's projections held as int8, the
    logits near the float ones (the tiny random model's margins are too thin for equal tokens)."""
    import jaxvlm
    _, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=values, image_grid_thw=grids)
    folder = jx.save(tmp_path / "saved")
    stacked = jaxvlm.load(folder, scan_layers=True)
    assert stacked.params["vision"]["layers"]["attn"]["q"]["kernel"].shape[0] == jx.config.vision.depth
    want = jx.logits(**inputs)
    np.testing.assert_allclose(stacked.logits(**inputs), want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(stacked.generate_ids(**inputs, max_new_tokens=8),
                                  jx.generate_ids(**inputs, max_new_tokens=8))
    int8 = jaxvlm.load(folder, quantize="int8")
    assert int8.params["vision"]["layer_0"]["attn"]["q"]["kernel"].dtype == jnp.int8
    assert int8.params["decoder"]["layer_0"]["attn"]["q"]["kernel"].dtype == jnp.int8
    valid = mask.astype(bool)
    error = np.abs(int8.logits(**inputs) - want)[valid].max() / np.abs(want[valid]).max()
    assert error < 0.05, error


@QWEN2_5
def test_images_of_ten_sizes_compile_a_program_a_patch_bucket(qwen_vl, caplog):
    """Patch counts are padded to a bucket (a power of two times a merged square): ten image sizes run six
    forward programs, one for each pair of a patch bucket and a prompt-length bucket."""
    import logging
    from jaxvlm.generate import prompt_bucket
    from tests import hf_models
    _, jx, _, _, _ = qwen_vl
    grids = [(1, 2, 2), (1, 2, 4), (1, 4, 4), (1, 4, 6), (1, 6, 4), (1, 2, 8), (1, 6, 6), (1, 4, 8), (1, 8, 4),
             (1, 2, 6)]
    prompts = [hf_models.qwen_vl_prompts(i, [[grid]])[0] for i, grid in enumerate(grids)]
    jax.clear_caches()
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        for i, (grid, ids) in enumerate(zip(grids, prompts)):
            jx.logits(ids[None], None, hf_models.patch_values(i, [grid]), image_grid_thw=[grid])
        compiled = [r for r in caplog.records if "Compiling jit(_forward)" in r.getMessage()]
    buckets = {(bucket(int(np.prod(g)), 4), prompt_bucket(len(ids))) for g, ids in zip(grids, prompts)}
    assert len(buckets) == len(compiled) == 6


def test_qwen_vl_greedy_tokens_match(qwen_vl):
    from tests import hf_models
    hf, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    want = hf_models.hf_qwen_vl_generate(hf, rows, values, grids, NEW_TOKENS)
    got = jx.generate_ids(ids, mask, values, max_new_tokens=NEW_TOKENS, image_grid_thw=grids)
    np.testing.assert_array_equal(got, want)
    assert (got == jx.config.tokens.eos_ids[0]).any(), "the test should exercise end-of-sequence"
    assert len({tuple(r) for r in got[:, :6]}) == 2 and len(set(got[0, :6])) > 1, "degenerate generations"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{% if message.content is string %}"
    "{{ message.content }}{% else %}{% for item in message.content %}{% if item.type == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item.type == 'text' %}{{ item.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


SPECIALS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# five aspect ratios: wide, tall, square, a sliver past the maximum's side, one below the minimum pixels;
# and one beyond the maximum pixels (resized down, as the processor resizes it)
SIZES = [(50, 90), (120, 40), (64, 64), (30, 200), (10, 30), (300, 280)]


# each family's processor and patch: Qwen2.5-VL's 14 pixels with CLIP's statistics, Qwen3-VL's 16 with 0.5
PROCESSORS = {"qwen2_5_vl": ("Qwen2_5_VLProcessor", 14, {}),
              "qwen3_vl": ("Qwen3VLProcessor", 16, dict(image_mean=[0.5] * 3, image_std=[0.5] * 3))}


@pytest.fixture(scope="module", params=list(PROCESSORS))
def qwen_vl_with_processor(request, tmp_path_factory, qwen_tokenizer):
    """A Qwen2.5-VL or Qwen3-VL folder as Hugging Face writes it (model, tokenizer, image processor, chat
    template), the transformers model and processor, and the images of SIZES as files."""
    import PIL.Image
    import transformers
    from transformers import Qwen2VLImageProcessorPil
    processor_class, patch, statistics = PROCESSORS[request.param]
    processor_class = getattr(transformers, processor_class)
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    tokenizer = qwen_tokenizer(str(hf_dir), specials=SPECIALS)
    start, image, end = tokenizer.convert_tokens_to_ids(list(SPECIALS))
    merged = (2 * patch) ** 2  # the pixels of a merged square: the range is 2 to 12 of them
    with pytest.MonkeyPatch.context() as monkey:  # (transformers checks the absent video processor's class,
        check = processor_class.check_argument_for_proper_class  # which needs torchvision: skip that check)
        monkey.setattr(processor_class, "check_argument_for_proper_class",
                       lambda self, name, arg: None if arg is None else check(self, name, arg))
        processor = processor_class(image_processor=Qwen2VLImageProcessorPil(
            min_pixels=2 * merged, max_pixels=12 * merged, patch_size=patch, **statistics), tokenizer=tokenizer)
    model = hf_models.build_qwen_vl(request.param, seed=5, eos_token_id=1, tokens=dict(
        image_token_id=image, vision_start_token_id=start, vision_end_token_id=end))
    model.save_pretrained(hf_dir)
    processor.image_processor.save_pretrained(hf_dir)  # (the processor's own save wants the video processor)
    tokenizer.save_pretrained(hf_dir)
    (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    rng = np.random.default_rng(2)
    paths = []
    for i, size in enumerate(SIZES):
        paths.append(str(root / f"image{i}.png"))
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return str(hf_dir), model, processor, paths


def test_prompts_patches_and_grids_equal_the_processor(qwen_vl_with_processor):
    """Two images in one prompt and one in each of four others, six sizes: the same ids (left-padded), the
    same patches and the same grids as Qwen2_5_VLProcessor or Qwen3VLProcessor."""
    import PIL.Image
    import jaxvlm
    hf_dir, _, processor, paths = qwen_vl_with_processor
    jx = jaxvlm.load(hf_dir)
    prompts = [f"compare {IMAGE} with {IMAGE} now", f"{IMAGE} what is it", f"see {IMAGE}", f"{IMAGE}", f"a {IMAGE} b"]
    images = [paths[:2], [paths[2]], [paths[3]], [paths[4]], [paths[5]]]
    processor.tokenizer.padding_side = "left"
    want = processor(text=prompts, images=[[PIL.Image.open(p) for p in row] for row in images], padding="longest",
                     return_tensors="np")
    got = jx.encode(prompts, image=images)
    np.testing.assert_array_equal(got.input_ids, want["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])
    np.testing.assert_array_equal(got.pixel_values.grids, want["image_grid_thw"])
    np.testing.assert_allclose(got.pixel_values.values, want["pixel_values"], atol=1e-6)
    assert len({tuple(g) for g in want["image_grid_thw"].tolist()}) >= 5


def test_images_of_any_size_give_transformers_answer(qwen_vl_with_processor):
    import PIL.Image
    import jaxvlm
    hf_dir, model, processor, paths = qwen_vl_with_processor
    jx = jaxvlm.load(hf_dir)
    prompt = f"compare {IMAGE} with {IMAGE} now"
    inputs = processor(text=[prompt], images=[[PIL.Image.open(paths[0]), PIL.Image.open(paths[1])]],
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert jx.generate(prompt, image=paths[:2], max_new_tokens=8) == want


def test_qwen_vl_image_markers_must_match_the_images(qwen_vl_with_processor):
    import jaxvlm
    hf_dir, _, _, paths = qwen_vl_with_processor
    jx = jaxvlm.load(hf_dir)
    with pytest.raises(ValueError, match=r"has 2 image markers <\|image_pad\|> for 1 image; write one marker"):
        jx.encode(f"{IMAGE} and {IMAGE}", image=[paths[0]])
    with pytest.raises(ValueError, match=r"has 1 image marker <\|image_pad\|> for 2 images"):
        jx.encode(f"{IMAGE} only", image=[paths[0], paths[1]])
    with pytest.raises(ValueError, match=r"has 1 image marker <\|image_pad\|> for 0 images"):
        jx.encode(f"{IMAGE} only")
    assert jx.generate("no image here", max_new_tokens=2) is not None  # a text prompt needs no image



def test_qwen_vl_chat_with_image_content_parts_as_the_processor_takes_them(qwen_vl_with_processor):
    """Messages with image parts, rendered by a Qwen-VL-style template: the same ids, patches and grids as
    Qwen2_5_VLProcessor.apply_chat_template, and chat answers as generate does for that prompt."""
    import jaxvlm
    hf_dir, _, processor, paths = qwen_vl_with_processor
    jx = jaxvlm.load(hf_dir)
    messages = [{"role": "user", "content": [{"type": "image", "path": paths[1]}, {"type": "text", "text": "what is "},
                                             {"type": "image", "path": paths[0]}, {"type": "text", "text": "it"}]}]
    want = processor.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="np")
    prompt = jx.apply_chat_template(messages)
    inputs = jx.processor.encode(prompt, [paths[1], paths[0]], add_bos=False)
    np.testing.assert_array_equal(inputs.input_ids, want["input_ids"])
    np.testing.assert_array_equal(inputs.pixel_values.grids, want["image_grid_thw"])
    np.testing.assert_allclose(inputs.pixel_values.values, want["pixel_values"], atol=1e-6)
    assert jx.chat(messages, max_new_tokens=4) == jx._generate_text(prompt, [paths[1], paths[0]], False,
                                                                    max_new_tokens=4)


def test_the_server_answers_a_chat_with_two_images_of_other_sizes(qwen_vl_with_processor):
    """`jaxvlm serve` with the folder: an OpenAI chat whose two images (data: URLs) differ in size gets
    `Model.chat`'s answer."""
    import base64
    import openai
    import jaxvlm
    from tests.servers import Server
    hf_dir, _, _, paths = qwen_vl_with_processor
    url = lambda path: "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()
    server = Server("--checkpoint", hf_dir, "--slots", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=6, temperature=0,
                                                messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url(paths[0])}}, {"type": "text", "text": "and "},
            {"type": "image_url", "image_url": {"url": url(paths[1])}}, {"type": "text", "text": "what"}]}])
    finally:
        assert server.stop() == 0, server.log()
    want = jaxvlm.load(hf_dir).chat([{"role": "user", "content": [
        {"type": "image", "path": paths[0]}, {"type": "text", "text": "and "}, {"type": "image", "path": paths[1]},
        {"type": "text", "text": "what"}]}], max_new_tokens=6)
    assert answer.choices[0].message.content == want


@pytest.mark.parametrize("name, edit, message", [
    ("config.json", lambda d: {**d, "text_config": {**d["text_config"], "rope_parameters": {
        **d["text_config"]["rope_parameters"], "mrope_section": [2, 3, 2]}}},
     r"config\.json: field 'text_config\.rope_parameters\.mrope_section' must be three counts \(time, height, "
     r"width\) adding up to half the rotary dimension, 8, got \[2, 3, 2\]"),
    ("config.json", lambda d: {**d, "vision_config": {**d["vision_config"], "out_hidden_size": 32}},
     r"config\.json: field 'vision_config\.out_hidden_size' must be the decoder's hidden_size 64"),
    ("preprocessor_config.json", lambda d: {**d, "size": {"shortest_edge": 5000, "longest_edge": 4000}},
     r"preprocessor_config\.json: PatchGrid\.max_pixels: must be at least min_pixels=5000, got 4000"),
])
def test_a_bad_qwen_vl_config_is_named(qwen_vl_with_processor, tmp_path, name, edit, message):
    import json
    import shutil
    import jaxvlm
    folder = tmp_path / "edited"
    shutil.copytree(qwen_vl_with_processor[0], folder)
    data = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(edit(data)))
    with pytest.raises(ValueError, match=message):
        jaxvlm.load(folder)


# --- Qwen3-VL: its encoder's learned positions and DeepStack ------------------------------------------
@QWEN3
def test_the_converted_model_reads_qwen3_vl(qwen_vl):
    _, jx, _, _, _ = qwen_vl
    c = jx.config
    assert (c.model_type, c.decoder.model_type, c.vision.model_type) == ("qwen3_vl", "qwen3_vl_text",
                                                                         "qwen3_vl_vision")
    assert c.decoder.rope.mrope_section == (2, 3, 3) and c.decoder.rope.mrope_interleaved and c.decoder.use_qk_norm
    assert (c.vision.position_grid, c.vision.deepstack_layers, c.vision.window, c.vision.norm) == (4, (0, 1), None,
                                                                                                   "layer")


@QWEN3
def test_image_features_and_deepstack_match(qwen_vl):
    """The merged tokens and DeepStack's, for images of two sizes at once."""
    import jax
    from jaxvlm.inputs import Images
    from jaxvlm.patches import PatchImages
    from jaxvlm.vlm import VisionLanguageModel
    hf, jx, _, values, grids = qwen_vl
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


@QWEN3
def test_qwen3_vl_stacked_layers_and_export(qwen_vl, tmp_path):
    """scan_layers (DeepStack's additions indexed by the scanned layer) gives the unrolled logits; export
    back loads in transformers to the same logits."""
    import jaxvlm
    from transformers import Qwen3VLForConditionalGeneration
    hf, jx, rows, values, grids = qwen_vl
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


@QWEN3
def test_qwen3_vl_int8_weights(qwen_vl, tmp_path):
    """int8 weights in the encoder, its mergers and the decoder give logits near the float ones."""
    import jax.numpy as jnp
    import jaxvlm
    _, jx, rows, values, grids = qwen_vl
    ids, mask = hf_models.left_pad(rows)
    int8 = jaxvlm.load(jx.save(tmp_path / "saved"), quantize="int8")
    assert int8.params["deepstack_projector_0"]["mlp"]["fc1"]["kernel"].dtype == jnp.int8
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=values, image_grid_thw=grids)
    full, quantized = jx.logits(**inputs), int8.logits(**inputs)
    valid = mask.astype(bool)
    assert np.abs(quantized - full)[valid].max() / np.abs(full[valid]).max() < 0.05
