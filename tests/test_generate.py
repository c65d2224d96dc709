"""The KV cache and decode loop against a full forward, compilation counts, and the sampling filters."""

from __future__ import annotations

import logging

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import generate, sampling
from jaxvlm.config import DecoderConfig, ModelConfig, RopeConfig, TokensConfig
from jaxvlm.decoder import Decoder
from jaxvlm.kv_cache import KVCache
from jaxvlm.model import Model

CONFIGS = {
    "gemma2_like": DecoderConfig(vocab_size=97, width=32, depth=3, num_heads=4, num_kv_heads=2, head_dim=8,
                                 mlp_dim=48, mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True,
                                 use_post_norms=True, attn_logit_softcap=4.0, final_logit_softcap=5.0,
                                 sliding_window=5, layer_types=("local", "global", "local")),
    "qwen3_like": DecoderConfig(vocab_size=97, width=32, depth=2, num_heads=4, num_kv_heads=1, head_dim=16,
                                mlp_dim=48, use_qk_norm=True, qkv_bias=True, tie_embeddings=True),
    "phi3_like": DecoderConfig(vocab_size=97, width=32, depth=2, num_heads=4, num_kv_heads=4, head_dim=8,
                               mlp_dim=48, rope=RopeConfig(rotary_fraction=0.5)),
}


