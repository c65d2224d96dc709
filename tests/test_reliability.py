"""Bad inputs and faults, a test per cause: files opened only as images, models saving what they were loaded
with, dataset runs where one row fails alone and no two runs share an output, bounded templates, configs,
prompts and batches, and one-line errors where a library would raise from deep inside."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import pytest

import jaxvlm
from jaxvlm import chat, files
from jaxvlm.dataset import generate_all
from jaxvlm.images import ImageError, load_image
from jaxvlm.model import BUILTIN_MODEL
from convert import convert

IMAGE = "examples/shapes.png"


@pytest.fixture(scope="module")
def model():
    return jaxvlm.load()


@pytest.fixture
def builtin_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_MODEL, folder)
    return folder


# --- images ---------------------------------------------------------------------------------------------
def test_a_postscript_file_named_png_never_reaches_a_pillow_plugin(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin
    reached = []
    monkeypatch.setattr(EpsImagePlugin, "_accept", lambda prefix: reached.append(prefix) or True)
    path = tmp_path / "photo.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(ImageError, match=r"photo.png: cannot read the image \(not an image in a format jaxvlm "
                                         r"reads: PNG, JPEG, WEBP, GIF, BMP, TIFF\)"):
        load_image(str(path))
    assert not reached


def test_exif_orientation_is_applied_as_transformers_load_image_applies_it(tmp_path):
    from transformers.image_utils import load_image as hf_load_image
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255
    image = PIL.Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    ours = load_image(str(tmp_path / "rotated.jpg"))
    assert ours.size == (10, 20)
    np.testing.assert_array_equal(np.asarray(ours.convert("RGB")),
                                  np.asarray(hf_load_image(str(tmp_path / "rotated.jpg"))))


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_given_as_an_image_is_named(tmp_path, kind):
    path = tmp_path / "x.png"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    name = "a FIFO" if kind == "fifo" else "a folder"
    with pytest.raises(ImageError, match=f"x.png: {name}, not a regular image file"):
        load_image(str(path))


def _png16(path, color_type: int, pixel: tuple[int, ...]) -> str:
    """A 4x4 16-bit PNG (grey 0, grey+alpha 4, RGB 2, RGBA 6) of one pixel value, written by hand."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\0" + struct.pack(f">{len(pixel)}H", *pixel) * 4
    header = struct.pack(">IIBBBBB", 4, 4, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * 4))
                + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("color_type, pixel", [(0, (40000,)), (0, (200,)), (4, (40000, 30000)),
                                               (2, (60000, 30000, 1000)), (6, (60000, 30000, 1000, 32768))])
