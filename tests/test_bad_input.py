"""Every bad file, argument and fault a user can meet gets one line naming it, reads nothing outside the
checkpoint folder, and leaves nothing half-written. One section per kind; each case is one expectation."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import PIL.Image
import pytest
from safetensors.numpy import load_file, save_file

import jaxvlm
from convert import convert
from jaxvlm import checkpoint, files, images, memory
from jaxvlm.config import DecoderConfig, ModelConfig, TokensConfig
from jaxvlm.data import RowBatches, RowError, encode_row
from jaxvlm.model import Model
from jaxvlm.train import TrainConfig, Trainer
from tests import tiny_training as tiny


@pytest.fixture(scope="module")
def hf_dir(hf_checkpoint):
    return hf_checkpoint("qwen3", seed=3)


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    return convert(hf_dir, str(tmp_path_factory.mktemp("converted") / "jax"), progress=False)


@pytest.fixture(scope="module")
def model(converted):
    return jaxvlm.load(converted)


def copy(src, tmp_path, name="copy") -> str:
    return shutil.copytree(src, str(tmp_path / name), symlinks=True)


def edit_json(folder, name, edit) -> None:
    path = os.path.join(folder, name)
    data = json.load(open(path)) if os.path.exists(path) else {}
    data = edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def fails(src, tmp_path, match) -> None:
    """Converting `src` fails with one line matching `match` and writes nothing; loading the Hugging Face
    folder directly (converted in memory) fails with the same line."""
    with pytest.raises(ValueError, match=match) as err:
        convert(src, str(tmp_path / "out"), progress=False)
    assert "\n" not in str(err.value)
    assert not [p for p in os.listdir(tmp_path) if p == "out" or p.startswith(".out.")], "something was written"
    with pytest.raises(ValueError) as loading:
        jaxvlm.load(src)
    assert str(loading.value) == str(err.value)


def fails_to_load(folder, match, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as err:
        jaxvlm.load(folder, **kwargs)
    assert "\n" not in str(err.value)


def refresh_checksums(folder) -> None:
    """Rewrites checksums.json after a deliberate edit, so the check under test is the one after it."""
    os.remove(os.path.join(folder, files.CHECKSUMS_FILE))
    files.write_checksums(folder)


def sharded(hf_dir, tmp_path) -> str:
    """A copy of the checkpoint in two safetensors shards with their index."""
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), out)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(out)


def with_tensors(hf_dir, tmp_path, edit) -> str:
    out = copy(hf_dir, tmp_path, "edited")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


Q = "model.layers.0.self_attn.q_proj.weight"


# --- 1. nothing outside the checkpoint folder is read or copied ----------------------------------------
@pytest.mark.parametrize("entry, message", [
    ("../x.safetensors", r"weight_map\['%s'\]: '\.\./x\.safetensors' lies outside the checkpoint folder" % Q),
    ("/etc/hostname", r"weight_map\['%s'\]: '/etc/hostname' lies outside the checkpoint folder" % Q),
    ("sub/../../x.safetensors", r"'sub/\.\./\.\./x\.safetensors' lies outside the checkpoint folder"),
    ("link.safetensors", r"link\.safetensors resolves to .*outside\.safetensors, outside the checkpoint folder"),
])
def test_index_entry_outside_the_folder_is_refused(hf_dir, tmp_path, entry, message):
    src = sharded(hf_dir, tmp_path)
    shutil.copy(os.path.join(src, "model-00001-of-00002.safetensors"), tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", os.path.join(src, "link.safetensors"))
    edit_json(src, "model.safetensors.index.json", lambda d: {**d, "weight_map": {**d["weight_map"], Q: entry}})
    fails(src, tmp_path, message)


@pytest.mark.parametrize("name", ["special_tokens_map.json", "tokenizer_config.json", "config.json",
                                  "generation_config.json", "model.safetensors"])
def test_file_linked_outside_the_folder_is_refused(hf_dir, tmp_path, name):
    src = copy(hf_dir, tmp_path)
    outside = tmp_path / f"outside-{name}"
    shutil.copy(os.path.join(src, name), outside) if os.path.exists(os.path.join(src, name)) \
        else outside.write_text("{}")
    os.path.exists(os.path.join(src, name)) and os.remove(os.path.join(src, name))
    os.symlink(outside, os.path.join(src, name))
    fails(src, tmp_path, f"{name} resolves to {outside}, outside the checkpoint folder")


def test_hub_cache_snapshot_links_into_its_blobs_convert(hf_dir, tmp_path):
    """The hub cache's layout: snapshots/<revision>/<file> are links into ../../blobs/."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(os.listdir(hf_dir)):
        shutil.copy(os.path.join(hf_dir, name), repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    reference = jaxvlm.load(convert(hf_dir, str(tmp_path / "a"), progress=False))
    linked = jaxvlm.load(convert(str(snapshot), str(tmp_path / "b"), progress=False))
    assert jax.tree.all(jax.tree.map(np.array_equal, linked.params, reference.params))
    assert not any(os.path.islink(os.path.join(tmp_path / "b", n)) for n in os.listdir(tmp_path / "b"))


# A converted folder's params are written a layer (or module) at a time: this is one layer's metadata.
METADATA = "params/decoder.layer_0/_METADATA"


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", METADATA])
def test_converted_folder_file_linked_outside_is_refused_at_load(converted, tmp_path, name):
    folder = copy(converted, tmp_path)
    path = os.path.join(folder, name)
    if not os.path.exists(path):  # the tiny checkpoint has no tokenizer: plant one
        shutil.copy(os.path.join(jaxvlm.model.BUILTIN_MODEL, "tokenizer.model"), tmp_path / "tokenizer.json")
    else:
        shutil.move(path, tmp_path / "outside")
    os.symlink(tmp_path / ("tokenizer.json" if name == "tokenizer.json" else "outside"), path)
    fails_to_load(folder, "resolves to .*, outside the checkpoint folder", verify=False)


# --- 2. wrong-typed JSON: one line naming the file and the field ---------------------------------------
LLAMA3 = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("name, edit, message", [
    ("config.json", lambda d: [d], r"config\.json: expected a JSON object at the top level, got a JSON array"),
    ("config.json", lambda d: "qwen3", r"config\.json: expected a JSON object at the top level, got a JSON string"),
    ("config.json", lambda d: {**d, "hidden_size": "64"}, r"config\.json: field 'hidden_size' must be an integer "
                                                          r"in \[0, 131,072\], got '64'"),
    ("config.json", lambda d: {**d, "rms_norm_eps": "1e-6"}, "field 'rms_norm_eps' must be a finite number"),
    ("config.json", lambda d: {**d, "num_hidden_layers": 2.5}, "field 'num_hidden_layers' must be an integer"),
    ("config.json", lambda d: {k: v for k, v in d.items() if k != "vocab_size"},
     r"field 'vocab_size' must be an integer in \[0, 4,194,304\], it is missing"),
    ("config.json", lambda d: {**d, "tie_word_embeddings": "true"}, "field 'tie_word_embeddings' must be true or false"),
    ("config.json", lambda d: {**d, "bos_token_id": [2, 3]}, r"field 'bos_token_id' must be a token id"),
    ("config.json", lambda d: {**d, "eos_token_id": "1"}, r"field 'eos_token_id' must be a token id or a list"),
    ("config.json", lambda d: {**d, "eos_token_id": [1, "2"]}, r"field 'eos_token_id' must be a token id or a list"),
    ("config.json", lambda d: {**d, "rope_parameters": [1]}, r"field 'rope_parameters' must be an object"),
    ("config.json", lambda d: {**d, "rope_parameters": {"rope_theta": "1e6"}},
     r"field 'rope_parameters\.rope_theta' must be a finite number"),
    ("config.json", lambda d: {**d, "rope_parameters": {**LLAMA3, "high_freq_factor": None}},  # Llama 3's scaling
     r"field 'rope_parameters\.high_freq_factor' must be a finite number, it is missing"),
    ("config.json", lambda d: {**d, "rope_parameters": {**LLAMA3, "high_freq_factor": 1.0}},
     r"config\.json: FrequencySmoothing\.high_freq_factor: must be above low_freq_factor > 0, got 1\.0 and 1\.0"),
    ("config.json", lambda d: {**d, "layer_types": "full_attention", "use_sliding_window": True, "sliding_window": 4},
     "field 'layer_types' must be a list of strings"),
    ("config.json", lambda d: {**d, "num_key_value_heads": 3}, r"config\.json: DecoderConfig\.num_kv_heads: 3 does not"),
    ("generation_config.json", lambda d: [], r"generation_config\.json: expected a JSON object"),
    ("generation_config.json", lambda d: {**d, "eos_token_id": ["1"]}, r"generation_config\.json: field 'eos_token_id'"),
    ("generation_config.json", lambda d: {**d, "pad_token_id": -1}, r"generation_config\.json: field 'pad_token_id' must"),
    ("tokenizer_config.json", lambda d: "x", r"tokenizer_config\.json: expected a JSON object"),
    ("tokenizer_config.json", lambda d: {**d, "add_bos_token": "yes"},
     r"tokenizer_config\.json: field 'add_bos_token' must be true or false"),
])
def test_wrong_typed_json_is_named(hf_dir, tmp_path, name, edit, message):
    src = copy(hf_dir, tmp_path)
    edit_json(src, name, edit)
    fails(src, tmp_path, message)


def test_invalid_json_and_non_utf8_are_named(hf_dir, tmp_path):
    src = copy(hf_dir, tmp_path)
    open(os.path.join(src, "config.json"), "wb").write(b'{"model_type": "qwen3", \xff}')
    fails(src, tmp_path, r"config\.json: not valid JSON")


@pytest.mark.parametrize("weight_map, message", [
    ([], "field 'weight_map' must be an object of tensor names to files"),
    ({Q: 3}, r"weight_map\['%s'\] must be a file name, got 3" % Q),
])
def test_malformed_index_is_named(hf_dir, tmp_path, weight_map, message):
    src = sharded(hf_dir, tmp_path)
    edit_json(src, "model.safetensors.index.json", lambda d: {**d, "weight_map": weight_map})
    fails(src, tmp_path, message)


@pytest.fixture(scope="module")
def llava_dir(hf_checkpoint):
    return hf_checkpoint("llava_phi3", seed=4, vision_language=True)


@pytest.mark.parametrize("name, edit, message", [
    ("config.json", lambda d: {**d, "text_config": {**d["text_config"], "hidden_size": "64"}},
     "field 'text_config.hidden_size' must be an integer"),
    ("config.json", lambda d: {**d, "vision_config": {**d["vision_config"], "patch_size": None, "image_size": "32"}},
     "field 'vision_config.image_size' must be an integer"),
    ("config.json", lambda d: {**d, "vision_config": [1]}, "field 'vision_config' must be an object"),
    ("config.json", lambda d: {**d, "image_token_index": "255"}, "field 'image_token_index' must be a token id"),
    ("preprocessor_config.json", lambda d: {**d, "image_mean": "0.5"}, "field 'image_mean' must be a list of numbers"),
    ("preprocessor_config.json", lambda d: {**d, "image_std": [0.5, 0.5]}, "field 'image_std' must be three numbers"),
    ("preprocessor_config.json", lambda d: {**d, "crop_size": {"height": "32", "width": 32}},
     r"field 'crop_size\.height' must be an integer"),
    ("preprocessor_config.json", lambda d: {**d, "do_center_crop": 1}, "field 'do_center_crop' must be true or false"),
    ("processor_config.json", lambda d: {"image_processor": []}, "field 'image_processor' must be an object"),
])
def test_wrong_typed_vlm_json_is_named(llava_dir, tmp_path, name, edit, message):
    src = copy(llava_dir, tmp_path)
    if name == "processor_config.json":
        os.path.exists(os.path.join(src, "preprocessor_config.json")) and \
            os.remove(os.path.join(src, "preprocessor_config.json"))
    elif name == "preprocessor_config.json":
        edit_json(src, name, lambda d: {"do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                                        "size": {"shortest_edge": 32}, **d})
    edit_json(src, name, edit)
    fails(src, tmp_path, f"{name}: {message}")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["decoder"].update(width="64"), "decoder.width: expected an integer, got '64'"),
    (lambda d: d["decoder"]["rope"].update(theta=None), "decoder.rope.theta: expected a finite number, got None"),
    (lambda d: d["tokens"].update(eos_ids=1), "tokens.eos_ids: expected a list, got 1"),
    (lambda d: d["tokens"].update(add_bos="no"), "tokens.add_bos: expected a boolean"),
    (lambda d: d.update(decoder=[]), "decoder: expected an object, got []"),
    (lambda d: d["decoder"].pop("depth"), "missing field 'decoder.depth'"),
])
def test_wrong_typed_jaxvlm_config_is_named(converted, tmp_path, edit, message):
    folder = copy(converted, tmp_path)

    def change(d):
        edit(d)
        return d
    edit_json(folder, "config.json", change)
    fails_to_load(folder, re.escape(f"config.json: invalid jaxvlm config: {message}"), verify=False)


