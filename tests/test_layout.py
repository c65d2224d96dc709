"""Stacked layers: `scan_layers=True` keeps each stack as [L, ...] params run by a scan, and gives what
the unrolled layers give, for each kind of stack, at inference and in training."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxvlm
from jaxvlm import checkpoint, layout
from jaxvlm.train import Trainer, loss_curve
from tests import hf_models
from tests import tiny_training as tiny

# a stack of each kind: local and global layers, fused q/k/v read apart, a vision tower under a prefix
# (local layers' own rotary embedding and q/k norms, stacked: Gemma 3's, in the mesh suite; CLIP's inner
# feature layer, scanned, is Qwen-VL's too: tests/test_qwen_vl.py's stacked tests)
FAMILIES = ["gemma2", "phi3", "paligemma"]
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, hf_checkpoint, tmp_path_factory):
    from convert import convert
    name = request.param
    vlm = name in hf_models.VLMS
    folder = convert(hf_checkpoint(name, seed=5, vision_language=vlm), str(tmp_path_factory.mktemp(name) / "jax"),
                     progress=False)
    # Shaped as test_parity's and test_vlm's inputs (rows, lengths, new tokens): the unrolled model's
    # programs are theirs, compiled once a run (the suite shares one compilation cache).
    if vlm:
        rows, inputs = hf_models.vlm_prompts(name, 2, [4, 9]), {"pixel_values": hf_models.pixels(2, 2)}
    else:
        rows, inputs = hf_models.prompts(2, [4, 13, 9]), {}
    ids, mask = hf_models.left_pad(rows)
    return name, folder, dict(inputs, input_ids=ids, attention_mask=mask)


def test_stacked_layers_give_the_unrolled_logits_and_tokens(family):
    name, folder, inputs = family
    unrolled, stacked = jaxvlm.load(folder, scan_layers=False), jaxvlm.load(folder, scan_layers=True)
    assert not layout.is_stacked(unrolled.params) and layout.is_stacked(stacked.params)
    depth = stacked.config.decoder.depth
    assert all(x.shape[0] == depth for x in jax.tree.leaves(stacked.params["decoder"]["layers"]))
    np.testing.assert_allclose(stacked.logits(**inputs), unrolled.logits(**inputs), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(stacked.generate_ids(**inputs, max_new_tokens=NEW_TOKENS),
                                  unrolled.generate_ids(**inputs, max_new_tokens=NEW_TOKENS))
    if "pixel_values" in inputs:
        for a, b in zip(stacked.vision_hidden_states(inputs["pixel_values"]),
                        unrolled.vision_hidden_states(inputs["pixel_values"])):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_stack_and_unstack_are_inverse():
    params = tiny.init_params()
    stacked = layout.stack(params)
    assert set(stacked["decoder"]) >= {"layers", "embedder"} and "layer_0" not in stacked["decoder"]
    assert jax.tree.structure(layout.unstack(stacked)) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(layout.unstack(stacked)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_stacked_params_name_the_layer_axis():
    axes = checkpoint.param_axes(tiny.TINY, scan_layers=True)
    assert tuple(axes["decoder"]["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(axes["vision"]["layers"]["mlp"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")


def test_a_model_saved_stacked_loads_either_way(tmp_path):
    config, params = tiny.TINY, layout.stack(tiny.init_params())
    folder = checkpoint.save_model(str(tmp_path / "m"), config, params)
    assert layout.is_stacked(jaxvlm.load(folder, scan_layers=True).params)
    unrolled = jaxvlm.load(folder, scan_layers=False).params
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(layout.unstack(params))):
        np.testing.assert_array_equal(a, b)


def test_training_stacked_layers_and_remat_give_the_unrolled_losses(tiny_tokenizer):
    """Unrolled with remat or without, and stacked with remat (the scan with remat inside it, a program of
    its own; stacked without remat only leaves the remat out): the losses of the plain run, whose program
    the other training tests share."""
    runs = {}
    for stacked, remat in [(False, False), (False, True), (True, True)]:
        losses, record = loss_curve()
        params = layout.relayout(tiny.init_params(), stacked)
        state = Trainer(tiny.TINY, tiny.train_config(3, remat=remat)).fit(
            params, tiny.batches(tiny_tokenizer), progress=False, on_step=record)
        assert layout.is_stacked(state.params) == stacked
        runs[stacked, remat] = losses
    for (stacked, remat), losses in runs.items():
        np.testing.assert_allclose(losses, runs[False, False], rtol=1e-5, err_msg=f"{stacked=}, {remat=}")


def test_resuming_with_the_other_layout_is_refused(tiny_tokenizer, tmp_path):
    Trainer(tiny.TINY, tiny.train_config(2), tmp_path).fit(tiny.init_params(), tiny.batches(tiny_tokenizer),
                                                           progress=False)
    trainer = Trainer(tiny.TINY, tiny.train_config(3), tmp_path)
    with pytest.raises(ValueError, match=r"^scan_layers: .*checkpoints/2 holds the layers unrolled \(scan_layers=False\) "
                                         r"but these params are stacked \(scan_layers=True\)"):
        trainer.restore(layout.stack(tiny.init_params()))
    trainer.close()