def test_16_bit_pngs_are_converted_as_transformers_converts_them(model, tmp_path, color_type, pixel):
    from transformers import SiglipImageProcessorPil
    path = _png16(tmp_path / "deep.png", color_type, pixel)
    p = model.config.image_processing
    processor = SiglipImageProcessorPil(size={"height": p.size[0], "width": p.size[1]}, resample=p.resample,
                                        image_mean=list(p.mean), image_std=list(p.std))
    want = processor(images=PIL.Image.open(path), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(model.preprocess(path), want, atol=1e-6)


# --- what a model saves -----------------------------------------------------------------------------------
def test_save_and_export_write_the_files_the_model_was_loaded_with(builtin_copy, tmp_path):
    original = (builtin_copy / "tokenizer.model").read_bytes()
    loaded = jaxvlm.load(builtin_copy)
    (builtin_copy / "tokenizer.model").write_bytes(b"replaced after loading")
    loaded.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == original
    os.remove(builtin_copy / "tokenizer.model")
    loaded.export_hf(tmp_path / "exported")
    assert (tmp_path / "exported" / "tokenizer.model").read_bytes() == original


def test_export_refuses_a_shard_size_of_zero(model, tmp_path):
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
        model.export_hf(tmp_path / "out", max_shard_bytes=0)
    assert not (tmp_path / "out").exists()


# --- dataset runs -----------------------------------------------------------------------------------------
def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_a_non_utf8_file_name_fails_alone(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(IMAGE, folder / "a.png")
    shutil.copy(IMAGE, os.path.join(os.fsencode(folder), b"b\xff.png"))
    out = tmp_path / "out.jsonl"
    assert generate_all(model, folder, "count shapes", out, progress=False) == 2
    good, bad = _lines(out)
    assert good == {"image": "a.png", "prompt": "count shapes", "answer": "3"}
    assert bad["image"] == "b\\xff.png" and "not UTF-8" in bad["error"] and "answer" not in bad
    assert generate_all(model, folder, "count shapes", out, progress=False) == 0  # both done: resumes past them


def test_prompts_that_cannot_be_encoded_or_do_not_fit_fail_alone_naming_file_and_line(model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    image = os.path.abspath(IMAGE)
    rows.write_text("\n".join(json.dumps({"image": image, "prompt": p}) for p in
                              ["count shapes", "caption \ud800", "caption " + "en " * 400, "caption en"]) + "\n")
    out = tmp_path / "out.jsonl"
    assert generate_all(model, rows, None, out, batch_size=4, progress=False) == 4
    lines = _lines(out)
    assert [line.get("answer") for line in lines] == ["3", None, None, model.generate("caption en", image=IMAGE)]
    assert f"{rows}, line 2: " in lines[1]["error"] and "UTF-8" in lines[1]["error"]
    assert f"{rows}, line 3: " in lines[2]["error"] and "context of 256 tokens" in lines[2]["error"]


def test_a_bad_setting_fails_the_run_not_each_row(model, tmp_path):
    with pytest.raises(ValueError, match="repetition_penalty must be in"):
        generate_all(model, os.path.dirname(os.path.abspath(IMAGE)), "count shapes", tmp_path / "out.jsonl",
                     progress=False, repetition_penalty=-1)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_last_line_whole_but_for_its_newline_is_ended_before_the_next(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(IMAGE, folder / name)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"image": "a.png", "prompt": "count shapes", "answer": "3"}))  # no newline
    assert generate_all(model, folder, "count shapes", out, progress=False) == 1
    assert [r["image"] for r in _lines(out)] == ["a.png", "b.png"]


def test_the_resume_key_does_not_depend_on_how_the_folder_is_typed(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("photos")
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", IMAGE), "photos/a.png")
    assert generate_all(model, "photos", "count shapes", "out.jsonl", progress=False) == 1
    for typed in ("./photos", str(tmp_path / "photos"), "photos/"):
        assert generate_all(model, typed, "count shapes", "out.jsonl", progress=False) == 0


def test_out_equal_to_the_input_file_is_refused(model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": os.path.abspath(IMAGE), "prompt": "count shapes"}) + "\n")
    before = rows.read_text()
    with pytest.raises(ValueError, match="is the input file itself"):
        generate_all(model, rows, None, str(tmp_path / "." / "rows.jsonl"), progress=False)
    assert rows.read_text() == before


def test_two_runs_on_one_out_cannot_interleave(model, tmp_path):
    out = tmp_path / "out.jsonl"
    with files.exclusive(str(out) + ".lock", "out"):
        with pytest.raises(files.Busy, match=rf"out.jsonl is in use by process {os.getpid()} "):
            generate_all(model, os.path.dirname(os.path.abspath(IMAGE)), "count shapes", out, progress=False)
    assert not out.exists()


def test_a_lock_of_a_killed_process_does_not_block(tmp_path):
    lock = tmp_path / "out.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxvlm import files\n"
                               f"with files.exclusive({str(lock)!r}, 'x'):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(files.Busy, match=f"in use by process {holder.pid}"):
        with files.exclusive(str(lock), "x"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with files.exclusive(str(lock), "x"):
        pass
    assert not lock.exists()


def test_a_text_model_answers_a_jsonl_file_of_prompts(text_model, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    prompts = ["the quick brown", "hello jax", "the quick brown"]
    rows.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "answers.jsonl"
    assert generate_all(text_model, rows, None, out, batch_size=2, progress=False, max_new_tokens=4) == 3
    want = text_model.generate(prompts, max_new_tokens=4)
    assert _lines(out) == [{"line": i + 1, "prompt": p, "answer": a} for i, (p, a) in enumerate(zip(prompts, want))]
    command = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint",
                              text_model.tokenizer.directory, "--prompts", str(rows), "--out", str(tmp_path / "cli.jsonl"),
                              "--max-new-tokens", "4"], capture_output=True, text=True)
    assert command.returncode == 0 and command.stdout == f"wrote 3 lines to {tmp_path / 'cli.jsonl'}\n", command.stderr
    assert _lines(tmp_path / "cli.jsonl") == _lines(out)


def test_the_command_help_shows_every_default():
    help_text = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--help"], capture_output=True,
                               text=True, env=dict(os.environ, COLUMNS="200")).stdout
    for shown in ("(default: 8)", "(default: 0)", "else 32)", "(default: as stored)"):
        assert shown in help_text, shown


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, gemma_tokenizer):
    from tests import hf_models
    root = tmp_path_factory.mktemp("text")
    hf_models.save(hf_models.build("gemma", seed=1, eos_token_id=1, bos_token_id=2, vocab_size=128),
                   str(root / "hf"))
    gemma_tokenizer(str(root / "hf"))
    return jaxvlm.load(convert(str(root / "hf"), str(root / "jax"), progress=False))


# --- training ---------------------------------------------------------------------------------------------
def test_two_trainings_on_one_workdir_cannot_interleave(model, tmp_path):
    from jaxvlm.train import LOCK_FILE, TrainConfig, finetune
    workdir = tmp_path / "run"
    with files.exclusive(str(workdir / LOCK_FILE), "workdir"):
        with pytest.raises(files.Busy, match="is in use by process"):
            finetune(model, [{"image": IMAGE, "prompt": "count shapes", "answer": "3"}], TrainConfig(steps=1),
                     workdir=workdir, progress=False)


def test_a_workdir_without_its_run_file_is_not_resumed(tmp_path, model, monkeypatch):
    from jaxvlm import train
    workdir = tmp_path / "run"
    (workdir / train.CHECKPOINTS_DIR / "4").mkdir(parents=True)
    trainer = train.Trainer(model.config, train.TrainConfig(steps=4), workdir=workdir)
    monkeypatch.setattr(trainer, "restore", lambda params: setattr(trainer, "_resumed_from", ("x", 4)) or
                        trainer.init_state(params))
    with pytest.raises(ValueError, match="holds checkpoints but no run.json"):
        trainer.fit(model.params, lambda step: None, progress=False)


def test_train_reports_an_unwritable_out_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"image": os.path.abspath(IMAGE), "prompt": "count shapes", "answer": "3"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "train", "--data", str(data), "--out",
                          str(tmp_path / "file" / "model"), "--steps", "1"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: --out {tmp_path / 'file' / 'model'}: cannot write there ({tmp_path / 'file'} is not a folder)"], \
        out.stderr
    assert not (tmp_path / "runs").exists()


# --- bounded work -----------------------------------------------------------------------------------------
def test_overflowing_weights_are_a_named_error_not_an_empty_answer(model):
    params = jax_tree_scaled(model.params, "decoder/final_norm", 3e38)
    broken = jaxvlm.Model(model.config, params, model.tokenizer)
    with pytest.raises(FloatingPointError, match="row 0: the logits for generated token 1 are not finite"):
        broken.generate("caption en", image=IMAGE, max_new_tokens=4)


def test_int8_scales_that_are_finite_but_overflow_are_a_named_error(tmp_path):
    quantized = jaxvlm.load(quantize="int8")
    params = jax_tree_scaled(quantized.params, "decoder/layer_3/mlp/down/kernel_scale", 3e38)
    broken = jaxvlm.Model(quantized.config, params, quantized.tokenizer)
    with pytest.raises(FloatingPointError, match="row 0: the logits for generated token 1 are not finite"):
        broken.generate("caption en", image=IMAGE, max_new_tokens=4)
    broken.save(tmp_path / "saved")  # the scales are finite and positive: only the computation shows it
    with pytest.raises(FloatingPointError, match="are not finite"):
        jaxvlm.load(tmp_path / "saved").generate("caption en", image=IMAGE, max_new_tokens=4)


def jax_tree_scaled(params, prefix: str, factor: float):
    import jax
    from jaxvlm.checkpoint import param_name
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.float32(factor) if param_name(path).startswith(prefix) else x, params)


