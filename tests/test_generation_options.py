"""The generation options transformers users expect, each against transformers' `generate` on the same
tiny model: repetition_penalty, min_new_tokens, stop strings, the log-probabilities of the chosen tokens, and a
checkpoint's generation_config.json applied as transformers applies it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import jaxvlm
from convert import convert
from tests import hf_models

PROMPTS = ["the quick brown fox", "hello jax, hello"]
NEW = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory, gemma_tokenizer):
    """(transformers model, its tokenizer, the folder, the converted jaxvlm model)."""
    root = tmp_path_factory.mktemp("options")
    hf_dir = str(root / "hf")
    model = hf_models.build("gemma", seed=4, eos_token_id=1, bos_token_id=2, vocab_size=128)
    hf_models.save(model, hf_dir)
    tok = gemma_tokenizer(hf_dir)
    return model.eval(), tok, hf_dir, jaxvlm.load(convert(hf_dir, str(root / "jax"), progress=False))


def hf_new_tokens(model, tok, prompt: str, **kwargs) -> np.ndarray:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].numpy()


def jx_new_tokens(jx, prompt: str, **kwargs) -> np.ndarray:
    answer = jx.generate(prompt, logprobs=True, **kwargs)
    return np.asarray(answer.token_ids)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_as_transformers(pair, penalty):
    model, tok, _, jx = pair
    for prompt in PROMPTS:
        want = hf_new_tokens(model, tok, prompt, max_new_tokens=NEW, repetition_penalty=penalty)
        np.testing.assert_array_equal(jx_new_tokens(jx, prompt, max_new_tokens=NEW, repetition_penalty=penalty), want)
    plain = jx.generate(PROMPTS, max_new_tokens=NEW)
    assert jx.generate(PROMPTS, max_new_tokens=NEW, repetition_penalty=penalty) != plain  # it changes the answer
    # a row's tokens do not depend on what shares its batch
    assert jx.generate(PROMPTS, max_new_tokens=NEW, repetition_penalty=penalty) == \
        [jx.generate(p, max_new_tokens=NEW, repetition_penalty=penalty) for p in PROMPTS]


def test_min_new_tokens_as_transformers(pair):
    model, tok, _, jx = pair
    prompt = PROMPTS[0]
    free = jx_new_tokens(jx, prompt, max_new_tokens=NEW)
    eos = int(free[2])  # a model whose third token ends the answer
    ending = jaxvlm.Model(dataclasses.replace(jx.config, tokens=dataclasses.replace(jx.config.tokens, eos_ids=(eos,))),
                          jx.params, jx.tokenizer)
    assert len(jx_new_tokens(ending, prompt, max_new_tokens=NEW)) == 3
    want = hf_new_tokens(model, tok, prompt, max_new_tokens=NEW, min_new_tokens=7, eos_token_id=eos)
    got = jx_new_tokens(ending, prompt, max_new_tokens=NEW, min_new_tokens=7)
    assert len(got) >= 7 and eos not in got[:7]
    np.testing.assert_array_equal(got, want[:len(got)])


def test_stop_strings_end_the_text_before_them(pair):
    model, tok, _, jx = pair
    prompt = PROMPTS[1]
    full = jx.generate(prompt, max_new_tokens=NEW)
    stop = full[4:7]
    text = jx.generate(prompt, max_new_tokens=NEW, stop=[stop, "never there"])
    assert text == full[:full.index(stop)]
    hf = hf_new_tokens(model, tok, prompt, max_new_tokens=NEW, stop_strings=[stop], tokenizer=tok)
    hf_text = tok.decode(hf, skip_special_tokens=True)
    assert hf_text.endswith(stop) or stop in hf_text
    assert text == hf_text[:hf_text.index(stop)]
    answer = jx.generate(prompt, max_new_tokens=NEW, stop=stop, logprobs=True)
    np.testing.assert_array_equal(answer.token_ids, hf)  # through the token that completed the stop string
    assert "".join(jx.stream(prompt, max_new_tokens=NEW, stop=stop)) == text
    assert jx.generate([prompt, PROMPTS[0]], max_new_tokens=NEW, stop=stop)[0] == text


def test_logprobs_as_transformers_transition_scores(pair):
    model, tok, _, jx = pair
    prompt = PROMPTS[0]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].numpy()
    answer = jx.generate(prompt, max_new_tokens=NEW, logprobs=True)
    np.testing.assert_array_equal(answer.token_ids, out.sequences[0, ids.shape[1]:].numpy())
    np.testing.assert_allclose(answer.logprobs, scores, atol=1e-4)
    tokens, logprobs = jx.generate_ids(*jx.encode(prompt), max_new_tokens=NEW, logprobs=True)
    np.testing.assert_allclose(logprobs[0], scores, atol=1e-4)


def test_generation_config_defaults_as_transformers_applies_them(pair, tmp_path):
    model, tok, hf_dir, _ = pair
    folder = tmp_path / "hf"
    shutil.copytree(hf_dir, folder)
    settings = {"do_sample": False, "repetition_penalty": 1.4, "max_new_tokens": 9, "temperature": 0.6,
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(settings))
    jx = jaxvlm.load(folder)
    hf = type(model).from_pretrained(folder).eval()
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():  # its generation_config.json: greedy (no do_sample), the penalty, 9 new tokens
        want = hf.generate(ids, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].numpy()
    answer = jx.generate(PROMPTS[0], logprobs=True)
    np.testing.assert_array_equal(answer.token_ids, want)
    assert len(want) == 9 or want[-1] == 1
    assert jx._settings()["temperature"] == 0.0  # temperature applies only where do_sample says
    sampled = jx._settings(temperature=0.8)
    assert sampled["top_k"] == 50 and sampled["top_p"] is None  # transformers' defaults when sampling
    assert jx.generate(PROMPTS[0], max_new_tokens=3, repetition_penalty=1.0) != jx.generate(PROMPTS[0], max_new_tokens=3)
    # saved and exported, the settings go along
    jx.save(tmp_path / "saved")
    assert jaxvlm.load(tmp_path / "saved").config.generation == jx.config.generation
    out = jaxvlm.load(tmp_path / "saved").export_hf(tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert exported["repetition_penalty"] == 1.4 and exported["do_sample"] is False
    assert jaxvlm.load(out).config.generation == jx.config.generation


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=0), r"repetition_penalty must be in \(0, inf\]"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an int >= 0"),
    (dict(stop=""), "stop must be a non-empty string or a list of them"),
    (dict(stop=[3]), "stop must be a non-empty string or a list of them"),
    (dict(logprobs="yes"), "logprobs must be True or False"),
])
def test_bad_generation_options_are_named(pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair[3].generate("hello", **kwargs)
