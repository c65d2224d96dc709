"""End-to-end parity with transformers: tiny random HF model -> save_pretrained -> convert command -> load."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jaxvlm
from tests import hf_models


FAMILIES = ["gemma", "gemma2", "gemma3_text", "phi3", "phi3_longrope", "qwen3", "qwen3_moe", "llama", "mistral",
            "qwen2"]
NEW_TOKENS = 24
# Batches of three prompts of different lengths. The LongRoPE model (32 original positions) keeps
# prompt + generation within 32 here so it stays on its short factors; the long and crossing cases
# have tests of their own.
LENGTHS = {"phi3_longrope": [5, 8, 3]}
DEFAULT_LENGTHS = [5, 13, 9]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, convert_and_load):
    """(name, torch model, jaxvlm model, prompts); EOS is a token the greedy run really produces."""
    name = request.param
    rows = hf_models.prompts(1, LENGTHS.get(name, DEFAULT_LENGTHS))
    model = hf_models.build(name)
    free_run = hf_models.hf_generate(model, rows, NEW_TOKENS)
    eos = int(free_run[1, 6])  # row 1 stops at step 6 (or earlier): per-row end-of-sequence is exercised
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    return name, model, convert_and_load(model, name), rows


def test_logits_match(family):
    name, hf, jx, _ = family
    ids = np.stack(hf_models.prompts(2, [12, 12]))
    diff = np.abs(jx.logits(ids) - hf_models.hf_logits(hf, ids)).max()
    assert diff <= 1e-4, f"{name}: max |logits diff| {diff}"


@pytest.mark.parametrize("family", ["gemma2", "qwen3"], indirect=True)
def test_hidden_states_and_attentions_match(family):
    """logits(..., output_hidden_states=True, output_attentions=True) as transformers lists them (gemma2: a
    scaled embedding, post-norms, local layers; qwen3: its query and key norms)."""
    import torch
    name, hf, jx, _ = family
    ids = np.stack(hf_models.prompts(2, [12, 12]))
    with torch.no_grad():
        want = hf(torch.tensor(ids), output_hidden_states=True, output_attentions=True)
    got = jx.logits(ids, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == jx.config.decoder.depth + 1
    for mine, theirs in zip(got.hidden_states, want.hidden_states):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-4, err_msg=name)
    for mine, theirs in zip(got.attentions, want.attentions, strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got.logits, jx.logits(ids), atol=1e-5)
    assert jx.logits(ids, output_attentions=True).hidden_states is None


def test_greedy_tokens_match(family):
    name, hf, jx, rows = family
    ids, mask = hf_models.left_pad(rows)
    want = hf_models.hf_generate(hf, rows, NEW_TOKENS, do_sample=False)
    got = jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(got, want, err_msg=name)
    eos = jx.config.tokens.eos_ids[0]
    assert (got == eos).any(), "the test should exercise end-of-sequence"
    assert not (got == eos).all(axis=1).any()


# where padding could show: windows, local layers' own rotary embedding, per-row LongRoPE, experts (the
# plain decoders' padding is the same code, and their padded batches are checked against transformers'
# in test_greedy_tokens_match)
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3_longrope", "qwen3_moe", "mistral"], indirect=True)
def test_padded_rows_match_each_prompt_alone(family):
    name, _, jx, rows = family
    ids, mask = hf_models.left_pad(rows)
    batch = jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)
    batch_logits = jx.logits(ids, mask)
    for i, row in enumerate(rows):
        alone = jx.generate_ids(row[None], max_new_tokens=NEW_TOKENS)
        np.testing.assert_array_equal(batch[i], alone[0], err_msg=f"{name} row {i}")
        np.testing.assert_allclose(batch_logits[i, -len(row):], jx.logits(row[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma2"], indirect=True)  # the sampler is every family's: one with soft-capping
def test_top_k_one_is_greedy_and_seed_repeats(family):
    name, _, jx, rows = family
    ids, mask = hf_models.left_pad(rows)
    greedy = jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=1,
                                                  seed=5), greedy)
    sampled = [jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=40, top_p=0.9, seed=7)
               for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert (sampled[0] != greedy).any(), "sampling at temperature 1.5 should leave the greedy path"


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe"], indirect=True)
def test_streamed_tokens_are_the_generated_ones(family):
    """An engine's events (decode calls of STREAM_CHUNK steps, as `Model.stream` runs them, a sliding
    window's ring crossing them) joined are `generate_ids`'s tokens."""
    from jaxvlm.engine import Engine, Request
    from jaxvlm.model import STREAM_CHUNK
    name, _, jx, rows = family
    ids, mask = hf_models.left_pad(rows)
    want = jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)
    engine = Engine(jx, slots=len(rows), cache_size=128, chunk=STREAM_CHUNK, compact=False)
    requests = [engine.submit(Request(tokens=row, max_tokens=NEW_TOKENS)) for row in rows]
    chunks = {r: [] for r in requests}
    while not engine.idle:
        for event in engine.step():
            chunks[event.request_id].append(event.tokens)
    assert max(map(len, chunks.values())) > 2  # (a row may end at its first token)
    for row, r in enumerate(requests):
        assert all(len(c) <= STREAM_CHUNK for c in chunks[r])
        streamed = sum(chunks[r], [])
        np.testing.assert_array_equal(streamed, want[row, :len(streamed)])


# --- LongRoPE: long prompts use the long factors; crossing the original length rebuilds the cache ---------
@pytest.fixture(scope="module")
def longrope(convert_and_load):
    model = hf_models.build("phi3_longrope", seed=3)
    return model, convert_and_load(model, "longrope")


@pytest.mark.parametrize("length", [12, 40])
def test_longrope_logits_short_and_long_prompt(longrope, length):
    hf, jx = longrope
    assert jx.config.decoder.rope.original_max_position == 32
    ids = np.stack(hf_models.prompts(4, [length]))
    diff = np.abs(jx.logits(ids) - hf_models.hf_logits(hf, ids)).max()
    assert diff <= 1e-4, f"prompt of {length}: max |logits diff| {diff}"


@pytest.mark.parametrize("lengths", [[40, 35, 37], [20, 14, 26]], ids=["long_prompts", "crossing"])
def test_longrope_greedy_tokens(longrope, lengths):
    """Each row's tokens are transformers' for that row alone: a row that crosses the original length reruns
    its own sequence with the long factors when it crosses (transformers' batch would switch every row when
    the padded batch crosses, and a row's tokens would depend on the others')."""
    hf, jx = longrope
    rows = hf_models.prompts(5, lengths)
    ids, mask = hf_models.left_pad(rows)
    want = np.concatenate([hf_models.hf_generate(hf, [row], NEW_TOKENS, do_sample=False) for row in rows])
    np.testing.assert_array_equal(jx.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS), want)


# --- other checkpoint layouts --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sharded", "bin", "sharded_bin"])
@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_sharded_and_bin_checkpoints(tmp_path, name, layout):
    """Read in this process (the command's own tests run it as a user does)."""
    from convert import convert
    model = hf_models.build(name, seed=11)
    hf_dir = hf_models.save(model, str(tmp_path / "hf"), shard="40KB" if "sharded" in layout else None,
                            bin_file="bin" in layout)
    files = os.listdir(hf_dir)
    if layout == "sharded":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    elif layout == "bin":
        assert "pytorch_model.bin" in files and not any(f.endswith(".safetensors") for f in files)
    else:
        assert "pytorch_model.bin.index.json" in files and sum(f.endswith(".bin") for f in files) == 2
    jx = jaxvlm.load(convert(hf_dir, str(tmp_path / "jax"), progress=False))
    ids = np.stack(hf_models.prompts(6, [10, 10]))  # (every weight read shows in the logits)
    assert np.abs(jx.logits(ids) - hf_models.hf_logits(model, ids)).max() <= 1e-4