def test_config_sizes_are_bounded_before_anything_is_built(hf_checkpoint, tmp_path):
    from convert.fields import ConfigError
    from convert.hf_config import model_config
    folder = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("gemma"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=10**9)))
    with pytest.raises(ConfigError, match=r"config.json: field 'num_hidden_layers' must be an integer in "
                                          r"\[0, 1,024\], got 1000000000"):
        model_config(str(folder))


def test_a_converted_config_of_a_billion_layers_is_refused(builtin_copy):
    config = json.loads((builtin_copy / "config.json").read_text())
    config["decoder"]["depth"] = 10**9
    (builtin_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="DecoderConfig.depth: must be a positive int of at most 1,024"):
        jaxvlm.load(builtin_copy, verify=False)


@pytest.mark.parametrize("field, value, message", [
    ("eos_token_id", 2**40, r"field 'eos_token_id' must be a token id or a list of token ids \(integers in "
                            r"\[0, 2\*\*31 - 1\]\)"),
    ("bos_token_id", 2**31, r"field 'bos_token_id' must be a token id \(an integer in \[0, 2\*\*31 - 1\]\)"),
])
def test_special_token_ids_past_int32_are_refused_at_convert(hf_checkpoint, tmp_path, field, value, message):
    from convert.fields import ConfigError
    from convert.hf_config import model_config
    folder = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("gemma"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **{field: value})))
    with pytest.raises(ConfigError, match=message):
        model_config(str(folder))