# --- 3. no silent casts or guesses ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.bool_, np.uint8])
def test_non_float_tensors_are_refused(hf_dir, tmp_path, dtype):
    src = with_tensors(hf_dir, tmp_path, lambda t: t.update({Q: t[Q].astype(dtype)}))
    fails(src, tmp_path, f"tensor '{Q}' is stored as {np.dtype(dtype).name}; weights must be floats")


def test_float16_converts_as_float(hf_dir, tmp_path):
    src = with_tensors(hf_dir, tmp_path, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    params = jaxvlm.load(convert(src, str(tmp_path / "f16"), progress=False)).params
    q = params["decoder"]["layer_0"]["attn"]["q"]["kernel"]
    assert q.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q).reshape(64, -1).T,
                                  load_file(os.path.join(src, "model.safetensors"))[Q].astype(np.float32))


@pytest.mark.parametrize("all_bf16, want", [(True, "bfloat16"), (False, "float32")])
def test_mixed_dtypes_choose_float32_unless_every_tensor_is_bfloat16(hf_dir, tmp_path, all_bf16, want):
    import torch
    from safetensors.torch import load_file as torch_load, save_file as torch_save
    src = copy(hf_dir, tmp_path)
    tensors = torch_load(os.path.join(src, "model.safetensors"))
    names = sorted(tensors) if all_bf16 else sorted(tensors)[1:]  # the first stays float32
    tensors.update({k: tensors[k].to(torch.bfloat16) for k in names})
    torch_save(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    assert jaxvlm.load(convert(src, str(tmp_path / "out"), progress=False)).dtype == np.dtype(want)


@pytest.mark.parametrize("state, message", [
    (lambda s: {"state_dict": s}, "entry 'state_dict' is a nested mapping, not a tensor"),
    (lambda s: list(s.values()), "expected a mapping of tensor names to tensors, got a list"),
    (lambda s: {**s, "step": 3}, "entry 'step' is of type int, not a tensor"),
    (lambda s: {**s, "note": "hello"}, "entry 'note' is of type str, not a tensor"),
    (lambda s: {**s, Q: s[Q].to_sparse()}, f"tensor '{Q}' is not a dense tensor"),
])
def test_bin_that_is_not_a_flat_mapping_of_dense_tensors_is_named(hf_dir, tmp_path, state, message):
    import torch
    src = copy(hf_dir, tmp_path)
    tensors = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    os.remove(os.path.join(src, "model.safetensors"))
    torch.save(state(tensors), os.path.join(src, "pytorch_model.bin"))
    fails(src, tmp_path, f"pytorch_model.bin: {message}")


def test_tensor_in_two_shards_is_taken_from_the_one_the_index_names(hf_dir, tmp_path):
    src = sharded(hf_dir, tmp_path)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    named = index[Q]
    other = next(f for f in set(index.values()) if f != named)
    tensors = load_file(os.path.join(src, other))
    tensors[Q] = np.zeros_like(load_file(os.path.join(src, named))[Q])  # a stale copy in the other shard
    save_file(tensors, os.path.join(src, other), metadata={"format": "pt"})
    params = jaxvlm.load(convert(src, str(tmp_path / "out"), progress=False)).params
    q = np.asarray(params["decoder"]["layer_0"]["attn"]["q"]["kernel"]).reshape(64, -1).T
    np.testing.assert_array_equal(q, load_file(os.path.join(src, named))[Q])


def test_tensor_the_index_does_not_list_is_refused(hf_dir, tmp_path):
    src = sharded(hf_dir, tmp_path)
    edit_json(src, "model.safetensors.index.json",
              lambda d: {**d, "weight_map": {k: v for k, v in d["weight_map"].items() if k != Q}})
    fails(src, tmp_path, f"tensor '{Q}' is not listed in .*model.safetensors.index.json")


def test_tensor_missing_from_the_shard_the_index_names_is_refused(hf_dir, tmp_path):
    src = sharded(hf_dir, tmp_path)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    other = next(f for f in set(index.values()) if f != index[Q])
    edit_json(src, "model.safetensors.index.json", lambda d: {**d, "weight_map": {**d["weight_map"], Q: other}})
    fails(src, tmp_path, f"tensor '{Q}' is listed in '{other}', which does not hold it")


def test_non_finite_weights_are_refused(hf_dir, tmp_path):
    src = with_tensors(hf_dir, tmp_path, lambda t: t[Q].__setitem__((0, 0), np.nan))
    fails(src, tmp_path, f"tensor '{Q}' holds NaN or infinite values")


# --- 4. damaged converted folders and training workdirs ------------------------------------------------
def test_converted_folder_carries_checksums_of_every_file(converted):
    listed = json.load(open(os.path.join(converted, files.CHECKSUMS_FILE)))
    on_disk = {os.path.relpath(os.path.join(p, n), converted) for p, _, ns in os.walk(converted) for n in ns}
    assert set(listed) == on_disk - {files.CHECKSUMS_FILE} and METADATA in listed


@pytest.mark.parametrize("damage, message", [
    (lambda f: os.remove(f"{f}/{METADATA}"), r"params/decoder\.layer_0/_METADATA: missing \(listed in checksums\.json\)"),
    (lambda f: open(f"{f}/{METADATA}", "r+b").truncate(10), r"params/decoder\.layer_0/_METADATA: 10 bytes, checksums\.json says"),
    (lambda f: flip_a_byte(f"{f}/{METADATA}"), r"params/decoder\.layer_0/_METADATA: its SHA-256 differs from checksums\.json"),
    (lambda f: flip_a_byte(f"{f}/config.json"), r"config\.json: its SHA-256 differs"),
    (lambda f: [os.remove(p) for p in data_files(f)], r"params/.*: missing \(listed in checksums\.json\)"),
    (lambda f: open(f"{f}/checksums.json", "w").write("[]"), r"checksums\.json: expected an object of file checksums"),
])
def test_damaged_converted_folder_is_named(converted, tmp_path, damage, message):
    folder = copy(converted, tmp_path)
    damage(folder)
    fails_to_load(folder, message)


def flip_a_byte(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def data_files(folder):
    return [os.path.join(p, n) for p, _, ns in os.walk(os.path.join(folder, "params")) for n in ns]


@pytest.mark.parametrize("damage, message", [
    (lambda f: os.remove(f"{f}/{METADATA}"), r"params/decoder\.layer_0: not a readable params checkpoint \(its "
                                             r"metadata is missing or damaged\)"),
    (lambda f: [os.remove(p) for p in data_files(f)], r"params: the params folder is empty"),
    (lambda f: shutil.rmtree(f"{f}/params"), r"params: no params checkpoint"),
    (lambda f: [open(p, "r+b").truncate(1) for p in data_files(f) if "/d/" in p],
     r"params/decoder\.\w+: (unreadable|not a readable) params checkpoint \(.+\)"),
])
def test_damaged_folder_without_checksums_is_still_named(converted, tmp_path, damage, message):
    """Folders written before checksums existed: the damage is named from what orbax reports."""
    folder = copy(converted, tmp_path)
    os.remove(os.path.join(folder, files.CHECKSUMS_FILE))
    damage(folder)
    fails_to_load(folder, message)


def test_damaged_folder_from_the_command_line_is_one_line(converted, tmp_path):
    folder = copy(converted, tmp_path)
    os.remove(os.path.join(folder, METADATA))
    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", folder, "--prompt", "hi"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {folder}/{METADATA}: missing (listed in "
                                                  "checksums.json); the checkpoint folder is incomplete"]


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.model", b"not a sentencepiece model", r"tokenizer\.model: not a readable SentencePiece model"),
    ("tokenizer.json", b'{"version": "1.0", "model": 3}', r"tokenizer\.json: not a readable tokenizer"),
    ("tokenizer.json", b"\x00\x01", r"tokenizer\.json: not a readable tokenizer"),
])
def test_corrupt_tokenizer_file_is_named(converted, tmp_path, name, content, message):
    folder = copy(converted, tmp_path)
    open(os.path.join(folder, name), "wb").write(content)
    refresh_checksums(folder)
    fails_to_load(folder, message)


