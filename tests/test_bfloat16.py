"""bfloat16 parity: a bfloat16 checkpoint, loaded with defaults (bfloat16 compute), against transformers'
model in bfloat16, per family, on teacher-forced tokens.

Two bfloat16 programs cannot agree exactly (they round at different places), so the measure is how far
each is from the float32 model the bfloat16 weights were rounded from: jaxvlm in bfloat16 must be about as
close to it as transformers in bfloat16 is. Measured on these tiny models (mean KL over 134 to 192
positions, f32 || bf16): transformers 1.3e-5 .. 3.7e-3, jaxvlm 1.4e-5 .. 2.6e-3 (at most 1.07x
transformers'); top-1 agreement with float32: transformers 0.941 .. 1.000, jaxvlm 0.941 .. 1.000 (at
worst 0.022 below transformers: 3 near-ties of 134 going the other way). The thresholds leave room for
rounding noise only: KL at most 1.5x transformers' own gap, top-1 agreement at most 0.03 below it, and
against transformers' bfloat16 directly (two independent roundings) KL at most 2x that gap.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from convert import convert
from tests import hf_models

TEXT = ["gemma", "gemma2", "phi3", "qwen3"]
VLMS = ["paligemma", "llava_phi3"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over positions of KL(softmax p || softmax q); logits [positions, V]."""
    lp, lq = _log_softmax(p), _log_softmax(q)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def _forward(hf, name: str, ids, mask, pixels):
    import torch
    if pixels is None:
        return hf_models.hf_logits(hf, ids)
    kwargs = hf_models.vlm_kwargs(name, mask, pixels)
    kwargs["pixel_values"] = kwargs["pixel_values"].to(next(hf.parameters()).dtype)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + (1 if name.startswith("paligemma") else 0)
    with torch.no_grad():
        return hf(torch.tensor(ids), position_ids=torch.tensor(positions), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("name", TEXT + VLMS)
def test_bfloat16_matches_transformers_bfloat16(name, convert_and_load):
    import torch
    if name in VLMS:
        hf32 = hf_models.build_vlm(name, seed=3)
        ids, mask = hf_models.left_pad(hf_models.vlm_prompts(name, 3, [40, 60]))
        pixels = hf_models.pixels(3, 2)
    else:
        hf32 = hf_models.build(name, seed=3)
        ids = np.random.default_rng(0).integers(3, hf_models.VOCAB - 1, size=(4, 48))
        mask, pixels = np.ones_like(ids, bool), None
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    model = convert_and_load(hf16, f"{name}-bf16")  # a bfloat16 checkpoint stays bfloat16
    assert str(model.dtype) == "bfloat16"
    real = mask.astype(bool)
    reference = _forward(hf32, name, ids, mask, pixels)[real]
    theirs = _forward(hf16, name, ids, mask, pixels)[real]
    ours = model.logits(ids, mask, pixels)[real]
    gap = kl(reference, theirs)  # transformers' own bfloat16-vs-float32 gap
    assert kl(reference, ours) <= 1.5 * gap, (kl(reference, ours), gap)
    assert agreement(reference, ours) >= agreement(reference, theirs) - 0.03
    assert kl(theirs, ours) <= 2 * gap, (kl(theirs, ours), gap)


def test_compute_and_cache_dtypes_apart_from_the_params(tmp_path):
    """bfloat16 weights computed in float32 are the float32 computation of those rounded weights; a bfloat16
    cache under a float32 computation halves the cache and stays close to the float32 answer."""
    import jax
    import jax.numpy as jnp
    import jaxvlm
    hf = hf_models.build("gemma2", seed=1)
    folder = convert(hf_models.save(hf, str(tmp_path / "hf")), str(tmp_path / "jax"), progress=False)
    ids, mask = hf_models.left_pad(hf_models.prompts(2, [6, 11]))
    wide = jaxvlm.load(folder, dtype="bfloat16", compute_dtype="float32")
    assert wide.dtype == jnp.float32 and wide.cache_dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(wide.params)} == {jnp.dtype(jnp.bfloat16)}
    upcast = jaxvlm.Model(wide.config, jax.tree.map(lambda x: x.astype(jnp.float32), wide.params), wide.tokenizer)
    np.testing.assert_allclose(wide.logits(ids, mask), upcast.logits(ids, mask), atol=1e-5)
    narrow = jaxvlm.load(folder, dtype="bfloat16")
    assert np.abs(narrow.logits(ids, mask) - upcast.logits(ids, mask)).max() > 1e-3  # computed in bfloat16

    full = jaxvlm.load(folder)
    half = jaxvlm.load(folder, cache_dtype="bfloat16")
    assert half.dtype == jnp.float32 and half.cache_dtype == jnp.bfloat16 and "cache_dtype=bfloat16" in repr(half)
    tokens, scores = full.generate_ids(ids, mask, max_new_tokens=6, logprobs=True)
    half_tokens, half_scores = half.generate_ids(ids, mask, max_new_tokens=6, logprobs=True)
    np.testing.assert_array_equal(half_tokens[:, 0], tokens[:, 0])
    np.testing.assert_allclose(half_scores, scores, atol=0.05)
    from jaxvlm.engine import Engine
    assert {x.dtype for x in jax.tree.leaves(Engine(half, slots=2, cache_size=64).state.cache.k)} == {
        jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        jaxvlm.load(folder, cache_dtype="float16")