def test_special_token_ids_past_int32_are_refused_at_load(builtin_copy):
    config = json.loads((builtin_copy / "config.json").read_text())
    config["tokens"]["eos_ids"] = [2**40]
    (builtin_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"TokensConfig.eos_ids: token ids are int32"):
        jaxvlm.load(builtin_copy, verify=False)


@pytest.mark.parametrize("edit, message", [
    ({"size": {"height": 10**6, "width": 10**6}}, r"field 'size.height' must be a size in \[1, 64\]"),
    ({"size": {"height": 0, "width": 32}}, r"field 'size.height' must be a size in \[1, 64\]"),
    ({"image_std": [0.5, 0, 0.5]}, r"field 'image_std' must be three nonzero numbers"),
    ({"resample": 42}, r"field 'resample' must be a Pillow filter number"),
    ({"size": {"height": 16, "width": 16}}, r"makes images of 16x16; the encoder takes 32x32"),
])
def test_processor_configs_are_checked_before_any_pixel_is_resized(hf_checkpoint, tmp_path, edit, message):
    from convert.fields import ConfigError
    from convert.hf_config import model_config
    folder = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("paligemma", vision_language=True), folder)
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **edit}))
    with pytest.raises(ConfigError, match=f"preprocessor_config.json: .*{message}"):
        model_config(str(folder))


def test_a_prompt_far_past_the_context_is_refused_without_tokenizing_it_all(model, monkeypatch):
    seen = []
    encode = model.tokenizer._encode
    monkeypatch.setattr(model.tokenizer, "_encode", lambda text: seen.append(len(text)) or encode(text))
    huge = "caption en " * 4_000_000  # 44 MB
    with pytest.raises(ValueError, match=r"prompt is 44,000,000 characters, far longer than the model's context "
                                         r"of 256 tokens"):
        model.generate(huge, image=IMAGE)
    assert max(seen) <= 256 * 64 + 1


def test_a_chat_message_far_past_the_context_is_refused_before_rendering(model, monkeypatch):
    model = jaxvlm.Model(model.config, model.params, model.tokenizer)
    monkeypatch.setattr(model.tokenizer, "chat_template", chat.ChatTemplate("{{ messages[0].content }}", "t", {}))
    with pytest.raises(ValueError, match="message 0 is 44,000,000 characters, far longer"):
        model.chat([{"role": "user", "content": "caption en " * 4_000_000}])