def test_folder_without_checksums_loads_with_a_warning(converted, tmp_path, caplog):
    folder = copy(converted, tmp_path)
    os.remove(os.path.join(folder, files.CHECKSUMS_FILE))
    with caplog.at_level(logging.WARNING, "jaxvlm"):
        jaxvlm.load(folder)
    assert "has no checksums.json" in caplog.text


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def train(tok, steps, workdir, **kwargs):
    losses = []
    state = Trainer(tiny.TINY, tiny.train_config(steps, **kwargs), workdir).fit(
        tiny.init_params(), tiny.batches(tok), progress=False, on_step=lambda s, m: losses.append(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def four_steps(tok, tmp_path_factory):
    """A workdir of 4 steps checkpointed at steps 2 and 4 (copy it before damaging it)."""
    workdir = tmp_path_factory.mktemp("four_steps")
    train(tok, 4, workdir, checkpoint_every=2)
    return workdir


@pytest.mark.parametrize("damage", [
    lambda step: shutil.rmtree(os.path.join(step, "default")),
    lambda step: [open(p, "r+b").truncate(0) for p, _, ns in os.walk(step) for p in [os.path.join(p, n) for n in ns]
                  if "/d/" in p],
    lambda step: open(os.path.join(step, "default", "_METADATA"), "w").write("{garbage"),
    lambda step: flip_a_byte(next(f for p, _, ns in os.walk(step) for f in [os.path.join(p, n) for n in ns]
                                  if "/d/" in f)),
], ids=["item folder gone", "data truncated", "tree metadata garbled", "a byte flipped"])
def test_damaged_latest_training_checkpoint_falls_back_with_a_warning(tok, four_steps, tmp_path, caplog, damage):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    damage(str(tmp_path / "checkpoints" / "4"))
    with caplog.at_level(logging.WARNING, "jaxvlm.train"):
        state, losses = train(tok, 5, tmp_path, checkpoint_every=2)
    assert "checkpoints/4: damaged checkpoint" in caplog.text and "trying the one before" in caplog.text
    assert int(state.step) == 5 and len(losses) == 5  # resumed from step 2: its 2 recorded steps, 3 new


def test_stray_entries_in_a_workdir_are_passed_over(tok, tmp_path, caplog):
    train(tok, 2, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "notes").mkdir()
    (checkpoints / "README").write_text("mine")
    (checkpoints / "9").mkdir()  # an empty step folder, newer than the real one
    with caplog.at_level(logging.WARNING, "jaxvlm.train"):
        state, losses = train(tok, 3, tmp_path)
    assert int(state.step) == 3 and len(losses) == 3  # the 2 recorded steps, 1 new
    assert "checkpoints/9: damaged checkpoint" in caplog.text


def test_workdir_with_no_usable_checkpoint_is_named(tok, tmp_path):
    train(tok, 2, tmp_path, checkpoint_every=2)  # step 2 is the only checkpoint
    os.remove(tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA")
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "default")
    with pytest.raises(ValueError, match=r"checkpoints: no checkpoint there can be restored \(steps 2; see the "
                                         r"warnings\); move the folder away to start afresh"):
        train(tok, 3, tmp_path)


# --- 5. arguments checked by type and value before any work --------------------------------------------
BIG = 2**31
GENERATE_CASES = [
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
    (dict(seed=2**32), "seed must be an int <= 4294967295, got 4294967296"),
    (dict(seed=1.5), "seed must be an int, got 1.5"),
    (dict(seed="1"), "seed must be an int, got '1'"),
    (dict(temperature=math.nan), "temperature must be a finite number, got nan"),
    (dict(temperature="1"), "temperature must be a finite number, got '1'"),
    (dict(temperature=True), "temperature must be a finite number, got True"),
    (dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\), got -0.5"),
    (dict(top_k=0), "top_k must be an int >= 1, got 0"),
    (dict(top_k=BIG), "top_k must be an int <= 2147483647, got 2147483648"),
    (dict(top_k=2.0), "top_k must be an int, got 2.0"),
    (dict(top_p=math.nan), "top_p must be a finite number, got nan"),
    (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=BIG), "max_new_tokens must be an int <= 2147483647, got 2147483648"),
    (dict(max_new_tokens=4.0), "max_new_tokens must be an int, got 4.0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int, got True"),
]


@pytest.mark.parametrize("kwargs, message", GENERATE_CASES)
def test_bad_generate_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate_ids(np.arange(3, 9)[None], **kwargs)


SHAPES_PNG = os.path.join(os.path.dirname(__file__), "..", "examples", "shapes.png")


@pytest.mark.parametrize("prompt, message", [
    (3, "prompt_or_prompts must be a string or a list of strings, got int"),
    ([], "prompt_or_prompts is an empty list"),
    (["fine", None], "prompt 1: expected a string, got NoneType"),
    ("caf\udce9", r"prompt: cannot be encoded as UTF-8 \(surrogates not allowed at character 3: '\\udce9'\)"),
    (["ok", "\ud800"], "prompt 1: cannot be encoded as UTF-8"),
])
def test_bad_prompts_are_named(prompt, message):
    builtin = jaxvlm.load()
    with pytest.raises(ValueError, match=message):
        builtin.generate(prompt, image=SHAPES_PNG)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=5), "image 0: expected a path, a PIL image or a uint8 array, got int"),
    (dict(image=np.zeros((4, 4, 3), np.float32)), "image 0: an array image must be uint8"),
    (dict(image="missing.png"), "image 0: missing.png: no such file"),
    (dict(seed=-3), "seed must be an int >= 0"),
])
def test_bad_generate_inputs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxvlm.load().generate("caption en", **kwargs)


