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


def filtered(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits float32[B, V] divided by each row's temperature [B] (> 0), then masked (-inf) outside its top
    k [B] (0: no limit) and its top-p nucleus [B] (1: all), with one sort of each row."""
    logits = logits / temperature[:, None]
    order = jnp.argsort(-logits, axis=-1)  # descending
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    V = logits.shape[-1]
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
    logits = jnp.where((top_k[:, None] > 0) & (logits < kth), -jnp.inf, logits)
    ranked = jnp.where((top_k[:, None] > 0) & (ranked < kth), -jnp.inf, ranked)
    # top-p: a token is dropped when the tokens ranked above it already hold p of the probability
    before = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1) - jax.nn.softmax(ranked, axis=-1)
    drop_ranked = (before >= top_p[:, None]).at[:, 0].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_ranked).at[rows, order].set(drop_ranked)
    return jnp.where(drop, -jnp.inf, logits)


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