def test_a_long_list_of_prompts_runs_in_bounded_batches(model, monkeypatch):
    from jaxvlm import model as model_module
    monkeypatch.setattr(model_module, "GENERATE_BATCH", 2)
    sizes = []
    answers_of = model_module.Model._answers
    monkeypatch.setattr(model_module.Model, "_answers", lambda self, requests: sizes.append(len(requests)) or
                        answers_of(self, requests))
    prompts = ["count shapes", "caption en", "count shapes", "caption en", "count shapes"]
    answers = model.generate(prompts, image=[IMAGE] * 5, max_new_tokens=8)
    assert sizes == [2, 2, 1]
    assert answers == [model.generate(p, image=IMAGE, max_new_tokens=8) for p in prompts]


# --- one-line errors --------------------------------------------------------------------------------------
def test_a_tokenizer_panic_is_one_line_naming_the_tokenizer_file(model, monkeypatch):
    PanicException = type("PanicException", (BaseException,), {})

    def panic(text):
        raise PanicException("called `Option::unwrap()` on a `None` value")
    monkeypatch.setattr(model.tokenizer, "_encode", panic)
    with pytest.raises(ValueError, match=r"tokenizer.model: the tokenizer failed \(PanicException: called"):
        model.generate("count shapes", image=IMAGE)


def test_ctrl_c_swallowed_inside_a_write_still_stops_it(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="interrupted by SIGINT; nothing was written"):
        with files.writing(target) as tmp:
            (open(os.path.join(tmp, "half"), "w")).write("x")
            try:  # a library that catches everything, as a garbage-collection callback does
                os.kill(os.getpid(), signal.SIGINT)
            except BaseException:
                pass
    assert not target.exists() and os.listdir(tmp_path) == []


# --- a newcomer's first hour --------------------------------------------------------------------------------
def test_a_hub_id_is_found_in_the_local_cache_or_named_with_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(FileNotFoundError, match=r"^acme/shapes: no such folder, and not in the local Hugging Face "
                                                r"cache \(.*hf-home/hub\); download it first: hf download acme/shapes$"):
        jaxvlm.load("acme/shapes")
    repo = tmp_path / "hf-home" / "hub" / "models--acme--shapes"
    shutil.copytree(BUILTIN_MODEL, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert jaxvlm.load("acme/shapes").generate("count shapes", image=IMAGE) == "3"


FIRST_GENERATE = """import json, time, jax
hits = []
jax.monitoring.register_event_listener(lambda e, **k: e == "/jax/compilation_cache/cache_hits" and hits.append(e))
import jaxvlm
model = jaxvlm.load()
start = time.perf_counter()
answer = model.generate("caption en", image="examples/shapes.png")
print(json.dumps({"seconds": time.perf_counter() - start, "hits": len(hits), "answer": answer}))
"""


def test_the_compilation_cache_is_on_by_default_for_the_next_process(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # not the test run's own cache
    run = lambda **extra: json.loads(subprocess.run(
        [sys.executable, "-c", FIRST_GENERATE], cwd=root, capture_output=True, text=True, check=True,
        env=dict(env, XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)).stdout)
    first, second = run(), run()
    assert first["hits"] == 0 and second["hits"] >= 2  # prefill and decode read back, not compiled
    assert first["answer"] == second["answer"]
    assert os.listdir(tmp_path / "cache" / "jaxvlm" / "xla")
    where = "import jax, jaxvlm; jaxvlm.load(); print(jax.config.jax_compilation_cache_dir)"
    off = subprocess.run([sys.executable, "-c", where], cwd=root, capture_output=True, text=True, check=True,
                         env=dict(env, XDG_CACHE_HOME=str(tmp_path / "off"), JAXVLM_COMPILATION_CACHE="0"))
    assert off.stdout.strip() == "None" and not (tmp_path / "off").exists()


def test_an_exported_vision_language_model_works_with_auto_processor(model, tmp_path):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
    out = model.export_hf(tmp_path / "exported")
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text="caption en", images=PIL.Image.open(IMAGE), return_tensors="pt")
    inputs.pop("labels", None)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    tokens = hf.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert processor.decode(tokens, skip_special_tokens=True) == model.generate("caption en", image=IMAGE, max_new_tokens=20)
