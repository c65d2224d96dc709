"""Attention masks, as bool[B, T, S] (True = may attend), in cache-slot coordinates.

Because prompts are right-aligned and slots are filled left to right, the distance between two slots of
the same row equals the distance between their positions, so causality and sliding windows can be
expressed on slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decoder_mask(kv_valid: jax.Array, query_start: jax.Array, num_queries: int, window: int | None = None,
                 blocks: tuple[jax.Array, jax.Array] | None = None, key_slots: jax.Array | None = None,
                 window_bounds_blocks: bool = False) -> jax.Array:
    """Causal mask (optionally sliding-window) over valid keys, with optional bidirectional blocks.

    kv_valid: bool[B, S]; the T = num_queries queries sit at slots query_start .. query_start + T - 1.
    With a window W a query sees the W most recent slots, itself included (transformers' convention:
    key visible iff q - W < k <= q). `blocks` is (int[B, T] for the queries, int[B, S] for the keys):
    tokens of the same block (an id >= 0; -1 is none) see each other in both directions, beyond
    causality: PaliGemma's image + prompt prefix (block 0), Gemma 3's images (a block each). The window
    bounds the blocks too when `window_bounds_blocks` (Gemma 3), not otherwise (PaliGemma 2, as transformers
    builds its masks). Padding keys stay hidden. `key_slots` int[S] gives the sequence slot of each key
    when the keys are not slots 0 .. S - 1 (a ring buffer's, then the new ones).
    """
    q_slot = query_start + jnp.arange(num_queries)[:, None]  # [T, 1]
    k_slot = (jnp.arange(kv_valid.shape[1]) if key_slots is None else key_slots)[None, :]  # [1, S]
    allowed = (k_slot <= q_slot)[None]
    in_window = None if window is None else (k_slot > q_slot - window)[None]
    if in_window is not None and not (blocks is not None and window_bounds_blocks):
        allowed &= in_window
    if blocks is not None:
        q_block, k_block = blocks
        allowed = allowed | ((q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0))
        if in_window is not None and window_bounds_blocks:
            allowed &= in_window
    return kv_valid[:, None, :] & allowed


def blocks_of_prefix(prefix: jax.Array) -> jax.Array:
    """bool[B, T] prefix flags -> int32[B, T] blocks: the prefix is block 0, the rest none (-1)."""
    return jnp.where(prefix, 0, -1).astype(jnp.int32)


def blocks_of_runs(marked: jax.Array) -> jax.Array:
    """bool[B, T] -> int32[B, T]: each run of consecutive marked tokens a block of its own (0, 1, ...),
    unmarked tokens none (-1), as transformers groups an image's tokens."""
    starts = marked & ~jnp.pad(marked, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(marked, jnp.cumsum(starts, axis=1) - 1, -1).astype(jnp.int32)


def token_positions(valid: jax.Array) -> jax.Array:
    """int32[B, T] positions that count real tokens only (0 at and before the first), from valid: bool[B, T].

    A left-padded row thus gets the positions it would have alone, as transformers' generate numbers them.
    """
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