def random_params(config: DecoderConfig, seed):
    """Random params of the decoder's shapes, drawn by numpy: the model's own initializers compile a program
    a config (5-14 s each here), and these tests want no particular init, only weights far from trivial
    (norm scales and biases too)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens, tokens, tokens > -1)["params"])
    rng = np.random.default_rng(seed)
    draw = lambda s: (rng.standard_normal(s.shape) * (s.shape[0] ** -0.5 if len(s.shape) > 1 else 0.3)
                      + (len(s.shape) == 1)).astype(np.float32)
    return {"decoder": jax.tree.map(draw, nn.meta.unbox(shapes))}


def random_model(config: DecoderConfig, seed=0) -> Model:
    return Model(ModelConfig(decoder=config, tokens=TokensConfig(eos_ids=(), pad_id=0)), random_params(config, seed))


def test_a_pad_id_past_the_vocabulary_is_never_looked_up():
    """A config naming no pad id pads with its end-of-sequence id, which may lie past the vocabulary (a tiny
    model with a released model's special ids): a padded batch gets the tokens it gets padded with id 0."""
    config = CONFIGS["qwen3_like"]
    model = Model(ModelConfig(decoder=config, tokens=TokensConfig(eos_ids=(), pad_id=config.vocab_size + 5)),
                  random_params(config, 0))
    ids = np.full((2, 9), model.config.tokens.pad_id)
    ids[0], ids[1, 5:] = np.arange(3, 12), np.arange(20, 24)
    valid = ids != model.config.tokens.pad_id
    got = model.generate_ids(ids, valid, max_new_tokens=4)  # (NaN-poisoned before: "not finite")
    np.testing.assert_array_equal(got, model.generate_ids(np.where(valid, ids, 0), valid, max_new_tokens=4))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
    """Logits from a prefill plus one-token cached steps equal one uncached forward over the whole sequence."""
    config = CONFIGS[name]
    model = random_model(config)
    rng = np.random.default_rng(0)
    seq = rng.integers(1, config.vocab_size, size=(2, 16))
    lengths = [9, 6]  # row 1 is left-padded by 3 in the prompt
    full = [model.logits(seq[i, : 9 + 7][None] if i == 0 else seq[i, : 6 + 7][None])[0] for i in range(2)]

    tokens, valid = generate.right_align([seq[0, :9], seq[1, :6]], 9, 0)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    decoder = Decoder(config)
    apply = jax.jit(lambda p, t, pos, v, c: decoder.apply({"params": p}, t, pos, v, c))
    out = apply(model.params["decoder"], tokens, positions, valid, KVCache.init(config, 2, 32, jnp.float32))
    got = [[out.logits[0, -1]], [out.logits[1, -1]]]
    cache, pos = out.cache, positions[:, -1]
    for step in range(6):
        pos = pos + 1
        nxt = np.stack([seq[0, 9 + step], seq[1, 6 + step]])[:, None]
        out = apply(model.params["decoder"], nxt, pos[:, None], np.ones((2, 1), bool), cache)
        cache = out.cache
        for i in range(2):
            got[i].append(out.logits[i, 0])
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(np.stack(got[i]), full[i][n - 1: n + 6], atol=2e-5, rtol=0)


def test_prompt_lengths_in_a_bucket_compile_once(caplog):
    model = random_model(CONFIGS["qwen3_like"])
    rng = np.random.default_rng(1)
    model.generate_ids(rng.integers(1, 97, size=(2, 3)), max_new_tokens=8)  # warm up (bucket 16)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        for length in (4, 7, 11, 16):
            model.generate_ids(rng.integers(1, 97, size=(2, length)), max_new_tokens=8)
        same_bucket = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
        caplog.clear()
        model.generate_ids(rng.integers(1, 97, size=(2, 17)), max_new_tokens=8)  # next bucket: 32
        next_bucket = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert same_bucket == [], same_bucket
    assert any("prefill" in m for m in next_bucket), next_bucket


def test_host_only_settings_never_recompile(caplog):
    """Special tokens, prompt format, image processing and label names stay out of the jit key."""
    import dataclasses
    from jaxvlm.config import ImageProcessing
    model = random_model(CONFIGS["qwen3_like"])
    prompt = np.random.default_rng(3).integers(1, 97, size=(2, 5))
    model.generate_ids(prompt, max_new_tokens=4)
    model.logits(prompt)
    variants = [dict(tokens=TokensConfig(bos_id=2, eos_ids=(5, 6, 7), pad_id=1, add_bos=True)),
                dict(prompt_format="images_first"), dict(image_processing=ImageProcessing(size=(32, 32)))]
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        for change in variants:
            model.config = dataclasses.replace(model.config, **change)
            model.generate_ids(prompt, max_new_tokens=4)
            model.logits(prompt)
        compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled


def test_sampling_settings_never_recompile_and_rows_keep_their_tokens(caplog):
    """Temperature, top-k, top-p, seed and min_new_tokens are arrays a row: any mix runs the compiled
    programs, and a row's sampled tokens do not depend on what shares its batch."""
    model = random_model(CONFIGS["qwen3_like"])
    prompt = np.random.default_rng(3).integers(1, 97, size=(2, 5))
    model.generate_ids(prompt, max_new_tokens=4, temperature=0.9, top_k=5, top_p=0.8, seed=1)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        for settings in [dict(temperature=0.0), dict(temperature=1.5, top_k=2, seed=7), dict(temperature=0.7, top_p=0.3),
                         dict(temperature=1.0, min_new_tokens=3, seed=2**32 - 1)]:
            model.generate_ids(prompt, max_new_tokens=4, **settings)
        compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled
    both = model.generate_ids(prompt, max_new_tokens=6, temperature=1.0, seed=5)
    alone = [model.generate_ids(prompt[i:i + 1], max_new_tokens=6, temperature=1.0, seed=5)[0] for i in range(2)]
    np.testing.assert_array_equal(both, np.stack(alone))


def test_the_decode_program_can_be_read():
    model = random_model(CONFIGS["qwen3_like"])
    program = model.decode_program(np.random.default_rng(4).integers(1, 97, size=(2, 5)))
    assert program.startswith("HloModule") and "while" in program


def test_eos_pads_the_rest_of_the_row():
    model = random_model(CONFIGS["phi3_like"])
    prompt = np.random.default_rng(2).integers(1, 97, size=(1, 5))
    free = model.generate_ids(prompt, max_new_tokens=12)
    eos = int(free[0, 3])
    first = int(np.argmax(free[0] == eos))
    model.config = ModelConfig(decoder=model.config.decoder, tokens=TokensConfig(eos_ids=(eos,), pad_id=0))
    out = model.generate_ids(prompt, max_new_tokens=12)
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1:] == 0).all()


# --- sampling filters against transformers' warpers ----------------------------------------------------
def test_top_k_and_top_p_match_transformers_warpers():
    """Each row with its own top-k and top-p, in one call, as transformers' warpers filter them (top-k, then
    top-p of what is left)."""
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32) * 3
    logits[0, :5] = logits[0, 5]  # ties at the k-th value
    ones = np.ones(4, np.float32)
    for k in (1, 5, 17):
        want = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
        got = sampling.filtered(jnp.asarray(logits), ones, np.full(4, k, np.int32), ones)
        np.testing.assert_array_equal(np.asarray(got), want)
    for p in (0.05, 0.5, 0.9, 0.99):
        want = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        got = sampling.filtered(jnp.asarray(logits), ones, np.zeros(4, np.int32), np.full(4, p, np.float32))
        np.testing.assert_array_equal(np.asarray(got), want)
    k, p = np.asarray([3, 0, 7, 1], np.int32), np.asarray([0.5, 0.9, 1.0, 0.3], np.float32)
    want = np.stack([TopPLogitsWarper(float(p[i]))(None, TopKLogitsWarper(int(k[i]) or 50)(
        None, torch.tensor(logits[i:i + 1]))).numpy()[0] for i in range(4)])
    np.testing.assert_array_equal(np.asarray(sampling.filtered(jnp.asarray(logits), ones, k, p)), want)


