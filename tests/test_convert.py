"""Converter behaviour on good and bad checkpoint folders, and the tables' coverage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxvlm
from convert import convert
from convert.readers import CheckpointError
from tests import hf_models


@pytest.fixture(scope="module")
def hf_dir(hf_checkpoint):
    return hf_checkpoint("qwen3", seed=2)


def broken_copy(hf_dir, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of the checkpoint with its tensors or config.json edited."""
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    if edit_config:
        edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def assert_fails_cleanly(src, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as err:
        convert(src, str(out), progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")], "temporary folder left behind"


def test_missing_config(tmp_path):
    (tmp_path / "hf").mkdir()
    assert_fails_cleanly(str(tmp_path / "hf"), tmp_path, "no config.json")


def test_unsupported_model_type(hf_dir, tmp_path):
    src = broken_copy(hf_dir, tmp_path, edit_config=lambda c: c.update(model_type="mamba"))
    assert_fails_cleanly(src, tmp_path, "unsupported model_type 'mamba'")


def test_truncated_safetensors(hf_dir, tmp_path):
    src = broken_copy(hf_dir, tmp_path)
    path = os.path.join(src, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert_fails_cleanly(src, tmp_path, "model.safetensors: unreadable safetensors file")


def test_missing_tensor(hf_dir, tmp_path):
    src = broken_copy(hf_dir, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_fails_cleanly(src, tmp_path, "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_unexpected_tensor(hf_dir, tmp_path):
    src = broken_copy(hf_dir, tmp_path, edit_tensors=lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    assert_fails_cleanly(src, tmp_path, "unexpected tensor 'model.extra.weight'")


def test_shape_differs_from_config(hf_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    src = broken_copy(hf_dir, tmp_path, edit_tensors=shrink)
    assert_fails_cleanly(src, tmp_path, r"'model.layers.0.self_attn.k_proj.weight' has shape \[63, 64\], "
                                        r"config.json predicts \[64, 64\]")


def test_existing_output_folder_is_refused(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert(hf_dir, str(tmp_path / "out"), progress=False)


def test_bfloat16_conversion_and_commands(hf_dir, tmp_path):
    """`jaxvlm convert --dtype bfloat16` and `python -m convert` write the same params in the asked dtype."""
    subprocess.run([sys.executable, "-m", "jaxvlm.cli", "convert", hf_dir, str(tmp_path / "bf16"),
                    "--dtype", "bfloat16"], check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "convert", hf_dir, str(tmp_path / "bad"), "--dtype", "float32"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    bf16, f32 = jaxvlm.load(tmp_path / "bf16"), jaxvlm.load(tmp_path / "bad")
    assert bf16.dtype == np.dtype("bfloat16") and f32.dtype == np.float32
    ids = np.arange(3, 13)[None]
    assert np.abs(bf16.logits(ids) - f32.logits(ids)).max() < 0.5  # bfloat16 rounding, same weights
    assert bf16.generate_ids(ids, max_new_tokens=5).shape == (1, 5)
    assert np.array_equal(jaxvlm.load(tmp_path / "bf16", dtype="float32").params["decoder"]["embedder"]["embedding"],
                          f32.params["decoder"]["embedder"]["embedding"].astype("bfloat16").astype(np.float32))


def test_command_reports_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convert", str(tmp_path), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path}/config.json: no config.json in the "
                                                  "checkpoint folder"]


def test_tensors_are_streamed_one_part_at_a_time(hf_dir, tmp_path, monkeypatch):
    """When a tensor is read, every tensor of the parts already written has been released: memory holds
    the tensors of one part (a layer, or a module such as the embedding) at most."""
    import weakref
    from convert import readers
    from jaxvlm import checkpoint

    alive: list[weakref.ref] = []
    written = [0]  # how many of the tensors read belong to parts already written
    read, save = readers.TensorReader.get, checkpoint.save_params

    def tracked_get(self, name):
        held = [r for r in alive[:written[0]] if r() is not None]
        assert not held, f"a tensor of a part already written is still held when reading {name}"
        array = read(self, name)
        alive.append(weakref.ref(array))
        return array

    def tracked_save(*args, **kwargs):
        save(*args, **kwargs)
        written[0] = len(alive)

    monkeypatch.setattr(readers.TensorReader, "get", tracked_get)
    monkeypatch.setattr(checkpoint, "save_params", tracked_save)
    convert(hf_dir, str(tmp_path / "out"), progress=False)
    assert len(alive) == 2 + 2 * 15  # embedding, final norm, 15 tensors per layer (qwen3 with biases)


def test_params_are_written_a_part_at_a_time(hf_dir, tmp_path, monkeypatch):
    """Each layer (and each other module) is written as soon as its tensors are read, holding nothing of
    the other parts; the folder loads as the same params as one written whole."""
    from jaxvlm import checkpoint
    written: list[tuple[str, set]] = []
    save = checkpoint.save_params

    def recording(directory, params, part=None):
        names = {checkpoint.param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        written.append((part, names))
        save(directory, params, part)

    monkeypatch.setattr(checkpoint, "save_params", recording)
    model = jaxvlm.load(convert(hf_dir, str(tmp_path / "parts"), progress=False))
    assert sorted(part for part, _ in written) == ["decoder.embedder", "decoder.final_norm", "decoder.layer_0",
                                                    "decoder.layer_1"]
    assert all(checkpoint.part_of(name) == part for part, names in written for name in names)
    assert sorted(os.listdir(tmp_path / "parts" / "params")) == sorted(part for part, _ in written)
    monkeypatch.setattr(checkpoint, "save_params", save)
    whole = jaxvlm.load(checkpoint.save_model(str(tmp_path / "whole"), model.config, model.params))
    jax.tree.map(np.testing.assert_array_equal, whole.params, model.params)
    stacked = jaxvlm.load(str(tmp_path / "parts"), scan_layers=True)
    np.testing.assert_array_equal(stacked.params["decoder"]["layers"]["mlp"]["up"]["kernel"][1],
                                  model.params["decoder"]["layer_1"]["mlp"]["up"]["kernel"])


@pytest.mark.parametrize("flag, value, message", [
    ("--top-p", "2", "top_p must be in (0, 1], got 2.0"),
    ("--top-k", "0", "top_k must be an int >= 1, got 0"),
    ("--temperature", "-1", "temperature must be >= 0 (0 means greedy), got -1.0"),
    ("--max-new-tokens", "0", "max_new_tokens must be an int >= 1, got 0"),
])
def test_generate_command_reports_bad_arguments(hf_dir, tmp_path, flag, value, message):
    out = convert(hf_dir, str(tmp_path / "jax"), progress=False)
    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", out, "--prompt", "hi",
                             flag, value], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_legacy_bin_format(hf_dir, tmp_path):
    """A pytorch_model.bin from torch < 1.6 (not zip-based, so not memory-mappable) converts the same."""
    import shutil
    import torch
    src = tmp_path / "legacy"
    src.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), src)
    tensors = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(hf_dir, "model.safetensors")).items()}
    torch.save(tensors, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap can only be used"):  # the case the reader falls back on
        torch.load(src / "pytorch_model.bin", weights_only=True, mmap=True)
    legacy = jaxvlm.load(convert(str(src), str(tmp_path / "a"), progress=False))
    modern = jaxvlm.load(convert(hf_dir, str(tmp_path / "b"), progress=False))
    assert jax.tree.all(jax.tree.map(np.array_equal, legacy.params, modern.params))


# --- vision-language checkpoints: the key layouts found in the wild ------------------------------------
def rename_keys(hf_dir, out, rename):
    """A copy of a checkpoint folder with its tensor names rewritten by `rename(name)`."""
    import shutil
    shutil.copytree(hf_dir, out)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    return str(out)


def real_checkpoint_names(name):
    """transformers 5 writes `vision_tower.*`; checkpoints on the hub nest it as `vision_tower.vision_model.*`."""
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)


def in_memory_names(name):
    """transformers 5's `state_dict()` names: everything under `model.`, the head as `lm_head`."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name[len("language_model.lm_head."):]
    return "model." + name


@pytest.mark.parametrize("name", ["paligemma", "llava_phi3"])
def test_vlm_key_layouts_convert_alike(tmp_path, name):
    model = hf_models.build_vlm(name, seed=12)
    hf_dir = hf_models.save(model, str(tmp_path / "hf"))
    names = list(load_file(os.path.join(hf_dir, "model.safetensors")))
    assert any(n.startswith("vision_tower.encoder.") for n in names)
    assert ("language_model.lm_head.weight" in names) == (name == "llava_phi3")  # PaliGemma's head is tied
    reference = jaxvlm.load(convert(hf_dir, str(tmp_path / "ref"), progress=False)).params
    variants = {"real": real_checkpoint_names, "in_memory": in_memory_names}
    if name == "paligemma":  # a file that carries the tied head anyway
        variants["tied_head_in_file"] = in_memory_names
    for variant, rename in variants.items():
        src = rename_keys(hf_dir, tmp_path / f"hf_{variant}", rename)
        if variant == "tied_head_in_file":
            tensors = load_file(os.path.join(src, "model.safetensors"))
            tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
            save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
        params = jaxvlm.load(convert(src, str(tmp_path / variant), progress=False)).params
        assert jax.tree.structure(params) == jax.tree.structure(reference), variant
        assert jax.tree.all(jax.tree.map(np.array_equal, params, reference)), variant


def test_vlm_missing_vision_tensor_is_named(tmp_path):
    hf_dir = hf_models.save(hf_models.build_vlm("paligemma", seed=12), str(tmp_path / "hf"))
    src = rename_keys(hf_dir, tmp_path / "real", real_checkpoint_names)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias'"):
        convert(src, str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("name", ["qwen3", "paligemma", "llava_phi3"])
def test_a_hugging_face_folder_loads_directly(tmp_path, name, hf_checkpoint):
    """`jaxvlm.load(hf_dir)` converts in memory: the same params as `convert` then `load`, in each layout
    and as int8; `jaxvlm generate --checkpoint hf_dir` answers as the converted folder does."""
    hf_dir = hf_checkpoint(name, seed=2, vision_language=name != "qwen3")
    converted = convert(hf_dir, str(tmp_path / "jax"), progress=False)
    variants = [{}, {"quantize": "int8", "group_size": 8}]
    if name == "qwen3":
        variants += [{"scan_layers": True}, {"dtype": "bfloat16"}]
    for kwargs in variants:
        direct, reference = jaxvlm.load(hf_dir, **kwargs), jaxvlm.load(converted, **kwargs)
        assert direct.config == reference.config and direct.dtype == reference.dtype
        assert jax.tree.structure(direct.params) == jax.tree.structure(reference.params), kwargs
        assert jax.tree.all(jax.tree.map(np.array_equal, direct.params, reference.params)), kwargs
    if name == "qwen3":  # the tiny VLM checkpoints carry no tokenizer; the text one gets one here
        import shutil
        from tests.conftest import _qwen_tokenizer
        hf_dir = shutil.copytree(hf_dir, str(tmp_path / "with-tokenizer"))
        _qwen_tokenizer(hf_dir)
        run = lambda folder: subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", folder,
                                             "--prompt", "hello jax", "--max-new-tokens", "6"],
                                            capture_output=True, text=True)
        direct = run(hf_dir)
        assert direct.returncode == 0, direct.stderr
        assert direct.stdout == jaxvlm.load(hf_dir).generate("hello jax", max_new_tokens=6) + "\n"
