"""Attention through `jax.nn.dot_product_attention` against the spelled-out grouped einsum, with every
kind of mask the models build; on a GPU, cuDNN's flash attention against XLA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.attention import Attention, fused_attention
from jaxvlm.masks import blocks_of_prefix, blocks_of_runs, decoder_mask


def _masks(B=2, T=12):
    """Left padding (row 0 has 4 padding slots), causal, a window of 5, a bidirectional prefix of 7, two
    bidirectional images (slots 5-7 and 9-11) under a window of 2 that bounds them."""
    valid = jnp.ones((B, T), bool).at[0, :4].set(False)
    prefix = blocks_of_prefix(valid & (jnp.arange(T) < 7)[None])
    images = blocks_of_runs(jnp.broadcast_to(jnp.isin(jnp.arange(T), jnp.array([5, 6, 7, 9, 10, 11])), (B, T)))
    return {"causal": decoder_mask(valid, 0, T), "window": decoder_mask(valid, 0, T, 5),
            "prefix": decoder_mask(valid, 0, T, None, (prefix, prefix)),
            "prefix+window": decoder_mask(valid, 0, T, 5, (prefix, prefix)),
            "images+window": decoder_mask(valid, 0, T, 2, (images, images), window_bounds_blocks=True), "none": None}


def test_blocks_and_windows_compose_as_transformers_masks():
    """PaliGemma 2: a prefix block sees itself beyond the window; Gemma 3: an image sees itself in both
    directions, and the window still bounds it (slot 11 sees 10 and 11 only; slot 9 sees 8 to 11)."""
    m = _masks()
    prefix_window = np.asarray(m["prefix+window"][1])
    assert prefix_window[0, 6] and not prefix_window[7, 0] and prefix_window[7, 3]
    images = np.asarray(m["images+window"][1])
    assert np.flatnonzero(images[11]).tolist() == [10, 11]
    assert np.flatnonzero(images[9]).tolist() == [8, 9, 10, 11]
    assert np.flatnonzero(images[5]).tolist() == [4, 5, 6, 7] and np.flatnonzero(images[8]).tolist() == [7, 8]


@pytest.mark.parametrize("mask_kind", list(_masks()))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_fused_attention_is_the_grouped_einsum(mask_kind, heads, kv_heads):
    """The module's fused path equals its einsum path (taken when the weights are kept for inspection),
    padding queries (fully masked rows) included."""
    mask = _masks()[mask_kind]
    attn = Attention(heads, kv_heads, 8, query_scale=8 ** -0.5, qkv_bias=True)
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    params = attn.init(jax.random.key(1), x, None, mask)
    fused, _ = attn.apply(params, x, None, mask)
    (spelled, _), state = attn.apply(params, x, None, mask, mutable=["intermediates"])
    assert "attention" in state["intermediates"]
    np.testing.assert_allclose(fused, spelled, rtol=1e-5, atol=1e-6)


def test_soft_capped_logits_take_the_einsum():
    """Gemma 2's soft-cap is not expressible in the fused function: the cap changes the output."""
    x = jax.random.normal(jax.random.key(0), (1, 6, 32)) * 4
    capped = Attention(4, 2, 8, query_scale=1.0, logit_softcap=0.5)
    plain = capped.clone(logit_softcap=None)
    params = plain.init(jax.random.key(1), x)
    assert not np.allclose(capped.apply(params, x)[0], plain.apply(params, x)[0], atol=1e-3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's flash attention needs a GPU")
@pytest.mark.parametrize("mask_kind", list(_masks()))
def test_cudnn_flash_attention_matches_xla_on_gpu(mask_kind):
    mask = _masks(T=128)[mask_kind] if mask_kind != "none" else None
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 128, 8, 64), jnp.bfloat16)
    k, v = (jax.random.normal(key, (2, 128, 2, 64), jnp.bfloat16) for key in keys[1:])
    run = lambda impl: jax.jit(lambda q, k, v: fused_attention(q, k, v, mask, 0.125, impl))
    assert "cudnn" in run(None).lower(q, k, v).compile().as_text().lower()
    np.testing.assert_allclose(np.asarray(run(None)(q, k, v), np.float32),
                               np.asarray(run("xla")(q, k, v), np.float32), atol=2e-2)
