"""The KV cache: circular slots, ring buffers for sliding-window layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import layout, presets
from jaxvlm.memory import tree_bytes as nbytes
from jaxvlm.kv_cache import KVCache, ring_slots, ring_write
from jaxvlm.inputs import Inputs
from jaxvlm.vlm import VisionLanguageModel


def test_ring_slots_and_writes():
    ring = jnp.zeros((1, 4, 1), jnp.int32)
    for end, new in [(0, [0, 1, 2]), (3, [3]), (4, [4, 5, 6, 7, 8, 9])]:  # a write longer than the ring
        ring = ring_write(ring, jnp.asarray(new)[None, :, None], jnp.int32(end))
    # slot s sits at s % 4, and the latest four slots are kept
    np.testing.assert_array_equal(ring[0, :, 0], [8, 9, 6, 7])
    np.testing.assert_array_equal(ring_slots(jnp.int32(10), 4), [8, 9, 6, 7])
    np.testing.assert_array_equal(ring_slots(jnp.int32(2), 4), [0, 1, -2, -1])  # negative: never written


def test_sliding_window_layers_keep_a_window_of_cache():
    """Gemma 2 2B's cache for 8192 tokens, computed without allocating: its 13 local layers keep 4096
    slots each, its 13 global layers 8192 (stacked layers keep one size for all)."""
    config = presets.get("gemma-2-2b").decoder
    ring = jax.eval_shape(lambda: KVCache.init(config, 1, 8192, jnp.bfloat16))
    full = jax.eval_shape(lambda: KVCache.init(config, 1, 8192, jnp.bfloat16, stacked=True))
    assert [k.shape[1] for k in ring.k] == [4096, 8192] * 13
    per_slot = 2 * config.num_kv_heads * config.head_dim * 2  # k and v, bfloat16
    assert nbytes(ring) == (13 * 4096 + 13 * 8192) * per_slot + 8192 + 4  # + valid flags and end
    assert nbytes(full) == 26 * 8192 * per_slot + 8192 + 4


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_prefill_in_chunks_through_a_ring(family, convert_and_load):
    """A prompt run in chunks (the second attends over the ring before its write, and itself) and then
    token by token (over the ring after each write) gives the logits of one forward without a cache."""
    from tests import hf_models
    model = convert_and_load(hf_models.build(family, seed=2), f"{family}-ring")
    window = model.config.decoder.sliding_window
    net = VisionLanguageModel(model.config.computation)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, size=(2, 24)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    valid = jnp.ones((2, 24), bool)
    apply = jax.jit(lambda t, p, v, *cache: net.apply({"params": model.params}, Inputs(t, v, p), *cache))
    want = apply(tokens, positions, valid).logits
    cache = KVCache.init(model.config.decoder, 2, 64, jnp.float32)
    assert min(k.shape[1] for k in cache.k) == window < 64
    got = []
    for start, stop in [(0, 10), (10, 17)] + [(t, t + 1) for t in range(17, 24)]:
        out = apply(tokens[:, start:stop], positions[:, start:stop], valid[:, start:stop], cache)
        got.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, stacked", [("gemma2", False), ("gemma2", True), ("qwen3", False)])
def test_a_cache_is_circular(family, stacked, convert_and_load):
    """A row's tokens may start at any slot: the same cache turned r slots further round (its rows straddling
    the end, the cursor r further on) decodes to the same logits, through global layers, ring-buffered
    local layers and a stack alike. So a cursor never runs out, and a request can sit in any row."""
    from tests import hf_models
    model = convert_and_load(hf_models.build(family, seed=2), f"{family}-circular")
    config = model.config.computation
    net = VisionLanguageModel(config, scan_layers=stacked)
    params = jax.jit(lambda p: layout.relayout(p, stacked=True))(model.params) if stacked else model.params
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, size=(2, 12)), jnp.int32)
    valid = jnp.ones((2, 12), bool).at[1, :4].set(False)  # row 1 has 8 tokens, padding first
    apply = jax.jit(lambda inputs, cache: net.apply({"params": params}, inputs, cache))
    cache = KVCache.init(config.decoder, 2, 16, jnp.float32, stacked)
    out = apply(Inputs.build(config, tokens, valid), cache)
    positions = Inputs.build(config, tokens, valid).positions[:, -1] + 1

    def turned(cache: KVCache, r: int) -> KVCache:
        roll = lambda x: jnp.roll(x, r, axis=-3)  # the slot axis of [B, S, K, H] and [L, B, S, K, H]
        return KVCache(k=jax.tree.map(roll, cache.k), v=jax.tree.map(roll, cache.v), end=cache.end + r,
                       valid=jnp.roll(cache.valid, r, axis=1))

    for r in (0, 7, 13):
        state, logits = turned(out.cache, r), []
        for step in range(4):  # the cursor crosses the end of the 16 slots on the way
            token = jnp.asarray([5 + step, 9 + step], jnp.int32)
            o = apply(Inputs.next_tokens(token, positions + step), state)
            logits.append(o.logits)
            state = o.cache
        if r == 0:
            want = logits
        np.testing.assert_allclose(np.concatenate(logits), np.concatenate(want), atol=1e-5, err_msg=f"turned {r}")
