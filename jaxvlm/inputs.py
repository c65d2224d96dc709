"""One batch of the network's inputs as one pytree, built by one function: positions and bidirectional
blocks are derived here and nowhere else, for the forward, prefill, decoding and the training loss alike.

Rows are right-aligned (padding first) for generation, left-aligned for training; positions count real
tokens only, so a padded row gets the positions it would have alone (as transformers' generate numbers
them), from the model's `position_offset` (PaliGemma counts from 1).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvlm.config import ModelConfig, VisionConfig
from jaxvlm.masks import blocks_of_prefix, blocks_of_runs, token_positions
from jaxvlm.patches import Patches, PatchImages, pack


@struct.dataclass
class Inputs:
    tokens: jax.Array  # int32[B, T]; image placeholders where `pixels`' features go
    valid: jax.Array  # bool[B, T]: False at padding
    positions: jax.Array  # int32[B, T] rotary positions; [B, T, 3] with images of any size (M-RoPE's streams)
    # int32[B, T]: tokens of one block (>= 0) attend to each other both ways (`masks.decoder_mask`); -1 none
    blocks: jax.Array | None = None
    # The batch's images as segments, float[N, H, W, C]: row by row, each row's in the order of its
    # placeholders, then blank ones up to a bucket. Each image's features fill the next placeholders of its
    # row (as many as the encoder gives an image: `ModelConfig.tokens_per_image`). Images of any size come
    # as `Patches` instead: every image of the batch in one sequence, in row order, each filling as many
    # placeholders as it has merged squares of patches.
    pixels: jax.Array | Patches | None = None
    image_rows: jax.Array | None = None  # int32[N]: the row each image lies in; -1 for a blank (never placed)

    @classmethod
    def build(cls, config: ModelConfig, tokens: jax.Array, valid: jax.Array, prefix: jax.Array | None = None,
              pixels: jax.Array | None = None, image_rows: jax.Array | None = None,
              start: jax.Array | int = 0) -> "Inputs":
        """The inputs of whole prompts, or of their ends after `start` tokens already run: positions from
        `valid`; blocks from a prefix-LM's `prefix` bool[B, T] (PaliGemma: block 0), else each image's run of
        placeholder tokens (Gemma 3), else none. `image_rows` left None: image i lies in row i. With
        `Patches`, M-RoPE's three streams of positions (`Patches.mrope_positions`)."""
        if isinstance(pixels, Patches):
            positions = pixels.mrope_positions(tokens == config.image_token_id, valid, config.vision.merge_size)
            return cls(tokens, valid, positions + start, None, pixels, None)
        positions = token_positions(valid) + config.position_offset + start
        blocks = None
        if prefix is not None:
            blocks = blocks_of_prefix(prefix & valid)
        elif config.image_blocks and pixels is not None:
            blocks = blocks_of_runs(tokens == config.image_token_id)
        if pixels is not None and image_rows is None:
            image_rows = jnp.arange(pixels.shape[0], dtype=jnp.int32)
        return cls(tokens, valid, positions, blocks, pixels, image_rows)

    @classmethod
    def next_tokens(cls, tokens: jax.Array, positions: jax.Array) -> "Inputs":
        """One new token a row (int32[B], at int32[B]): a decode step's inputs."""
        return cls(tokens[:, None], jnp.ones((tokens.shape[0], 1), bool), positions[:, None])


@dataclasses.dataclass(frozen=True)
class Images:
    """A batch's images on the host, as `Inputs` takes them: pixels float32[N, H, W, C] (or, images of any
    size, `PatchImages`), row by row (each row's in the order of its placeholders), and the row of each,
    int32[N]."""
    pixels: np.ndarray | PatchImages
    rows: np.ndarray

    @classmethod
    def of_rows(cls, per_row: Sequence[np.ndarray | PatchImages | None]) -> "Images":
        """From each row's images ([n, H, W, C] or `PatchImages`, n >= 0, or None: none)."""
        shaped = [p for p in per_row if p is not None and len(p)]
        pixels = PatchImages.concatenate(shaped) if isinstance(shaped[0], PatchImages) \
            else np.concatenate(shaped).astype(np.float32)
        rows = np.concatenate([np.full(0 if p is None else len(p), i, np.int32) for i, p in enumerate(per_row)])
        return cls(pixels, rows)

    def of_row(self, row: int) -> np.ndarray | PatchImages:
        """Row `row`'s images, [n, H, W, C] or `PatchImages`."""
        if isinstance(self.pixels, PatchImages):
            return self.pixels.select(self.rows == row)
        return self.pixels[self.rows == row]

    def bucketed(self, vision: VisionConfig) -> tuple[np.ndarray | Patches, np.ndarray | None]:
        """(pixels, rows) with blank images (row -1) up to a power of two, so that few counts compile; images
        of any size as one sequence of `Patches` padded to a bucket (and no rows: they are in row order)."""
        if isinstance(self.pixels, PatchImages):
            return pack(self.pixels.split(), self.pixels.grids, vision), None
        extra = (1 << (len(self.pixels) - 1).bit_length()) - len(self.pixels)
        return (np.concatenate([self.pixels, np.zeros((extra, *self.pixels.shape[1:]), np.float32)]),
                np.concatenate([self.rows, np.full(extra, -1, np.int32)]))
