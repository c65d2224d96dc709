"""LoRA: adapters shaped by the kernels' named axes, their product equal to a merged kernel, only they are
trained (and held by the optimizer), kept beside their kernels or merged. That they learn a new prompt
kind on the built-in model as a full fine-tune does, with at most 5% of the parameters trained, is
asserted by notebooks/04_finetune.ipynb, which runs both (the test suite executes it)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvlm
from jaxvlm import checkpoint, lora, shapes
from jaxvlm.config import LoraConfig
from jaxvlm.layers import project
from jaxvlm.train import TrainConfig, Trainer, finetune
from tests import tiny_training as tiny

TARGETS = ("attn/q", "attn/v", "decoder/.*/mlp/(gate|up|down)")


@pytest.mark.parametrize("spec, shape, contracted, a_shape, b_shape", [
    ("BTD,DNH->BTNH", (12, 3, 4), (-3,), (12, 2), (2, 3, 4)),  # a query projection: input D
    ("BTNH,NHD->BTD", (3, 4, 12), (-3, -2), (3, 4, 2), (2, 12)),  # an attention output: inputs N, H
    ("BTD,DF->BTF", (12, 20), (-2,), (12, 2), (2, 20)),
])
def test_adapters_follow_the_named_axes_and_add_their_product(spec, shape, contracted, a_shape, b_shape):
    assert lora.adapter_shapes(shape, contracted, 2, "k") == (a_shape, b_shape)
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 5) + tuple(shape[i] for i in sorted(c % len(shape) for c in contracted)))
    kernel = jax.random.normal(keys[1], shape)
    a, b = jax.random.normal(keys[2], a_shape), jax.random.normal(keys[3], b_shape)
    merged = kernel + lora.delta(a, b, contracted)
    np.testing.assert_allclose(project(spec, x, kernel, None, jnp.float32) + lora.apply(spec, x, a, b, jnp.float32),
                               project(spec, x, merged, None, jnp.float32), rtol=1e-5, atol=1e-4)


def test_bad_lora_settings_are_named():
    params, contracted = tiny.init_params(), checkpoint.contracted_axes(tiny.TINY)
    with pytest.raises(ValueError, match="LoraConfig.rank: must be an integer >= 1, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"LoRA rank 40 is larger than decoder/layer_0/attn/q/kernel allows "
                                         r"\(inputs \[32\], outputs \[2, 16\]: at most 32\)"):
        lora.init(params, LoraConfig(rank=40), contracted, jax.random.key(0))
    with pytest.raises(ValueError, match="LoRA target 'attn/qq' names no projection of this model"):
        lora.init(params, LoraConfig(targets=("attn/qq",)), contracted, jax.random.key(0))


def test_only_the_adapters_train_and_they_save_apart_or_merge(tmp_path, caplog):
    """On the built-in model: under 5% of the parameters trained, the base bit-identical, the optimizer's
    state the adapters' alone; kept apart through save and load, or merged, the same model. (That LoRA
    learns a new prompt kind as the full fine-tune does is checked where both run: notebooks/04_finetune.)"""
    model = jaxvlm.load()
    rows = shapes.examples(5, 16)
    config = LoraConfig(rank=8, alpha=16, targets=TARGETS)
    trainers = []
    original = Trainer.__init__

    def keep(self, *args, **kwargs):  # the trainer, to read its optimizer state
        original(self, *args, **kwargs)
        trainers.append(self)
    with pytest.MonkeyPatch.context() as patch, jax.log_compiles(), caplog.at_level(logging.WARNING, "jax"):
        patch.setattr(Trainer, "__init__", keep)
        tuned = finetune(model, rows, TrainConfig(steps=4, learning_rate=1e-2, warmup_steps=1), batch_size=4,
                         progress=False, lora=config)
    # one program for every step (the rows fall in one length bucket): the fresh adapters sit on the
    # device as the frozen params do, so the second step's inputs are not another program's
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(_train_step)")]
    assert len(compiled) == 1, [m[:80] for m in compiled]
    base, adapters = lora.split(tuned.params)
    assert lora.count(adapters) / lora.count(model.params) <= 0.05
    assert jax.tree.all(jax.tree.map(np.array_equal, base, model.params))
    moments = trainers[0].optimizer.init(adapters)
    assert lora.count(moments) <= 2 * lora.count(adapters) + 8

    ids = tuned.encode(["count shapes", "what colour is the circle?"], image=[r["image"] for r in rows[:2]])
    assert np.abs(tuned.logits(*ids) - model.logits(*ids)).max() > 1e-3  # the adapters did move
    folder = tuned.save(tmp_path / "adapters")
    assert json.load(open(os.path.join(folder, "config.json")))["lora"]["rank"] == 8
    np.testing.assert_array_equal(jaxvlm.load(folder).logits(*ids), tuned.logits(*ids))
    merged = tuned.merge_lora()
    assert merged.config.lora is None and not lora.split(merged.params)[1]
    np.testing.assert_allclose(merged.logits(*ids), tuned.logits(*ids), atol=1e-4)


def test_the_train_command_fine_tunes_with_lora_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(16):
            scene = shapes.random_scene(rng)
            shapes.draw(scene).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "prompt": "count shapes",
                                "answer": str(len(scene.shapes))}) + "\n")
    command = [sys.executable, "-m", "jaxvlm.cli", "train", "--data", str(tmp_path / "train.jsonl"), "--lora-rank",
               "4", "--steps", "4", "--batch-size", "4", "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tuned = jaxvlm.load(tmp_path / "out")
    assert tuned.config.lora is None  # merged by default
    assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["3", "4"]
    again = subprocess.run(command + ["--out", str(tmp_path / "out2"), "--keep-adapters"], capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    assert "the run is complete: step 4 of 4" in again.stderr
    assert jaxvlm.load(tmp_path / "out2").config.lora.rank == 4
    # a finished run extended with a larger --steps resumes and writes its --out anew
    before = (tmp_path / "out" / "checksums.json").read_text()
    longer = [a if a != "4" or command[i - 1] != "--steps" else "5" for i, a in enumerate(command)]
    extended = subprocess.run(longer + ["--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert extended.returncode == 0, extended.stderr
    assert "resuming: step 4 of 5" in extended.stderr
    assert (tmp_path / "out" / "checksums.json").read_text() != before and jaxvlm.load(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "out2", "work"] + [f"{i}.png" for i in range(16)]
                                                  + ["train.jsonl"])
    for flags, message in [(["--lora-rank", "0"], "error: LoraConfig.rank: must be an integer >= 1, got 0"),
                           (["--lora-rank", "999"], "error: LoRA rank 999 is larger than"),
                           (["--out", str(tmp_path / "out")], "already exists")]:
        bad = subprocess.run(command[:-8] + ["--steps", "1", "--out", str(tmp_path / "x")] + flags,
                             capture_output=True, text=True)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()
