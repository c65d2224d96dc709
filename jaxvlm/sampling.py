"""Choosing the next token from logits, with each row's own settings: greedy, or sampling with temperature,
top-k and top-p, from a key of the row's own (its seed and its step). One compiled program serves any mix of
settings: they are arrays [B], never static arguments, and a row's tokens never depend on its neighbours.

The filters apply in transformers' order (temperature, then top-k, then top-p) with its conventions:
top-k keeps every token tied with the k-th, top-p drops the smallest tokens whose cumulative probability
stays within 1 - p and always keeps the most likely one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvlm import checks


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float = 1.0) -> None:
    if checks.number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    checks.optional_integer("top_k", top_k, 1)
    checks.optional_number("top_p", top_p, low=0, high=1, low_open=True)
    checks.number("repetition_penalty", repetition_penalty, low=0, low_open=True)


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the same order (a negative float's other bits count down; -0.0 is 0.0's tie)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


WAYS = 64  # a search's ways (a power of two): WAYS - 1 thresholds tried a pass


def _smallest(holds, low: jax.Array, high: jax.Array, bits: int = 32) -> jax.Array:
    """Per row, the smallest int32 t in [low, high] [B] for which `holds` is true, where it is false below
    some t and true from there on (and true at high). `holds(ts)` takes int32[B, m] and gives bool[B, m]:
    a search of WAYS ways, each step one pass over the rows that tries WAYS - 1 thresholds at once (a
    bisection would pass over them 6 times as often: 29 MB a step instead of 150 MB for Gemma-2-2B's
    logits at batch 8 on v5e:2x2), for a range of 2**bits values. (Unrolled, so that
    the compiler's cost model counts every pass.)"""
    flip = jnp.uint32(0x80000000)  # int32's order as uint32's, so that widths never overflow
    unsigned = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint32) ^ flip
    signed = lambda u: jax.lax.bitcast_convert_type(u ^ flip, jnp.int32)
    j = jnp.arange(1, WAYS, dtype=jnp.uint32)

    def step(_, bounds):
        low, high = bounds  # all below low fail; high holds
        width = (high - low)[:, None]
        tried = low[:, None] + width // WAYS * j + width % WAYS * j // WAYS  # [B, WAYS - 1], within [low, high)
        ok = holds(signed(tried))
        first = jnp.argmax(ok, axis=-1)[:, None]
        held, below = jnp.take_along_axis(tried, first, axis=-1)[:, 0], jnp.take_along_axis(
            tried, jnp.maximum(first - 1, 0), axis=-1)[:, 0] + 1
        found = ok.any(axis=-1)
        return (jnp.where(found, jnp.where(first[:, 0] > 0, below, low), tried[:, -1] + 1),
                jnp.where(found, held, high))

    steps = -(-bits // (WAYS.bit_length() - 1)) + 1
    return signed(jax.lax.fori_loop(0, steps, step, (unsigned(low), unsigned(high)), unroll=True)[1])


def filtered(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits float32[B, V] divided by each row's temperature [B] (> 0), then masked (-inf) outside its top
    k [B] (0: no limit) and its top-p nucleus [B] (1: all), as a descending sort of each row would (ties in
    index order) but without one: a sort of the vocabulary is many passes over it on TPU (a bitonic network;
    for 256k float32 logits a row, 2.6 GB read a step of Gemma 2 at batch 8). Each threshold is searched
    for over the values instead (`_smallest`, 63 thresholds a pass): the k-th largest value, the smallest
    value whose betters hold less than p of the probability, and among the tokens tied at it, as many as a
    sort keeps."""
    logits = logits / temperature[:, None]
    B, V = logits.shape
    rows = lambda x: x[:, None]
    keys = _sortable(logits)
    # top-k keeps every token tied with the k-th largest: the smallest value with fewer than k above it
    k = jnp.clip(top_k, 1, V)
    over = lambda t: keys[:, :, None] > t[:, None, :]  # [B, V, m] for thresholds t [B, m] (fused, never held)
    kth = _smallest(lambda t: jnp.sum(over(t), axis=1) < k[:, None], keys.min(axis=-1), keys.max(axis=-1))
    logits = jnp.where(rows(top_k > 0) & (keys < rows(kth)), -jnp.inf, logits)
    keys = _sortable(logits)
    # top-p: a token is dropped when the tokens ranked above it already hold p of the probability
    probs = jax.nn.softmax(logits, axis=-1)
    above = lambda t: jnp.sum(jnp.where(over(t), probs[:, :, None], 0.0), axis=1)
    last = _smallest(lambda t: above(t) < top_p[:, None], keys.min(axis=-1), keys.max(axis=-1))  # last value kept
    tied = keys == rows(last)
    share = jnp.max(jnp.where(tied, probs, 0.0), axis=-1)
    # the j-th of the tied tokens (in index order) has above(last) + j * share ranked above it
    kept = jnp.clip(jnp.ceil((top_p - above(last[:, None])[:, 0]) / share), 1, jnp.sum(tied, axis=-1)).astype(jnp.int32)
    index = jnp.arange(V)
    through = _smallest(lambda i: jnp.sum(tied[:, :, None] & (index[None, :, None] <= i[:, None, :]), axis=1)
                        >= kept[:, None], jnp.zeros(B, jnp.int32), jnp.full(B, V - 1, jnp.int32),
                        bits=max(1, (V - 1).bit_length()))
    drop = (keys < rows(last)) | (tied & (index > rows(through)))
    return jnp.where(rows(top_p < 1) & drop, -jnp.inf, logits)


def sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits float32[B, V] -> int32[B]: the argmax where a row's temperature is 0, else a draw from its
    filtered distribution with the key (seed [B], step [B]). All rows greedy: no sort, no draw."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        sampled = temperature > 0
        scores = filtered(logits, jnp.where(sampled, temperature, 1.0), top_k, top_p)
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)
        choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scores).astype(jnp.int32)
        return jnp.where(sampled, choice, greedy)

    return jax.lax.cond((temperature > 0).any(), draw, lambda: greedy)
