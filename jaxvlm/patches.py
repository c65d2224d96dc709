"""Images of any size as one sequence of patches (Qwen-VL's image encoder).

The processor cuts each image into patches of its own grid (`images.to_patches`: frames x rows x columns,
each `merge_size` x `merge_size` square consecutive). The encoder runs on all of a batch's patches at
once, as one row: each patch knows its image (it attends within it only), its window (the windowed layers
attend within it only) and its row and column (the 2-D rotary embedding). The sequence is padded to a
bucket (a power of two), so that images of other sizes reuse the compiled program; padding patches belong
to image -1 and attend among themselves.

Transformers reorders the patches window by window and back; attention masked by window is the same
computation in the processor's order, so no reordering is done here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvlm.config import VisionConfig

PADDING = -1


@dataclasses.dataclass(frozen=True)
class PatchImages:
    """Images of any size on the host, as Qwen-VL's processor gives them (transformers' `pixel_values` and
    `image_grid_thw`): every image's patches one image after the other, float32[n, patch_dim], and each
    image's grid of patches, int32[N, 3] (frames, rows, columns)."""

    values: np.ndarray
    grids: np.ndarray

    def __len__(self) -> int:
        return len(self.grids)

    def tokens(self, merge: int) -> np.ndarray:
        """int[N]: the placeholder tokens each image fills (one a merged square of patches)."""
        return self.grids.prod(axis=1) // merge ** 2

    def split(self) -> list[np.ndarray]:
        """Each image's patches."""
        return np.split(self.values, np.cumsum(self.grids.prod(axis=1))[:-1])

    def __getitem__(self, index: slice) -> "PatchImages":
        return self.select(np.isin(np.arange(len(self)), np.arange(len(self))[index]))

    def select(self, keep: np.ndarray) -> "PatchImages":
        """The images `keep` (bool[N]) marks."""
        return PatchImages(np.concatenate([v for v, k in zip(self.split(), keep) if k] or [self.values[:0]]),
                           self.grids[keep])

    @classmethod
    def concatenate(cls, parts: Sequence["PatchImages"]) -> "PatchImages":
        return cls(np.concatenate([p.values for p in parts]).astype(np.float32),
                   np.concatenate([p.grids for p in parts]).astype(np.int32))


@struct.dataclass
class Patches:
    values: jax.Array  # float[L, patch_dim]: every image's patches, one image after the other, then padding
    position: jax.Array  # int32[L, 2]: the patch's row and column in its image
    image: jax.Array  # int32[L]: the image it belongs to (in order), -1 for padding
    window: jax.Array  # int32[L]: its attention window, numbered across the batch; -1 for padding

    @classmethod
    def blank(cls, vision: VisionConfig) -> "Patches":
        """One merged square of zero patches (to trace the encoder with)."""
        n = vision.merge_size ** 2
        zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
        return cls(jnp.zeros((n, vision.patch_dim), jnp.float32), zeros(n, 2), zeros(n), zeros(n))

    def attention_masks(self) -> tuple[jax.Array, jax.Array]:
        """bool[1, L, L] each: within the same image; within the same window."""
        same = lambda ids: (ids[:, None] == ids[None, :])[None]
        return same(self.image), same(self.window)

    def mrope_positions(self, is_image: jax.Array, valid: jax.Array, merge: int) -> jax.Array:
        """M-RoPE's positions of the prompts whose image tokens (`is_image` bool[B, T]; one a merged square
        of `merge` x `merge` patches, row by row in the batch's order, as the projector gives them) these
        patches fill: int32[B, T, 3] (time, height, width; 0 at padding, `valid` False).

        Text counts up by one in every stream. An image's tokens all start where the text stands, height
        and width then counting the square's row and column (time stays: an image is one frame); the text
        after it resumes past the image's longer side. As transformers' `get_rope_index` numbers images."""
        squares = self.values.shape[0] // merge ** 2
        image = jnp.asarray(self.image)[::merge ** 2]  # [squares]: each merged token's image and (row, column)
        row_column = jnp.asarray(self.position)[::merge ** 2] // merge
        side = jax.ops.segment_max(row_column.max(axis=-1), jnp.where(image >= 0, image, squares),
                                   num_segments=squares + 1)[:squares] + 1  # each image's longer side
        flat = is_image.reshape(-1)
        k = jnp.clip(jnp.cumsum(flat) - 1, 0, squares - 1).reshape(is_image.shape)  # each image token's square
        k_before = jnp.clip(k - 1, 0, squares - 1)
        starts = is_image & ((jnp.cumsum(flat).reshape(is_image.shape) == 1) | (image[k_before] != image[k]))
        extent = side[jnp.maximum(image[k], 0)]
        # every stream advances by one a text token and by the image's longer side at its first token
        advance = jnp.where(valid, jnp.where(is_image, jnp.where(starts, extent, 0), 1), 0)
        reached = jnp.cumsum(advance, axis=1)
        text = jnp.broadcast_to((reached - 1)[..., None], (*is_image.shape, 3))
        spatial = jnp.concatenate([jnp.zeros_like(row_column[:, :1]), row_column], axis=-1)[k]
        pictured = (reached - extent)[..., None] + spatial
        return jnp.where(valid[..., None], jnp.where(is_image[..., None], pictured, text), 0).astype(jnp.int32)


def bucket(count: int, unit: int) -> int:
    """The padded length for `count` patches: `unit` (a merged token's patches) times a power of two, so
    that a handful of lengths serve every image size."""
    return unit << max(-(-count // unit) - 1, 0).bit_length()


def pack(values: Sequence[np.ndarray], grids: Sequence[tuple[int, int, int]], vision: VisionConfig,
         length: int | None = None) -> Patches:
    """The patches of several images ([n_i, patch_dim] each, with its (frames, rows, columns) grid of
    patches) as one padded sequence, with each patch's position, image and window (numpy arrays)."""
    m = vision.merge_size
    total = int(sum(t * h * w for t, h, w in grids))
    length = bucket(total, m * m) if length is None else length
    if total > length:
        raise ValueError(f"{total} patches do not fit a sequence of {length}")
    position = np.zeros((length, 2), np.int32)
    image = np.full((length,), PADDING, np.int32)
    window = np.full((length,), PADDING, np.int32)
    at = windows = 0
    for index, (t, h, w) in enumerate(grids):
        if h % m or w % m:
            raise ValueError(f"image {index}: a grid of {h}x{w} patches is not whole {m}x{m} squares")
        # rows and columns in the processor's order: merged squares row by row, each square row by row
        rows, columns = (np.broadcast_to(a, (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
                         for a in (np.arange(h)[:, None], np.arange(w)[None, :]))
        n = h * w
        for _ in range(t):
            position[at:at + n] = np.stack([rows, columns], axis=-1)
            image[at:at + n] = index
            if vision.window is None:
                window[at:at + n] = windows
                windows += 1
            else:
                size = vision.window
                across = -(-(w // m) // size)  # windows a row of windows holds
                ids = (rows // m // size) * across + columns // m // size
                window[at:at + n] = windows + ids
                windows += -(-(h // m) // size) * across
            at += n
    stacked = np.concatenate([np.asarray(v, np.float32).reshape(-1, vision.patch_dim) for v in values], axis=0)
    if stacked.shape[0] != total:
        raise ValueError(f"{stacked.shape[0]} patch values for grids of {total} patches")
    padded = np.zeros((length, vision.patch_dim), np.float32)
    padded[:total] = stacked
    return Patches(padded, position, image, window)