@pytest.mark.parametrize("pixels, message", [
    (np.full((1, 96, 96, 3), np.nan, np.float32), "pixel_values: image 0 holds NaN or infinite values"),
    (np.zeros((0, 96, 96, 3), np.float32), "pixel_values hold no images"),
    ([[1, 2], [3]], r"pixel_values: not an array"),
])
def test_bad_pixel_values_are_named(pixels, message):
    builtin = jaxvlm.load()
    with pytest.raises(ValueError, match=message):
        builtin.encode_image(pixels)


@pytest.mark.parametrize("ids, mask, message", [
    ([[3, 4], [5]], None, "input_ids: not an array"),
    (np.zeros((1, 0), np.int32), None, r"input_ids is empty \(shape \[1, 0\]\)"),
    (np.arange(3, 6)[None], np.array([[0.5, 1, 1]]), "attention_mask must hold booleans or 0/1 integers"),
    (np.arange(3, 6)[None], np.array([[2, 1, 1]]), "attention_mask must hold booleans or 0/1 integers"),
])
def test_bad_logits_inputs_are_named(model, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        model.logits(ids, mask)


@pytest.mark.parametrize("change, message", [
    (dict(learning_rate=math.nan), "TrainConfig.learning_rate must be a finite number, got nan"),
    (dict(learning_rate=-1e-3), r"TrainConfig.learning_rate must be in \[0, inf\], got -0.001"),
    (dict(learning_rate="1e-3"), "TrainConfig.learning_rate must be a finite number, got '1e-3'"),
    (dict(final_learning_rate=math.inf), "TrainConfig.final_learning_rate must be a finite number, got inf"),
    (dict(b1=1.0), r"TrainConfig.b1 must be in \[0, 1\), got 1.0"),
    (dict(b2=math.nan), "TrainConfig.b2 must be a finite number, got nan"),
    (dict(weight_decay=-0.1), r"TrainConfig.weight_decay must be in \[0, inf\]"),
    (dict(grad_clip_norm=0.0), r"TrainConfig.grad_clip_norm must be in \(0, inf\], got 0.0"),
    (dict(steps=0), "TrainConfig.steps must be an int >= 1, got 0"),
    (dict(steps=BIG), "TrainConfig.steps must be an int <= 2147483647"),
    (dict(steps=10.0), "TrainConfig.steps must be an int, got 10.0"),
    (dict(warmup_steps=11), "TrainConfig.warmup_steps must be an int <= 10, got 11"),
    (dict(checkpoint_every=0), "TrainConfig.checkpoint_every must be an int >= 1, got 0"),
    (dict(remat="yes"), "TrainConfig.remat must be True or False, got 'yes'"),
])
def test_bad_train_config_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 10, **change})


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=2.0), "batch_size must be an int, got 2.0"),
    (dict(seed=-1), "seed must be an int >= 0"),
    (dict(too_long="drop"), r"too_long must be one of \('skip', 'truncate'\), got 'drop'"),
])
def test_bad_batch_arguments_are_named(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RowBatches(tiny.TINY, tok, tiny.rows(4), **{"batch_size": 2, **kwargs})


def test_weights_that_are_not_finite_are_never_saved(tok, tmp_path):
    trainer = Trainer(tiny.TINY, tiny.train_config(2), tmp_path)
    state = trainer.init_state(tiny.init_params())
    state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params), step=state.step + 1)
    with pytest.raises(FloatingPointError, match="step 1: the weights are not finite; not saved"):
        trainer.save(state)
    trainer.close()
    assert not os.path.exists(tmp_path / "checkpoints" / "1")
    with pytest.raises(ValueError, match="param .* holds NaN or infinite values; not saved"):
        checkpoint.save_model(tmp_path / "model", tiny.TINY, state.params)
    assert not os.path.exists(tmp_path / "model")


