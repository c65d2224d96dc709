"""Compiling for TPU slices on this CPU (`jaxvlm.aot`, `jaxvlm compile-report`): libtpu describes the slice,
nothing runs; the memory figures are the TPU compiler's."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest

from jaxvlm import aot
from jaxvlm.config import DecoderConfig, ModelConfig

pytest.importorskip("libtpu", reason="compiling for TPU needs the tpu-compile extra (libtpu)")

# weights dominate its decode's arguments (2.4M params; the cache of one row of 128 slots is small)
TINY = ModelConfig(decoder=DecoderConfig(vocab_size=1024, width=256, depth=2, num_heads=4, num_kv_heads=1,
                                         head_dim=64, mlp_dim=1024, max_position_embeddings=1 << 20))
KEYS = {"arguments_bytes", "outputs_bytes", "temporaries_bytes", "code_bytes", "total_bytes", "fits",
        "compile_seconds", "flops", "bytes_accessed", "largest_temporary_bytes", "largest_temporary"}


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_a_tiny_model_fits_a_slice(topology):
    report = aot.report(TINY, topology, batch=8, cache=256, prompt=16)
    assert report["topology"] == topology and report["devices"] == 4 and report["hbm_bytes"] > 8 << 30
    assert set(report["programs"]) == set(aot.PROGRAMS)
    for name, program in report["programs"].items():
        assert KEYS <= set(program), name
        assert program["fits"] and 0 < program["total_bytes"] < report["hbm_bytes"], name
        assert program["flops"] > 0 and program["bytes_accessed"] > 0, name
    if topology == "v5e:2x2":  # batch 8 in bfloat16 for the test below (its programs compiled once)
        assert_no_weight_sized_temporary(report)


def test_int8_weights_are_held_as_int8():
    """A decode step's arguments (weights, and a small cache) with int8 weights: at most 0.3x float32's."""
    full, int8 = (aot.report(TINY, "v5e:2x2", batch=1, cache=128, prompt=16, dtype="float32", quantize=q,
                             programs=("decode",), find_largest=False) for q in (None, "int8"))
    ratio = int8["programs"]["decode"]["arguments_bytes"] / full["programs"]["decode"]["arguments_bytes"]
    assert ratio <= 0.3, ratio


def test_greedy_programs_leave_the_sampling_out():
    """`greedy=True` compiles the decode step a batch of greedy rows runs: the argmax alone, fewer flops and
    fewer bytes read than the step with the sampling filters and the draw."""
    sampled, greedy = (aot.report(TINY, "v5e:2x2", batch=8, cache=256, prompt=16, programs=("decode",),
                                  find_largest=False, greedy=g)["programs"]["decode"] for g in (False, True))
    assert greedy["flops"] < sampled["flops"] and greedy["bytes_accessed"] < sampled["bytes_accessed"], (greedy,
                                                                                                        sampled)


@pytest.mark.parametrize("batch, quantize", [(1, None), (1, "int8"), (8, "int8")])  # (8, None): above
def test_the_decode_step_holds_no_weight_sized_temporary(batch, quantize):
    assert_no_weight_sized_temporary(aot.report(TINY, "v5e:2x2", batch=batch, cache=256, prompt=16,
                                                quantize=quantize, programs=("decode", "minimal_decode")))


def assert_no_weight_sized_temporary(report):
    """No temporary of the decode step (the compiler's buffer assignment) above 5% of a device's weights:
    no copy of a weight (a dequantized or relaid one), int8 weights read as int8."""
    decode, minimal = report["programs"]["decode"], report["programs"]["minimal_decode"]
    weights = decode["arguments_bytes"] - minimal["outputs_bytes"]  # less the cache (and the token)
    assert decode["largest_temporary_bytes"] <= 0.05 * weights, (decode["largest_temporary"], weights)


def test_a_configuration_far_beyond_the_slice_is_reported_as_not_fitting():
    """Caches of 4096 rows of 65536 slots (training has none: it is left out)."""
    report = aot.report(TINY, "v5e:2x2", batch=4096, cache=65536, prompt=16,
                        programs=tuple(p for p in aot.PROGRAMS if p != "train_step"))
    for name, program in report["programs"].items():
        assert program["fits"] is False and "memory" in program["error"].lower(), (name, program)


def test_the_command_prints_a_table(tmp_path):
    """A checkpoint folder's config alone (no weights there) compiled from the command line, started as from
    a shell where no TPU_* variable is set: libtpu leaves no log files behind (in /tmp/tpu_logs, its
    default, a process's end with its id)."""
    TINY.save(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    started = time.time() - 1
    process = subprocess.Popen([sys.executable, "-m", "jaxvlm.cli", "compile-report", str(tmp_path), "--batch", "2",
                                "--cache", "64", "--prompt", "16", "--mesh", "data=2,model=2",
                                "--programs", "prefill,decode"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    # (written since it started: an older process of the same id may have left some)
    logs = [p for p in glob.glob(f"/tmp/tpu_logs/*.{process.pid}") if os.path.getmtime(p) >= started]
    assert not logs, logs
    lines = stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path} on v5e:2x2 (4 devices")
    assert [line.split()[0] for line in lines[2:4]] == ["prefill", "decode"]  # (--programs prefill,decode)
    assert all(" yes " in line for line in lines[2:4]), stdout


def test_the_largest_batch_is_found_in_few_compilations(monkeypatch):
    """The search doubles, then halves the gap (the compiler's answer stood in for by a limit of 37 rows)."""
    asked = []

    def fits_up_to_37(model, topology, batch, **settings):
        asked.append(batch)
        return {"programs": {"prefill": {"fits": batch <= 37}, "decode": {"fits": True}}}
    monkeypatch.setattr(aot, "report", fits_up_to_37)
    assert aot.largest_batch(TINY, "v5e:2x2", cache=64) == 37 and len(asked) <= 12
    assert aot.largest_batch(TINY, "v5e:2x2", most=16) == 16


def test_a_vision_language_model_prefills_its_images():
    import jaxvlm
    builtin = jaxvlm.load().config
    with_images = aot.report(builtin, "v5e:2x2", batch=2, cache=320, prompt=272, dtype="float32",
                             programs=("prefill",))
    prefill = with_images["programs"]["prefill"]
    assert prefill["fits"] and prefill["arguments_bytes"] > 2 * 3 * builtin.vision.image_size ** 2 * 4 / 2


def test_images_of_any_size_prefill_as_patches():
    """A tiny Qwen2.5-VL: its prefill with an image of 1024 patches a row, every device holding them all."""
    import dataclasses
    from jaxvlm import presets
    real = presets.get("qwen2.5-vl-3b-instruct")
    tiny = dataclasses.replace(real, decoder=dataclasses.replace(real.decoder, vocab_size=512, width=128, depth=2,
                                                                 num_heads=2, num_kv_heads=1, mlp_dim=256),
                               vision=dataclasses.replace(real.vision, width=64, depth=2, num_heads=2, mlp_dim=64,
                                                          full_attention_layers=(1,)))
    report = aot.report(tiny, "v5e:2x2", batch=2, cache=512, prompt=320, dtype="float32", programs=("prefill",))
    prefill = report["programs"]["prefill"]
    assert prefill["fits"] and prefill["arguments_bytes"] > 2 * aot.ANY_SIZE_IMAGE_PATCHES * tiny.vision.patch_dim * 4


# --- bad input: one line naming it -------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(topology="v9z:2x2"), "topology 'v9z:2x2': unknown; give a chip and its layout, one of v4, v5e"),
    (dict(topology="v5e"), "topology 'v5e': unknown"),
    (dict(topology="v5e:3x7"), "topology 'v5e:3x7': libtpu cannot lay it out"),
    (dict(mesh="data=2,model=4"), "mesh {'data': 2, 'model': 4} holds 8 devices; the topology has 4"),
    (dict(mesh="rows=4"), "--mesh 'rows=4': give each axis once as name=size"),
    (dict(batch=0), "batch must be an int >= 1, got 0"),
    (dict(cache="4k"), "cache must be an int, got '4k'"),
    (dict(prompt=512, cache=256), "prompt=512 is longer than cache=256"),
    (dict(dtype="float16"), "dtype must be one of bfloat16, float32"),
    (dict(programs=("prefill", "sample")), "programs: unknown 'sample' (known: prefill, decode, minimal_decode"),
])
def test_bad_settings_are_named(kwargs, message):
    settings = dict(topology="v5e:2x2", batch=1, cache=64, prompt=16) | kwargs
    with pytest.raises(ValueError) as e:
        aot.report(TINY, **settings)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_hugging_face_folder_is_read_by_its_config_alone(tmp_path):
    """transformers' config.json and nothing else (no weights, no tokenizer): the checkpoint reader's config."""
    transformers = pytest.importorskip("transformers")
    transformers.Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64).save_pretrained(tmp_path)
    report = aot.report(tmp_path, "v6e:2x2", batch=2, cache=128, prompt=16, programs=("decode",))
    assert report["programs"]["decode"]["fits"]
    assert aot.model_config(tmp_path).decoder.num_kv_heads == 2


def test_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'gemma-99b'"):
        aot.report("gemma-99b")


def test_libtpu_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu now raises ImportError
    with pytest.raises(ValueError, match=r"compiling for TPU needs libtpu: pip install 'libtpu==0\.0\.42\.\*'"):
        aot.report(TINY)


def test_an_8k_prompt_prefills_without_holding_its_scores():
    """TPU's splash attention kernel serves the prompt: no [B, N, T, S] float32 scores (2 GiB a device
    here, where the einsum path holds them)."""
    report = aot.report(TINY, "v5e:2x2", batch=8, cache=8192, prompt=8192, programs=("prefill",))
    prefill = report["programs"]["prefill"]
    assert prefill["fits"], prefill
    scores = 8 * TINY.decoder.num_heads * 8192 * 8192 * 4 // 4
    assert prefill["largest_temporary_bytes"] < scores / 16, prefill["largest_temporary"]  # [B, T, D] activations
