"""Prefill's attention through jax's splash attention kernel (TPU's; here in Pallas' interpret mode) against
the einsum path on the same weights: causal, sliding-window and soft-capped layers, padded rows, unrolled
and scanned layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import splash
from jaxvlm.config import DecoderConfig, ModelConfig
from jaxvlm.generate import right_align
from jaxvlm.inputs import Inputs
from jaxvlm.kv_cache import KVCache, ring_slots
from jaxvlm.vlm import VisionLanguageModel

# Gemma 2's shape of layers (local and global, soft-caps, grouped kv heads) and a plain causal one
CONFIGS = {
    "windowed": DecoderConfig(vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=96,
                              mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True,
                              use_post_norms=True, query_pre_attn_scalar=32, attn_logit_softcap=50.0,
                              final_logit_softcap=30.0, sliding_window=40, layer_types=("local", "global")),
    "causal": DecoderConfig(vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=1, head_dim=32, mlp_dim=96,
                            use_qk_norm=True),
}


def prefill_logits(config: ModelConfig, params, tokens, valid, scanned: bool, kernel: bool):
    """Every position's logits of a prompt run into a fresh cache, and the cache, the kernel serving its
    attention or not."""
    model = VisionLanguageModel(config, jnp.float32, scan_layers=scanned)
    cache = KVCache.init(config.decoder, tokens.shape[0], 256, jnp.float32, stacked=scanned)

    def run(params):
        if not kernel:
            return model.apply({"params": params}, Inputs.build(config, tokens, valid), cache)
        with splash.use(interpret=True):
            return model.apply({"params": params}, Inputs.build(config, tokens, valid), cache)
    with jax.default_matmul_precision("highest"):  # the kernel's products are float32's; so are the einsums'
        out = jax.jit(run)(params)
    return np.asarray(out.logits), out.cache


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_kernel_matches_the_einsum_path(name, scanned):
    config = ModelConfig(decoder=CONFIGS[name])
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 128, size=n) for n in (128, 75)]  # the second row padded on the left
    tokens, valid = right_align(rows, 128, 0)
    model = VisionLanguageModel(config, jnp.float32, scan_layers=scanned)
    params = model.init(jax.random.key(1), Inputs.build(config, tokens, valid))["params"]
    if CONFIGS[name].attn_logit_softcap:  # logits large enough for the soft-caps to bend them
        params = jax.tree.map(lambda x: x * 3, params)
    assert splash.supported(jnp.zeros((2, 128, 4, 32)), jnp.zeros((2, 128, 2, 32))) is False  # not asked for
    want, want_cache = prefill_logits(config, params, tokens, valid, scanned, kernel=False)
    got, got_cache = prefill_logits(config, params, tokens, valid, scanned, kernel=True)
    np.testing.assert_allclose(got[valid], want[valid], rtol=2e-5, atol=2e-5)
    held = np.asarray(want_cache.valid)  # (padding's keys differ: a padding query attends to padding alone)
    np.testing.assert_array_equal(np.asarray(got_cache.valid), held)
    for a, b in zip(jax.tree.leaves((got_cache.k, got_cache.v)), jax.tree.leaves((want_cache.k, want_cache.v))):
        a, b = np.asarray(a), np.asarray(b)
        slots = np.asarray(ring_slots(want_cache.end, a.shape[-3]))  # the sequence slot each entry holds
        kept = (slots >= 0)[None] & held[:, np.maximum(slots, 0)]
        np.testing.assert_allclose(a[..., kept, :, :], b[..., kept, :, :], rtol=2e-5, atol=2e-5)
    assert not np.isnan(got).any()  # padding queries attend to padding: finite


def test_the_kernel_is_taken_only_where_it_serves():
    """A prompt whose length is no multiple of 128, or attention weights asked for, keep the einsum path."""
    with splash.use(interpret=True):
        assert splash.supported(jnp.zeros((1, 256, 4, 32)), jnp.zeros((1, 256, 2, 32)))
        assert not splash.supported(jnp.zeros((1, 200, 4, 32)), jnp.zeros((1, 200, 2, 32)))


@pytest.mark.parametrize("bounded, longest, scanned", [(False, None, True), (True, 24, False)],
                         ids=["prefix_past_the_window", "image_blocks"])
def test_bidirectional_blocks_take_the_kernel_and_match_the_einsum_path(bounded, longest, scanned):
    """PaliGemma 2's prefix (a block of 70 tokens, longer than the window of 40, which does not bound it)
    and Gemma 3's images (blocks of 24 tokens that the window bounds, the band as wide as the longest
    block): the causal part and the block's other keys, two kernel calls merged, give the einsum path's
    logits, padded row included."""
    from jaxvlm.decoder import Decoder
    from jaxvlm.masks import blocks_of_runs, token_positions
    c = CONFIGS["windowed"]
    rng = np.random.default_rng(2)
    tokens, valid = right_align([rng.integers(1, 128, size=n) for n in (128, 90)], 128, 0)
    index = np.arange(128)[None] - (128 - valid.sum(axis=1))[:, None]  # each token's place in its row
    if bounded:
        marked = valid & (((index >= 10) & (index < 34)) | ((index >= 50) & (index < 74)))
        blocks = np.asarray(blocks_of_runs(jnp.asarray(marked)))
    else:
        blocks = np.where(valid & (index < 70), 0, -1).astype(np.int32)
    decoder = Decoder(c, jnp.float32, scan_layers=scanned, window_bounds_blocks=bounded, longest_block=longest)
    positions = token_positions(jnp.asarray(valid))
    params = decoder.init(jax.random.key(3), tokens, positions, valid, blocks=blocks)["params"]
    params = jax.tree.map(lambda x: x * 3, params)  # logits large enough for the soft-caps to bend them

    def logits(kernel: bool):
        run = lambda p: decoder.apply({"params": p}, tokens, positions, valid, blocks=blocks).logits
        with jax.default_matmul_precision("highest"):
            if not kernel:
                return np.asarray(jax.jit(run)(params))
            with splash.use(interpret=True):
                return np.asarray(jax.jit(run)(params))

    want, got = logits(False), logits(True)
    np.testing.assert_allclose(got[valid], want[valid], rtol=2e-5, atol=2e-5)


def test_an_image_encoders_full_attention_takes_the_kernel():
    """A SigLIP-shaped encoder over 256 patches, its layers scanned, inside prefill (as `splash.use` marks
    it): every patch attends to every other through the kernel, and the features are the einsum path's."""
    import dataclasses
    from jaxvlm.shapes.train import CONFIG
    from jaxvlm.vision import VisionEncoder
    c = dataclasses.replace(CONFIG.vision, image_size=128, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
    encoder = VisionEncoder(c, jnp.float32, scan_layers=True)
    pixels = np.random.default_rng(4).uniform(-1, 1, (2, 128, 128, 3)).astype(np.float32)
    params = encoder.init(jax.random.key(5), pixels)["params"]
    params = jax.tree.map(lambda x: x * 2, params)  # attention far from uniform
    # a function each: jax's caches do not key on `splash.use`, which acts while a function is traced
    einsum_path, kernel_path = (lambda p: encoder.apply({"params": p}, pixels) for _ in range(2))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(jax.jit(einsum_path)(params))
        with splash.use(interpret=True):
            assert "pallas_call" in str(jax.make_jaxpr(kernel_path)(params))
            got = np.asarray(jax.jit(kernel_path)(params))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
