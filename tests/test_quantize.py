"""int8 weights: the quantizer, `load(quantize=)`, `convert --quantize`, and their bad input."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvlm
from convert import convert
from jaxvlm import checkpoint, matvec
from jaxvlm.files import FileError
from jaxvlm.memory import tree_bytes as nbytes
from jaxvlm.quantize import dequantize, quantize
from jaxvlm.shapes import scenes


@pytest.mark.parametrize("contracted,group_size,scale_shape", [
    ((0,), None, (1, 6, 8)), ((0,), 2, (2, 6, 8)),  # [D, N, H] (a query kernel): inputs D
    ((0, 1), None, (1, 1, 8)), ((0, 1), 3, (4, 2, 8)),  # [N, H, D] (an attention output): inputs N and H
    ((1,), None, (4, 1, 1)[:2] + ()), ])
def test_quantize_round_trip(contracted, group_size, scale_shape):
    """Each value is within half a step of its group's scale; scales are per output (and group)."""
    shape = (4, 6, 8) if len(scale_shape) == 3 else (4, 6)
    w = jax.random.normal(jax.random.key(0), shape)
    q, scale = quantize(w, contracted, group_size)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == scale_shape[:len(shape)]
    error = np.abs(np.asarray(dequantize(q, scale, contracted, jnp.float32)) - np.asarray(w))
    step = np.asarray(dequantize(jnp.ones_like(q), scale, contracted, jnp.float32))
    assert (error <= step / 2 + 1e-7).all()
    assert np.abs(np.asarray(q)).max() == 127  # each scale is its group's largest |w| / 127


@pytest.mark.parametrize("contracted,group_size", [((-2,), None), ((-2,), 4), ((-1,), 8), ((-3, -2), 8)])
def test_quantizing_a_slice_of_outputs_at_a_time_is_the_same(contracted, group_size):
    """The converter quantizes large weights a slice of outputs at a time (bounded float32 temporaries)."""
    shape = (12, 64, 5) if len(contracted) == 2 else (64, 40)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    whole = checkpoint.quantize_one(w, contracted, group_size, "w")
    sliced = checkpoint.quantize_host(w, contracted, group_size, "w", chunk_bytes=1000)
    for a, b in zip(whole, sliced):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_zero_weight_gets_a_unit_scale():
    q, scale = quantize(jnp.zeros((8, 4)), (0,), None)
    assert (np.asarray(scale) == 1).all() and (np.asarray(q) == 0).all()


@pytest.fixture(scope="module")
def held_out():
    return scenes.examples(7, 12)


@functools.cache
def builtin_float():
    return jaxvlm.load()


def float_answers(rows):
    return _answers(builtin_float(), rows)


def _answers(model, rows):
    out = model.generate([r["prompt"] for r in rows], image=[r["image"] for r in rows], max_new_tokens=12)
    return [o.strip() for o in out]


@pytest.mark.parametrize("group_size", [None, 32])
def test_the_builtin_model_in_int8(held_out, group_size):
    """int8 weights in at most 0.30 of the float32 bytes (per channel; a float32 scale per group of 32
    adds an eighth of the int8 bytes) answer the held-out scenes as the float32 model does, through the
    fused kernel and through XLA's path alike."""
    full = builtin_float()
    model = jaxvlm.load(quantize="int8", group_size=group_size)
    assert model.config.quantization.group_size == group_size
    assert nbytes(model.params) <= (0.30 if group_size is None else 0.25 + 4 / group_size) * nbytes(full.params)
    kernel = model.params["decoder"]["layer_0"]["attn"]["q"]["kernel"]
    assert kernel.dtype == jnp.int8
    answers = _answers(model, held_out)
    assert np.mean([a == r["answer"] for a, r in zip(answers, held_out)]) >= 0.95
    assert answers == float_answers(held_out)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(matvec, "MAX_ROWS", 0)  # every product through XLA's dequantize-then-einsum
        assert _answers(model, held_out) == answers


def test_stacked_int8_layers_match_unrolled(held_out):
    rows = held_out[:4]
    unrolled = jaxvlm.load(quantize="int8", scan_layers=False)
    stacked = jaxvlm.load(quantize="int8", scan_layers=True)
    assert stacked.params["decoder"]["layers"]["mlp"]["up"]["kernel_scale"].shape[0] == unrolled.config.decoder.depth
    assert _answers(stacked, rows) == _answers(unrolled, rows)