def test_top_p_keeps_as_many_tokens_tied_at_its_edge_as_a_sort_does():
    """Tokens tied at the nucleus' edge: a descending sort (ties in index order) keeps the first of them
    until the probability ranked above reaches p; the bisection keeps the same ones."""
    logits = np.log(np.asarray([[0.1, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]] * 4, np.float32))
    top_p = np.asarray([0.35, 0.45, 0.65, 0.99], np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    order = np.argsort(-logits, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1)
    drop_ranked = (np.cumsum(ranked, axis=-1) - ranked) >= top_p[:, None]
    want = np.where(np.take_along_axis(drop_ranked, np.argsort(order, axis=-1), axis=-1), -np.inf, logits)
    ones = np.ones(4, np.float32)
    got = np.asarray(sampling.filtered(jnp.asarray(logits), ones, np.zeros(4, np.int32), top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert [int(np.isfinite(row).sum()) for row in got] == [2, 3, 5, 8]


def test_top_k_ties_negative_and_positive_zero():
    """-0.0 and 0.0 are one value: tied at the k-th, both kept (the thresholds are searched over the
    floats' bit patterns, where they differ)."""
    logits = np.asarray([[1.0, -0.0, 0.0, -1.0]], np.float32)
    got = np.asarray(sampling.filtered(jnp.asarray(logits), np.ones(1, np.float32), np.full(1, 2, np.int32),
                                       np.ones(1, np.float32)))
    assert np.isfinite(got).tolist() == [[True, True, True, False]]


def test_sampling_follows_the_filtered_distribution_with_a_key_per_row():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2))
    draw = jax.jit(jax.vmap(lambda seed: sampling.sample(logits, jnp.stack([seed, seed + 1]), jnp.zeros(2, jnp.int32),
                                                         jnp.asarray([1.0, 0.0]), jnp.zeros(2, jnp.int32),
                                                         jnp.asarray([0.7, 1.0]))))
    out = np.asarray(draw(jnp.arange(4000, dtype=jnp.uint32) * 2))
    counts = np.bincount(out[:, 0], minlength=4) / 4000
    # top-p 0.7 keeps {0.5, 0.3}: renormalised to 0.625 / 0.375; the greedy row beside it stays greedy
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
    assert (out[:, 1] == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
])
def test_bad_generation_arguments(kwargs, message):
    model = random_model(CONFIGS["qwen3_like"])
    with pytest.raises(ValueError, match=message):
        model.generate_ids(np.ones((1, 4), np.int32), **kwargs)


def test_prompt_longer_than_context():
    config = DecoderConfig(vocab_size=97, width=32, depth=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=32,
                           max_position_embeddings=20)
    model = random_model(config)
    with pytest.raises(ValueError, match="longer than the model's context of 20"):
        model.generate_ids(np.ones((1, 25), np.int32), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=8.*context of 20"):
        model.generate_ids(np.ones((1, 15), np.int32), max_new_tokens=8)
    with pytest.raises(ValueError, match="context of 20"):
        model.logits(np.ones((1, 21), np.int32))


def test_bad_inputs_are_named():
    model = random_model(CONFIGS["qwen3_like"])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), input_ids \(1, 4\)"):
        model.logits(np.ones((1, 4), np.int32), np.ones((1, 3), np.int32))
    with pytest.raises(ValueError, match=r"row 1 holds token ids outside \[0, 97\)"):
        model.generate_ids(np.array([[1, 2], [3, 97]]))
    with pytest.raises(ValueError, match="row 0 has no tokens"):
        model.generate_ids(np.array([[1, 2]]), np.array([[0, 0]]))


def test_prompt_buckets_bound_padding_and_count():
    from jaxvlm.generate import prompt_bucket
    buckets = [prompt_bucket(n) for n in range(1, 8193)]
    assert all(b >= n for n, b in enumerate(buckets, 1)) and buckets == sorted(buckets)
    assert all((b - n) / n < 0.25 for n, b in enumerate(buckets, 1) if n > 128)
    assert len(set(buckets)) == 4 + 4 * 6  # 16, 32, 64, 128; then four per doubling up to 8192
    assert prompt_bucket(16 * 16 + 12) == 320  # a PaliGemma-224 prompt
