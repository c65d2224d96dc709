"""Attention masks, as bool[B, T, S] (True = may attend), in cache-slot coordinates.

Because prompts are right-aligned and slots are filled left to right, the distance between two slots of
the same row equals the distance between their positions, so causality and sliding windows can be
expressed on slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decoder_mask(kv_valid: jax.Array, query_start: jax.Array, num_queries: int, window: int | None = None,
                 prefix: tuple[jax.Array, jax.Array] | None = None, key_slots: jax.Array | None = None) -> jax.Array:
    """Causal mask (optionally sliding-window) over valid keys, with an optional bidirectional prefix.

    kv_valid: bool[B, S]; the T = num_queries queries sit at slots query_start .. query_start + T - 1.
    With a window W a query sees the W most recent slots, itself included (transformers' convention:
    key visible iff q - W < k <= q). `prefix` is (bool[B, T] for the queries, bool[B, S] for the keys):
    a prefix query sees every prefix key, beyond causality and the window (PaliGemma's image + prompt);
    padding keys stay hidden. `key_slots` int[S] gives the sequence slot of each key when the keys are not
    slots 0 .. S - 1 (a ring buffer's, then the new ones).
    """
    q_slot = query_start + jnp.arange(num_queries)[:, None]  # [T, 1]
    k_slot = (jnp.arange(kv_valid.shape[1]) if key_slots is None else key_slots)[None, :]  # [1, S]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed &= k_slot > q_slot - window
    allowed = allowed[None]
    if prefix is not None:
        allowed = allowed | (prefix[0][:, :, None] & prefix[1][:, None, :])
    return kv_valid[:, None, :] & allowed


def token_positions(valid: jax.Array) -> jax.Array:
    """int32[B, T] positions that count real tokens only (0 at and before the first), from valid: bool[B, T].

    A left-padded row thus gets the positions it would have alone, as transformers' generate numbers them.
    """
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
