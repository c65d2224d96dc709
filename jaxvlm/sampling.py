"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The filters apply in transformers' order (temperature, then top-k, then top-p) with its conventions:
top-k keeps every token tied with the k-th, top-p drops the smallest tokens whose cumulative probability
stays within 1 - p and always keeps the most likely one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxvlm import checks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler:
    """The static part of a sampling choice (jit specialises on it); temperature and top_p are traced."""

    greedy: bool = True
    top_k: int | None = None
    use_top_p: bool = False
    penalize: bool = False  # a repetition penalty other than 1 (its value is traced)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float = 1.0) -> None:
    if checks.number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    checks.optional_integer("top_k", top_k, 1)
    checks.optional_number("top_p", top_p, low=0, high=1, low_open=True)
    checks.number("repetition_penalty", repetition_penalty, low=0, low_open=True)


def make_sampler(temperature: float, top_k: int | None, top_p: float | None,
                 repetition_penalty: float = 1.0) -> Sampler:
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    penalize = repetition_penalty != 1
    if temperature == 0:
        return Sampler(penalize=penalize)
    return Sampler(greedy=False, top_k=top_k, use_top_p=top_p is not None and top_p < 1, penalize=penalize)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Masks every logit below the k-th largest. logits: float32[B, V]."""
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Nucleus filter. logits: float32[B, V]; p: float32[]."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = (cumulative <= 1 - p).at[:, -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def sample(sampler: Sampler, logits: jax.Array, key: jax.Array, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits: float32[B, V] -> int32[B]."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if sampler.top_k is not None:
        logits = top_k_filter(logits, sampler.top_k)
    if sampler.use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