def test_a_step_whose_update_is_not_finite_is_skipped(tok, caplog):
    """A learning rate so large that the weights overflow: the step is skipped, the weights stay finite."""
    with caplog.at_level(logging.WARNING, "jaxvlm.train"):
        state = Trainer(tiny.TINY, tiny.train_config(2, learning_rate=1e39, warmup_steps=0),
                        None).fit(tiny.init_params(), tiny.batches(tok), progress=False)
    assert "updated weights not finite; update skipped" in caplog.text
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(state.params))


CONTEXT_24 = dataclasses.replace(tiny.TINY, decoder=dataclasses.replace(tiny.TINY.decoder,
                                                                           max_position_embeddings=24))
LONG_ROW = {"prompt": "caption en", "answer": "a red circle left of a blue square " * 4}


def test_a_training_row_longer_than_the_context_is_skipped_by_default(tok, caplog):
    with pytest.raises(RowError, match=r"row 7: \d+ tokens, more than the 24 that fit \(too_long='truncate' would "
                                       r"cut the answer\)"):
        encode_row(CONTEXT_24, tok, {**LONG_ROW, "image": tiny.rows(1)[0]["image"]}, "row 7")
    with caplog.at_level(logging.WARNING, "jaxvlm.data"):
        batch = RowBatches(CONTEXT_24, tok, [{**LONG_ROW, "image": tiny.rows(1)[0]["image"]}] + tiny.rows(3),
                           batch_size=4)(0)
    assert "row 0: " in caplog.text and "skipped" in caplog.text and batch.valid.sum(axis=1).max() <= 24


