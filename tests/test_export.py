"""Export back to Hugging Face: transformers' from_pretrained loads what Model.export_hf writes, with logits
identical to the model the weights came from, for every family, the vision-language models, the
classification heads and the image encoders; and for a model fine-tuned here (LoRA merged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import jaxvlm
from tests import hf_models


def reload(model_class, folder):
    import transformers
    return getattr(transformers, model_class).from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text", "phi3", "phi3_longrope", "qwen3", "qwen3_moe",
                                  "llama", "mistral", "qwen2"])
def test_text_families_export_to_identical_logits(name, tmp_path):
    model = hf_models.build(name, seed=6)
    hf_dir = hf_models.save(model, str(tmp_path / "hf"))
    out = jaxvlm.load(hf_dir).export_hf(tmp_path / "out", max_shard_bytes=60_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # sharded past the size, with the index
    back = reload(type(model).__name__, out)
    ids = np.random.default_rng(0).integers(3, hf_models.VOCAB, (2, 60))  # past LongRoPE's 32 original positions
    np.testing.assert_array_equal(hf_models.hf_logits(back, ids), hf_models.hf_logits(model, ids))


@pytest.mark.parametrize("name", ["paligemma", "paligemma2", "llava_phi3", "llava"])
def test_vision_language_models_export_to_identical_logits(name, tmp_path):
    model = hf_models.build_vlm(name, seed=6)
    hf_dir = hf_models.save(model, str(tmp_path / "hf"))
    jx = jaxvlm.load(hf_dir)
    back = reload(type(model).__name__, jx.export_hf(tmp_path / "out"))
    rows = hf_models.vlm_prompts(name, 1, [5, 8])
    ids, mask = hf_models.left_pad(rows)
    pixels = hf_models.pixels(2, 2)
    offset = jx.config.position_offset
    np.testing.assert_array_equal(hf_models.hf_vlm_logits(back, name, ids, mask, pixels, offset),
                                  hf_models.hf_vlm_logits(model, name, ids, mask, pixels, offset))


@pytest.mark.parametrize("architecture", ["Phi3ForSequenceClassification", "Phi3ForTokenClassification",
                                          "Qwen3ForSequenceClassification"])
def test_classification_heads_export(architecture, tmp_path):
    name = "qwen3" if architecture.startswith("Qwen3") else "phi3"
    model = hf_models.build(name, seed=6, architecture=architecture, num_labels=3,
                            id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    hf_dir = hf_models.save(model, str(tmp_path / "hf"))
    out = jaxvlm.load(hf_dir).export_hf(tmp_path / "out")
    back = reload(architecture, out)
    assert back.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    import torch
    ids = torch.tensor(np.random.default_rng(0).integers(3, hf_models.VOCAB, (2, 12)))
    with torch.no_grad():
        np.testing.assert_array_equal(back(ids).logits.numpy(), model(ids).logits.numpy())


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_image_encoders_export(name, tmp_path):
    import torch
    model = hf_models.build_vision(name, seed=6)
    hf_dir = hf_models.save(model, str(tmp_path / "hf"))
    back = reload(type(model).__name__, jaxvlm.load(hf_dir).export_hf(tmp_path / "out"))
    pixels = hf_models.to_torch_pixels(hf_models.pixels(1, 2))
    with torch.no_grad():
        want, got = model(pixel_values=pixels), back(pixel_values=pixels)
    for key in want:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_a_model_fine_tuned_here_exports_with_its_adapters_merged(tmp_path):
    """The built-in model after a few LoRA steps: transformers' PaliGemma gives jaxvlm's logits (float32
    tolerance: the merged kernels are summed in another order than the adapters' products) and the same
    greedy answer; its tokenizer and processor files come along."""
    import torch
    import transformers
    from jaxvlm import shapes
    from jaxvlm.config import LoraConfig
    from jaxvlm.train import TrainConfig, finetune
    rows = shapes.examples(3, 16)
    tuned = finetune(jaxvlm.load(), rows, TrainConfig(steps=3, learning_rate=1e-2), batch_size=4, progress=False,
                     lora=LoraConfig(rank=4))
    out = tuned.export_hf(tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.model", "preprocessor_config.json"} <= set(os.listdir(out))
    back = reload("PaliGemmaForConditionalGeneration", out)
    ids, mask, pixels = tuned.encode("caption en", image="examples/shapes.png")
    kwargs = hf_models.vlm_kwargs("paligemma", mask.astype(np.int64), pixels)
    with torch.no_grad():
        hf = back(torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()
    np.testing.assert_allclose(hf, tuned.logits(ids, mask, pixels), atol=1e-4)
    processor = transformers.SiglipImageProcessor.from_pretrained(out)
    hf_pixels = processor(images=[PIL.Image.open("examples/shapes.png")], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(hf_pixels[0].transpose(1, 2, 0), pixels[0], atol=1e-5)
    with torch.no_grad():
        generated = back.generate(torch.tensor(ids, dtype=torch.long), **kwargs, max_new_tokens=20, do_sample=False)
    answer = tuned.tokenizer.decode(generated[0, ids.shape[1]:].numpy())
    assert answer == tuned.generate("caption en", image="examples/shapes.png", max_new_tokens=20)


def test_export_command_and_bad_targets(tmp_path, hf_checkpoint):
    hf_dir = hf_checkpoint("qwen3", seed=2)
    converted = str(tmp_path / "jax")
    subprocess.run([sys.executable, "-m", "convert", hf_dir, converted], check=True, capture_output=True)
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxvlm.cli", "export-hf", *a], capture_output=True,
                                    text=True)
    result = run(converted, str(tmp_path / "hf-out"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {tmp_path / 'hf-out'}\n"
    again = run(converted, str(tmp_path / "hf-out"))
    assert again.returncode == 1 and again.stderr == f"error: {tmp_path / 'hf-out'}: already exists; export into " \
                                                     "a new folder\n"
    with pytest.raises(ValueError, match="int8; export the float checkpoint"):
        jaxvlm.load(converted, quantize="int8").export_hf(tmp_path / "int8")
    assert sorted(os.listdir(tmp_path)) == ["hf-out", "jax"]  # nothing partial left behind
