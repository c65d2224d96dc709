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

from typing import Sequence

import jax
import numpy as np
from flax import struct

from jaxvlm.config import VisionConfig

PADDING = -1


@struct.dataclass
class Patches:
    values: jax.Array  # float[L, patch_dim]: every image's patches, one image after the other, then padding
    position: jax.Array  # int32[L, 2]: the patch's row and column in its image
    image: jax.Array  # int32[L]: the image it belongs to (in order), -1 for padding
    window: jax.Array  # int32[L]: its attention window, numbered across the batch; -1 for padding

    def attention_masks(self) -> tuple[jax.Array, jax.Array]:
        """bool[1, L, L] each: within the same image; within the same window."""
        same = lambda ids: (ids[:, None] == ids[None, :])[None]
        return same(self.image), same(self.window)


def bucket(count: int, unit: int) -> int:
    """The padded length for `count` patches: the next power of two, at least `unit` (a merged token's
    patches), so that a handful of lengths serve every image size."""
    return max(unit, 1 << max(count - 1, 0).bit_length())


def pack(values: Sequence[np.ndarray], grids: Sequence[tuple[int, int, int]], vision: VisionConfig,
         length: int | None = None) -> Patches:
    """The patches of several images ([n_i, patch_dim] each, with its (frames, rows, columns) grid of
    patches) as one padded sequence, with each patch's position, image and window (numpy arrays)."""
    m = vision.merge_size
    total = sum(t * h * w for t, h, w in grids)
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


def mrope_positions(tokens: np.ndarray, valid: np.ndarray, image_token_id: int,
                    grids: Sequence[Sequence[tuple[int, int, int]]], merge: int) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE's positions of a batch of prompts, int32[B, T, 3] (time, height, width; 0 at padding), and
    each row's next position, int32[B] (where decoding continues, in every stream).

    Text counts up by one in every stream. An image's tokens (a run of `image_token_id`, one a merged
    square of its (frames, rows, columns) patch grid, from `grids[row]` in order) all start where the text
    stands: time by frame, height and width by the square's row and column; the text after it resumes past
    the image's longer side. As transformers' `get_rope_index` numbers them, for images."""
    B, T = tokens.shape
    positions = np.zeros((B, T, 3), np.int32)
    following = np.zeros((B,), np.int32)
    for b in range(B):
        at = np.flatnonzero(valid[b])
        row = tokens[b, at]
        out = np.zeros((len(row), 3), np.int64)
        images = iter(grids[b])
        i = current = 0
        while i < len(row):
            if row[i] != image_token_id:
                out[i] = current
                i, current = i + 1, current + 1
                continue
            grid = next(images, None)
            if grid is None:
                raise ValueError(f"row {b}: more runs of image tokens than the {len(grids[b])} images given")
            t, h, w = grid[0], grid[1] // merge, grid[2] // merge
            n = t * h * w
            if not np.all(row[i:i + n] == image_token_id) or (i + n < len(row) and row[i + n] == image_token_id):
                raise ValueError(f"row {b}: an image of {t}x{grid[1]}x{grid[2]} patches needs a run of {n} image "
                                 "tokens")
            frame, down, across = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            out[i:i + n] = current + np.stack([frame, down, across], axis=-1).reshape(n, 3)
            i, current = i + n, current + max(h, w)
        if next(images, None) is not None:
            raise ValueError(f"row {b}: fewer runs of image tokens than the {len(grids[b])} images given")
        positions[b, at] = out
        following[b] = out.max() + 1 if len(out) else 0
    return positions, following