def test_a_training_row_longer_than_the_context_is_truncated_when_asked(tok, caplog):
    row = {**LONG_ROW, "image": tiny.rows(1)[0]["image"]}
    with caplog.at_level(logging.WARNING, "jaxvlm.data"):
        example = encode_row(CONTEXT_24, tok, row, "row 7", too_long="truncate")
    assert len(example.ids) == 24 and example.prefix_length < 24
    assert "row 7: " in caplog.text and "the answer is cut to" in caplog.text
    prompt_too_long = {**row, "prompt": "count shapes " * 20}
    with pytest.raises(RowError, match=r"row 8: \d+ tokens, more than the 24 that fit \(the prompt alone has"):
        encode_row(CONTEXT_24, tok, prompt_too_long, "row 8", too_long="truncate")


# --- 6. memory and time bounded by design --------------------------------------------------------------
def huge_context_model() -> Model:
    config = ModelConfig(decoder=DecoderConfig(vocab_size=32, width=16, depth=2, num_heads=2, num_kv_heads=2,
                                               head_dim=64, mlp_dim=32, max_position_embeddings=2**31 - 1),
                         tokens=TokensConfig(eos_ids=(1,)))
    params = checkpoint.abstract_params(config)
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params)
    return Model(config, params)


def test_a_cache_larger_than_memory_is_refused_at_once():
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000: the KV cache for 1 rows of \d+ tokens needs "
                                         r"[\d,.]+ GiB, more than the [\d,.]+ GiB of memory free"):
        huge_context_model().generate_ids(np.arange(3, 9)[None], max_new_tokens=10**9)


