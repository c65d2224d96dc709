"""The whole path on a tiny model, with no download: write a random Gemma-style Hugging Face checkpoint
(config.json, model.safetensors, tokenizer.json), convert it, load it and generate.

The weights are random, so the text is too; what this shows is that every step runs on this machine.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

TEXT = ["jax compiles numpy programs for accelerators", "a small model generates text one token at a time",
        "the cache holds keys and values of earlier tokens"] * 10

CONFIG = {
    "model_type": "gemma", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}


def write_hf_checkpoint(directory: str, seed: int = 0) -> str:
    """A random Gemma-style checkpoint in Hugging Face's layout, with a byte-level BPE tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from convert import tables
    from convert.hf_config import decoder_config
    from jaxvlm.config import ModelConfig

    os.makedirs(directory, exist_ok=True)
    c = CONFIG
    # The tensor names and torch shapes are the ones the converter's Gemma table expects.
    config = ModelConfig(decoder=decoder_config(c))
    shapes = {name: rule.shape for name, rule in tables.expand(config, "gemma").items()}
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) * (0.1 if len(shape) == 1 else shape[-1] ** -0.5)).astype(np.float32)
               for name, shape in shapes.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(c, f, indent=2)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=c["vocab_size"],
                                                      special_tokens=["<pad>", "<eos>", "<bos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)
    return directory


def run(workdir: str | None = None) -> str:
    import jaxvlm
    from convert import convert

    workdir = workdir or tempfile.mkdtemp(prefix="jaxvlm-demo-")
    hf_dir = write_hf_checkpoint(os.path.join(workdir, "hf-gemma-tiny"))
    out_dir = os.path.join(workdir, "jaxvlm-gemma-tiny")
    if not os.path.exists(out_dir):
        convert(hf_dir, out_dir, progress=False)
    model = jaxvlm.load(out_dir)
    prompt = "jax compiles"
    text = model.generate(prompt, max_new_tokens=16)
    print(f"checkpoint: {out_dir}\nmodel: {model}\nprompt: {prompt!r}\ngenerated (random weights): {text!r}")
    return text
