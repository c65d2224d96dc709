"""Text in, text out: the checkpoint's own tokenizer files, BOS handling per family, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import jaxvlm
from convert import convert
from tests import hf_models

@pytest.mark.parametrize("name, files", [("gemma", "json"), ("gemma", "spm"), ("qwen3", "json")])
def test_generate_from_text_matches_transformers(tmp_path, name, files, gemma_tokenizer, qwen_tokenizer):
    hf_dir = str(tmp_path / "hf")
    model = hf_models.build(name, seed=4, eos_token_id=1, bos_token_id=2 if name == "gemma" else None)
    hf_models.save(model, hf_dir)
    tok = gemma_tokenizer(hf_dir) if name == "gemma" else qwen_tokenizer(hf_dir)
    if files == "spm":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(hf_dir, f))
    jx = jaxvlm.load(convert(hf_dir, str(tmp_path / "jax"), progress=False))
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
