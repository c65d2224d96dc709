"""Rotary position embeddings: the default tables, linear scaling, LongRoPE, Llama 3's smoothing, and
their application (rotate-half layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.config import RopeConfig


def wavelength_powers(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """theta ** (2i / R), float32[R / 2] with R the rotary dim, in float32 as the references compute it."""
    dim = rope.rotary_dim(head_dim)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(rope.theta) ** exponents).astype(np.float32)


def smoothed_frequencies(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3's rescaled frequencies (`RopeConfig.smoothing`), in float32 step by step as transformers
    computes them."""
    s, f32 = rope.smoothing, np.float32
    old = rope.original_max_position
    low_wavelength, high_wavelength = f32(old / s.low_freq_factor), f32(old / s.high_freq_factor)
    wavelength = f32(2 * np.pi) / inv_freq
    scaled = np.where(wavelength > low_wavelength, inv_freq / f32(s.factor), inv_freq)
    blend = (f32(old) / wavelength - f32(s.low_freq_factor)) / f32(s.high_freq_factor - s.low_freq_factor)
    blended = (f32(1) - blend) * scaled / f32(s.factor) + blend * scaled
    between = ~(wavelength < high_wavelength) & ~(wavelength > low_wavelength)
    return np.where(between, blended, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin, float32[B, T, R], for int positions[B, T] (M-RoPE: [B, T, 3], or [B, T] for text alone,
    the same in each stream).

    LongRoPE picks its short or long factors from the longest position in this forward pass, as
    transformers does on every call (`longrope_frequency_update`), or each row from its own with
    `rope.per_row`: `positions` must hold zeros (or any smaller value) at padding slots.
    """
    powers = jnp.asarray(wavelength_powers(rope, head_dim))
    if rope.is_longrope:
        longest = jnp.max(positions, axis=-1, keepdims=True)[..., None] if rope.per_row else jnp.max(positions)
        powers = powers * jnp.where(longest + 1 > rope.original_max_position,
                                    jnp.asarray(rope.long_factor, jnp.float32),
                                    jnp.asarray(rope.short_factor, jnp.float32))
    inv_freq = 1.0 / powers
    if rope.smoothing is not None:
        inv_freq = smoothed_frequencies(np.float32(1.0) / wavelength_powers(rope, head_dim), rope)
    if rope.linear_factor != 1.0:
        inv_freq = inv_freq / rope.linear_factor
    streams = rope.mrope_streams(head_dim)
    if streams is None or positions.ndim == 2:  # M-RoPE's text: every stream at the same position
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    else:  # each frequency at its stream's position
        angles = jnp.take(positions, jnp.asarray(streams), axis=-1).astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first R features of each head. x: [B, T, N, H]; cos, sin: float32[B, T, R]."""
    rot = cos.shape[-1]
    # The tables are cast to the activation dtype before use, as transformers does (matters in bfloat16).
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    first, second = jnp.split(x_rot, 2, axis=-1)
    rotated = x_rot * cos + jnp.concatenate([-second, first], axis=-1) * sin
    return jnp.concatenate([rotated, x_pass], axis=-1)


def grid_rope_tables(positions: jax.Array, theta: float, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """An image encoder's 2-D rotary embedding (Qwen-VL): cos and sin, float32[..., H], for int
    positions[..., 2] (each patch's row and column). A quarter of the head's frequencies turn with the row
    and a quarter with the column ([row, column] angles, then again for the rotate-half layout)."""
    quarter = head_dim // 4
    exponents = np.arange(quarter, dtype=np.int64).astype(np.float32) * np.float32(2) / np.float32(head_dim // 2)
    inv_freq = jnp.asarray(np.float32(1.0) / (np.float32(theta) ** exponents))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., 2, H/4]
    angles = angles.reshape(*angles.shape[:-2], head_dim // 2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
