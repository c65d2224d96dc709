"""Text in, text out: the checkpoint's own tokenizer files, BOS handling per family, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import jaxvlm
from tests import hf_models
from tests.test_parity import convert_command

TEXT = ["the quick brown fox jumps over the lazy dog", "a red circle above a blue square",
        "jax compiles numpy programs", "hello world, hello jax"] * 20


def gemma_tokenizer(directory: str, symbols: tuple[str, ...] = ()):
    """A tiny Gemma-style SentencePiece model (with `symbols` as single pieces, such as PaliGemma's
    `<image>`), and transformers' tokenizer for it (BOS added)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_prefix=os.path.join(directory, "tokenizer"), vocab_size=120,
        model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=list(symbols), minloglevel=2)
    os.remove(os.path.join(directory, "tokenizer.vocab"))
    tok = GemmaTokenizer.from_pretrained(directory, add_bos_token=True)
    tok.save_pretrained(directory)
    return tok


def qwen_tokenizer(directory: str):
    """A tiny byte-level BPE `tokenizer.json` with no BOS, as Qwen's, and transformers' wrapper."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=250, special_tokens=["<|pad|>", "<|eos|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"), eos_token="<|eos|>",
                                   pad_token="<|pad|>")


@pytest.mark.parametrize("name, files", [("gemma", "json"), ("gemma", "spm"), ("qwen3", "json")])
def test_generate_from_text_matches_transformers(tmp_path, name, files):
    hf_dir = str(tmp_path / "hf")
    model = hf_models.build(name, seed=4, eos_token_id=1, bos_token_id=2 if name == "gemma" else None)
    hf_models.save(model, hf_dir)
    tok = gemma_tokenizer(hf_dir) if name == "gemma" else qwen_tokenizer(hf_dir)
    if files == "spm":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(hf_dir, f))
    jx = jaxvlm.load(convert_command(hf_dir, str(tmp_path / "jax")))
    assert jx.tokenizer.source.endswith("tokenizer.model" if files == "spm" else "tokenizer.json")

    prompts = ["the lazy fox", "hello jax, compile the red square"]
    for p in prompts:
        assert jx.tokenizer.encode(p) == tok(p).input_ids
    assert (jx.tokenizer.encode(prompts[0])[0] == 2) == (name == "gemma")

    rows = [np.asarray(tok(p).input_ids) for p in prompts]
    want = hf_models.hf_generate(model, rows, 12, do_sample=False, eos_token_id=1)
    assert jx.generate(prompts, max_new_tokens=12) == [tok.decode(r[r != 0], skip_special_tokens=True)
                                                       for r in want]
    assert jx.generate(prompts[0], max_new_tokens=12) == jx.generate(prompts, max_new_tokens=12)[0]

    result = subprocess.run([sys.executable, "-m", "jaxvlm.cli", "generate", "--checkpoint", str(tmp_path / "jax"),
                             "--prompt", prompts[1], "--max-new-tokens", "12"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == jx.generate(prompts[1], max_new_tokens=12) + "\n"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        jaxvlm.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json: no jaxvlm config"):
        jaxvlm.load(tmp_path)