def test_logits_larger_than_memory_are_refused(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"the logits of 2 rows of 16 tokens needs .* GiB, more than"):
        huge_context_model().logits(np.ones((2, 5), np.int32))


def test_an_image_past_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    PIL.Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 200 - 1)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: pytest.fail("the pixels were decoded"))
    with pytest.raises(ValueError, match=r"image 0: .*big.png: 300x200 pixels, more than the 59999 an image may "
                                         r"have; downscale it first"):
        jaxvlm.load().generate("caption en", image=str(tmp_path / "big.png"))


def test_a_very_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    PIL.Image.new("RGB", (1600, 1200), (200, 30, 30)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(images, "DRAFT_ABOVE", 1000 * 1000)
    image = images.load_image(str(tmp_path / "big.jpg"), resize_to=(96, 96))
    assert image.size == (400, 300)  # 1/4 scale: the largest reduction still at least 2 x 96 on each side
    assert jaxvlm.load().preprocess(str(tmp_path / "big.jpg")).shape == (1, 96, 96, 3)


# --- 7. interrupted and failed writes leave nothing behind and say one line ----------------------------
SLOW_CONVERT = """
import sys, time
from jaxvlm import checkpoint
save = checkpoint.save_params
def slow(*args, **kwargs):
    save(*args, **kwargs)
    open(sys.argv[3], "w").close()  # the params are written, the folder not yet renamed
    time.sleep(120)
checkpoint.save_params = slow
from convert.cli import main
main(sys.argv[1:3])
"""


def interrupted_convert(hf_dir, tmp_path, sig) -> subprocess.CompletedProcess:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, hf_dir, str(tmp_path / "out"), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_signal_during_convert_cleans_up_and_says_one_line(hf_dir, tmp_path, sig, name):
    result = interrupted_convert(hf_dir, tmp_path, sig)
    assert result.returncode == 130
    assert "Traceback" not in result.stderr  # above the last line: only the progress bar
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/out: interrupted by {name}; nothing was written"
    assert sorted(os.listdir(tmp_path)) == ["ready"]


def test_a_killed_convert_leaves_nothing_for_the_next_run(hf_dir, tmp_path):
    result = interrupted_convert(hf_dir, tmp_path, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]  # what SIGKILL leaves
    convert(hf_dir, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out", "ready"]


def test_a_partial_folder_of_a_live_process_is_left_alone(hf_dir, tmp_path):
    mine = tmp_path / f".out.partial-{os.getppid()}-abcd1234"
    mine.mkdir()
    convert(hf_dir, str(tmp_path / "out"), progress=False)
    assert mine.is_dir()


FILE_SIZE_LIMITED_CONVERT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from convert.cli import main
main(sys.argv[1:3])
"""


def test_a_failed_write_says_one_line_and_leaves_nothing(hf_dir, tmp_path):
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED_CONVERT, hf_dir, str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "absl" not in result.stderr  # no orbax lines
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/out: writing failed (File too large); " \
                                                     "nothing was written"
    assert os.listdir(tmp_path) == []


def test_an_unwritable_destination_is_reported_before_converting(hf_dir, tmp_path, monkeypatch):
    from convert import readers
    monkeypatch.setattr(readers.TensorReader, "get", lambda *a: pytest.fail("a tensor was read"))
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(tmp_path / "locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_mkdir(path, *args, **kwargs)
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OSError, match=r"locked/out: cannot write here \(Permission denied\)"):
        convert(hf_dir, str(tmp_path / "locked" / "out"), progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"file/out: cannot write here \(.*/file is not a folder\)"):
        convert(hf_dir, str(tmp_path / "file" / "out"), progress=False)