@pytest.fixture(scope="module")
def qwen3_folders(hf_checkpoint, tmp_path_factory):
    """A tiny Qwen3 (GQA, tied head) converted as float32 and as int8 with groups of 8."""
    hf = hf_checkpoint("qwen3")
    root = tmp_path_factory.mktemp("int8")
    return (convert(hf, str(root / "float"), progress=False),
            convert(hf, str(root / "int8"), progress=False, quantize="int8", group_size=8))


def test_convert_quantize_stores_int8(qwen3_folders, convert_command, hf_checkpoint, tmp_path):
    """The folder holds int8 with float32 scales and loads as it is: the same params and logits as the
    float folder quantized at load."""
    floats, ints = qwen3_folders
    stored = {str(leaf.dtype) for leaf in jax.tree.leaves(checkpoint.stored_metadata(ints))}
    assert stored == {"int8", "float32"}
    model = jaxvlm.load(ints)  # quantize=None: as stored
    assert model.config.quantization.group_size == 8
    at_load = jaxvlm.load(floats, quantize="int8", group_size=8)
    jax.tree.map(np.testing.assert_array_equal, model.params, at_load.params)
    ids = np.array([[5, 9, 3, 17, 2]])
    np.testing.assert_array_equal(model.logits(ids), at_load.logits(ids))
    assert jaxvlm.load(ints, quantize="int8").config.quantization.group_size == 8
    # the command line, per output channel
    out = convert_command(hf_checkpoint("qwen3"), str(tmp_path / "cli"), "--quantize", "int8")
    assert jaxvlm.load(out).config.quantization.group_size is None


# --- bad input -----------------------------------------------------------------------------------------
def test_quantize_other_than_int8_is_refused(qwen3_folders, tmp_path, hf_checkpoint):
    with pytest.raises(ValueError, match=r"^quantize must be one of \['int8'\] or None, got 'int4'$"):
        jaxvlm.load(qwen3_folders[0], quantize="int4")
    with pytest.raises(ValueError, match=r"^--quantize must be one of \['int8'\], got 'int4'$"):
        convert(hf_checkpoint("qwen3"), str(tmp_path / "x"), quantize="int4")
    with pytest.raises(ValueError, match=r"^group_size is the int8 scales' group: give it with quantize='int8'$"):
        jaxvlm.load(qwen3_folders[0], group_size=8)


def test_a_group_size_that_does_not_divide_is_named(qwen3_folders, tmp_path, hf_checkpoint):
    with pytest.raises(ValueError, match=r"^group_size 5 does not divide the input axis of "
                                         r"decoder/embedder/embedding \(size 64, shape \[256, 64\]\)$"):
        jaxvlm.load(qwen3_folders[0], quantize="int8", group_size=5)
    with pytest.raises(ValueError, match=r": group_size 5 does not divide the input axis of decoder/embedder"):
        convert(hf_checkpoint("qwen3"), str(tmp_path / "x"), quantize="int8", group_size=5)
    assert not os.path.exists(tmp_path / "x")


def test_an_int8_folder_with_another_group_size_is_refused(qwen3_folders):
    with pytest.raises(ValueError, match=r"holds int8 weights quantized with group_size=8; group_size=16 would "
                                         r"need the float weights$"):
        jaxvlm.load(qwen3_folders[1], quantize="int8", group_size=16)


def test_a_corrupted_scale_is_named(qwen3_folders, tmp_path):
    model = jaxvlm.load(qwen3_folders[1])
    params = jax.tree.map(np.asarray, model.params)
    params["decoder"]["layer_1"]["mlp"]["down"]["kernel_scale"] = -params["decoder"]["layer_1"]["mlp"]["down"][
        "kernel_scale"]
    bad = str(tmp_path / "bad")
    checkpoint.save_model(bad, model.config, params)
    with pytest.raises(FileError, match=r"int8 scale decoder/layer_1/mlp/down/kernel_scale holds values that are "
                                        r"not finite and positive$"):
        jaxvlm.load(bad)


def test_an_int8_model_is_not_fine_tuned():
    from jaxvlm.train import TrainConfig, finetune
    model = jaxvlm.load(quantize="int8")
    with pytest.raises(ValueError, match=r"^this model's weights are int8 \(quantized for inference\); train the "
                                         r"float checkpoint and quantize the result$"):
        finetune(model, scenes.examples(0, 2), TrainConfig(steps=1), progress=False)
