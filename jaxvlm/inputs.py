"""One batch of the network's inputs as one pytree, built by one function: positions and bidirectional
blocks are derived here and nowhere else, for the forward, prefill, decoding and the training loss alike.

Rows are right-aligned (padding first) for generation, left-aligned for training; positions count real
tokens only, so a padded row gets the positions it would have alone (as transformers' generate numbers
them), from the model's `position_offset` (PaliGemma counts from 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.config import ModelConfig
from jaxvlm.masks import blocks_of_prefix, blocks_of_runs, token_positions


@struct.dataclass
class Inputs:
    tokens: jax.Array  # int32[B, T]; image placeholders where `pixels`' features go
    valid: jax.Array  # bool[B, T]: False at padding
    positions: jax.Array  # int32[B, T] (rotary positions; M-RoPE's three streams will add a leading axis)
    # int32[B, T]: tokens of one block (>= 0) attend to each other both ways (`masks.decoder_mask`); -1 none
    blocks: jax.Array | None = None
    # float[B, H, W, C] (an image a row) or [B, M, H, W, C] (up to M a row): their features replace the
    # placeholder tokens of the row, in order
    pixels: jax.Array | None = None

    @classmethod
    def build(cls, config: ModelConfig, tokens: jax.Array, valid: jax.Array, prefix: jax.Array | None = None,
              pixels: jax.Array | None = None, start: jax.Array | int = 0) -> "Inputs":
        """The inputs of whole prompts, or of their ends after `start` tokens already run: positions from
        `valid`; blocks from a prefix-LM's `prefix` bool[B, T] (PaliGemma: block 0), else each image's run of
        placeholder tokens (Gemma 3), else none."""
        positions = token_positions(valid) + config.position_offset + start
        blocks = None
        if prefix is not None:
            blocks = blocks_of_prefix(prefix & valid)
        elif config.image_blocks and pixels is not None:
            blocks = blocks_of_runs(tokens == config.image_token_id)
        return cls(tokens, valid, positions, blocks, pixels)

    @classmethod
    def next_tokens(cls, tokens: jax.Array, positions: jax.Array) -> "Inputs":
        """One new token a row (int32[B], at int32[B]): a decode step's inputs."""
        return cls(tokens[:, None], jnp.ones((tokens.shape[0], 1), bool), positions[:, None])
