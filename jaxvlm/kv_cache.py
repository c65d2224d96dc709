"""The KV cache: a pytree passed into and returned from every forward, never hidden module state.

Prompts are right-aligned (left-padded), so every row writes its next token at the same slot `end` and
one `lax.dynamic_update_slice` serves the whole batch; `valid` marks the slots that hold real tokens.

A sliding-window layer (Gemma 2's local layers, Phi-3's) only ever looks `window` slots back, so when the
cache is longer than that, its keys and values live in a ring buffer of `window` slots: slot s of the
sequence is kept at s % window, and cache memory for a long generation grows with the window, not the
sequence. (Layers held stacked for a scan keep one size for all: full-length caches.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.config import DecoderConfig


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots a row, a pytree threaded through prefill and the decode
    scan. One write cursor `end` serves every row (one dynamic_update_slice a step); the slots are circular
    (sequence slot s lands at s % S), so the cursor never runs out; `valid` marks the slots holding a row's
    real tokens, which is all the masks need: a row's tokens may start at any slot, so a request can be
    written into any row of a running batch. Sliding-window layers keep only their window, as a ring of
    their own (`layer_slots`)."""

    # Per layer [B, S, K, H]; for scanned (stacked) layers one [L, B, S, K, H] array each.
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    end: jax.Array  # int32[]: the sequence slot written next (slots are circular: it lands at end % S)
    valid: jax.Array  # bool[B, S]: the slot holds a real (non-padding) token

    @classmethod
    def init(cls, config: DecoderConfig, batch: int, size: int, dtype, stacked: bool = False,
             rings: bool = True) -> "KVCache":
        """Zeros, nothing valid. `rings=False` keeps every layer full length (a prompt whose keys and values
        are kept for reuse: a later prompt may need a sliding-window layer's keys from before its window)."""
        shape = lambda slots: (batch, slots, config.num_kv_heads, config.head_dim)
        if stacked:
            zeros = jnp.zeros((config.depth, *shape(size)), dtype)
        else:
            zeros = tuple(jnp.zeros(shape(layer_slots(config, i, size) if rings else size), dtype)
                          for i in range(config.depth))
        return cls(k=zeros, v=zeros, end=jnp.zeros((), jnp.int32), valid=jnp.zeros((batch, size), bool))

    @property
    def size(self) -> int:  # S
        return self.valid.shape[1]


def layer_slots(config: DecoderConfig, layer: int, size: int) -> int:
    """The slots layer `layer` keeps in a cache of `size`: its window, when that is shorter (a ring)."""
    window = config.window(layer)
    return size if window is None else min(size, window)


def write(buffer: jax.Array, new: jax.Array, end: jax.Array) -> jax.Array:
    """Writes new[B, T, ...] (sequence slots end .. end + T - 1) into buffer[B, S, ...], which is circular:
    each at its slot modulo S. One new token a row (decoding) is one dynamic_update_slice."""
    if new.shape[1] == 1:
        return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), jnp.mod(end, buffer.shape[1]),
                                                   axis=1)
    return ring_write(buffer, new, end)


def ring_slots(end: jax.Array, size: int) -> jax.Array:
    """int32[size]: the sequence slot each entry of a ring of `size` holds after slots 0 .. end - 1 were
    written (entry j holds the latest slot s < end with s % size == j); negative where none was."""
    j = jnp.arange(size)
    return end - 1 - jnp.mod(end - 1 - j, size)


def ring_write(ring: jax.Array, new: jax.Array, end: jax.Array) -> jax.Array:
    """Writes new[B, T, ...] (sequence slots end .. end + T - 1) into ring[B, W, ...], each at its slot
    modulo W; of more than W new entries, the last W."""
    W, T = ring.shape[1], new.shape[1]
    kept = min(T, W)
    index = jnp.mod(end + T - kept + jnp.arange(kept), W)
    return ring.at[:, index].set(new[:, T - kept:].astype(ring.dtype))
