"""The KV cache: a pytree passed into and returned from every forward, never hidden module state.

Prompts are right-aligned (left-padded), so every row writes its next token at the same slot `end` and
one `lax.dynamic_update_slice` serves the whole batch; `valid` marks the slots that hold real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.config import DecoderConfig


@struct.dataclass
class KVCache:
    # Per layer [B, S, K, H]; for scanned (stacked) layers one [L, B, S, K, H] array each.
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    end: jax.Array  # int32[]: the next slot to write
    valid: jax.Array  # bool[B, S]: the slot holds a real (non-padding) token

    @classmethod
    def init(cls, config: DecoderConfig, batch: int, size: int, dtype, stacked: bool = False) -> "KVCache":
        shape = (batch, size, config.num_kv_heads, config.head_dim)
        if stacked:
            zeros = jnp.zeros((config.depth, *shape), dtype)
        else:
            zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.depth))
        return cls(k=zeros, v=zeros, end=jnp.zeros((), jnp.int32), valid=jnp.zeros((batch, size), bool))

    @property
    def size(self) -> int:  # S
        return self.valid.shape[1]


def write(buffer: jax.Array, new: jax.Array, end: jax.Array) -> jax.Array:
    """Writes new[B, T, ...] into buffer[B, S, ...] at slots end .. end + T - 1."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), end, axis=1)
