"""Images to pixel values with Pillow, as transformers' PIL image processors compute them.

Files are opened in the formats the image processors take, and only those: PNG, JPEG, WebP, GIF, BMP and
TIFF (`FORMATS`); Pillow's other plugins are never asked, so a file cannot reach one that hands it to
another program (EPS to Ghostscript). A file's EXIF orientation is applied, as transformers' `load_image`
applies it. Any PIL mode becomes RGB (transparency composited onto white; 16-bit images reduced to 8 bits
as Pillow converts them, values above 255 clipping to white, as transformers' processors do); then
resize (to a fixed size, or so the shortest edge has a given length), centre-crop, rescale and normalise,
each as the checkpoint's `preprocessor_config.json` asks; Gemma 3's pan and scan adds crops of a long
image, each processed alike. The result is float32[H, W, 3] per image, batched as [B, H, W, 3]. Qwen-VL's
processor instead keeps each image near its own size and cuts it into patches (`preprocess_patches`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Sequence

import stat

import numpy as np
import PIL.Image
import PIL.ImageOps

from jaxvlm.config import ImageProcessing, PanAndScan, PatchGrid
from jaxvlm.patches import PatchImages


# A checkpoint's image processing configs, copied into converted and saved folders (their content is in
# the jaxvlm config already, `ImageProcessing`).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class ImageError(ValueError):
    pass


# The formats transformers' image processors are used with; Pillow is asked to identify a file as one of
# these only.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


# Files are refused past Pillow's decompression-bomb threshold (it only warns up to twice that), before
# any pixel is decoded; JPEGs past DRAFT_ABOVE pixels are decoded at 1/2, 1/4 or 1/8 scale (Pillow's
# `draft`), keeping at least twice the size they are resized to.
MAX_PIXELS = PIL.Image.MAX_IMAGE_PIXELS or 89_478_485
DRAFT_ABOVE = 4096 * 4096


def load_image(image: Any, what: str = "image", resize_to: tuple[int, int] | None = None) -> PIL.Image.Image:
    """A path, an image file's bytes, a PIL image or a uint8 array ([H, W] or [H, W, 1 | 3 | 4]) as a fully
    decoded PIL image. `resize_to` (height, width), the size the image is resized to next, lets a very large
    JPEG decode at a reduced scale."""
    if isinstance(image, (str, os.PathLike, bytes)):
        if isinstance(image, bytes):
            path, source = f"{len(image)} bytes", io.BytesIO(image)
        else:
            path = source = os.fspath(image)
            _check_regular_file(path, what)
        try:
            with PIL.Image.open(source, formats=FORMATS) as f:
                if f.width * f.height > MAX_PIXELS:
                    raise ImageError(f"{what}: {path}: {f.width}x{f.height} pixels, more than the {MAX_PIXELS} "
                                     "an image may have; downscale it first")
                if resize_to is not None and f.format == "JPEG" and f.width * f.height > DRAFT_ABOVE:
                    f.draft("RGB", (2 * resize_to[1], 2 * resize_to[0]))
                f.load()  # decode now, so a truncated file fails here and not later
                image = PIL.ImageOps.exif_transpose(f)
        except PIL.UnidentifiedImageError:
            raise ImageError(f"{what}: {path}: cannot read the image (not an image in a format jaxvlm reads: "
                             f"{', '.join(FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            if isinstance(e, ImageError):
                raise
            raise ImageError(f"{what}: {path}: cannot read the image ({e})") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
            raise ImageError(f"{what}: an array image must be uint8 [H, W] or [H, W, 1|3|4], "
                             f"got {image.dtype} {list(image.shape)}")
        if image.size == 0:
            raise ImageError(f"{what}: the image is empty ({list(image.shape)})")
        return image
    elif not isinstance(image, PIL.Image.Image):
        raise ImageError(f"{what}: expected a path, a PIL image or a uint8 array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{what}: the image is empty ({image.width}x{image.height})")
    return image


def _check_regular_file(path: str, what: str) -> None:
    """A path that is a regular file (a FIFO would block the read, a folder is not an image)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        reason = "no such file" if isinstance(e, (FileNotFoundError, NotADirectoryError)) else f"cannot be read ({e})"
        raise ImageError(f"{what}: {path}: {reason}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ImageError(f"{what}: {path}: {kind}, not a regular image file")


def to_rgb(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """Any PIL mode, or a uint8 array, to uint8[H, W, 3]; transparency is composited onto white, as
    transformers does (with Pillow for PIL images, rounding in numpy for arrays)."""
    if isinstance(image, np.ndarray):
        image = image[..., None] if image.ndim == 2 else image
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.shape[-1] == 4:
            alpha = image[..., 3:4] / 255
            return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def resized_shape(height: int, width: int, p: ImageProcessing) -> tuple[int, int]:
    """(height, width) after resizing: a fixed size, or the shortest edge scaled with the aspect ratio kept
    (the long edge rounded down, as transformers does)."""
    if p.size is not None:
        return tuple(p.size)
    short, long = sorted((height, width))
    new_short, new_long = p.shortest_edge, int(p.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, C] -> [height, width, C] from the centre, zero-padding an image smaller than the crop."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = math.ceil((padded.shape[0] - h) / 2), math.ceil((padded.shape[1] - w) / 2)
        padded[top:top + h, left:left + w] = pixels
        pixels = padded
        h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]


def pan_and_scan(pixels: np.ndarray, p: PanAndScan) -> list[np.ndarray]:
    """The crops of uint8[H, W, 3] that Gemma 3's pan and scan takes (none for an image close to square):
    as many as the aspect ratio rounds to, within 2 .. max_crops, along the long side, row by row."""
    h, w = pixels.shape[:2]
    long, short, min_ratio = max(h, w), min(h, w), p.min_ratio
    if long / short < min_ratio:
        return []
    along = min(int(math.floor(long / short + 0.5)), int(math.floor(long / p.min_crop_size)))
    along = min(p.max_crops, max(2, along))
    rows, cols = (1, along) if w >= h else (along, 1)
    crop_h, crop_w = math.ceil(h / rows), math.ceil(w / cols)
    if min(crop_h, crop_w) < p.min_crop_size:
        return []
    return [pixels[y * crop_h:(y + 1) * crop_h, x * crop_w:(x + 1) * crop_w] for y in range(rows) for x in range(cols)]


def _pixel_values(pixels: np.ndarray, p: ImageProcessing) -> np.ndarray:
    """uint8[h, w, 3] -> float32[H, W, 3]: resize, crop, rescale, normalise."""
    if p.size is not None or p.shortest_edge is not None:
        height, width = resized_shape(*pixels.shape[:2], p)
        pixels = np.asarray(PIL.Image.fromarray(pixels).resize((width, height), resample=p.resample))
    if p.crop_size is not None:
        pixels = center_crop(pixels, *p.crop_size)
    if p.rescale_factor is not None:
        pixels = (pixels.astype(np.float64) * p.rescale_factor).astype(np.float32)
    pixels = pixels.astype(np.float32)
    if p.mean is not None:
        pixels = (pixels - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return pixels


MAX_ASPECT_RATIO = 200  # beyond it Qwen-VL's processor refuses an image (its patches would be one row)


def smart_resize(height: int, width: int, grid: PatchGrid, what: str = "image") -> tuple[int, int]:
    """The (height, width) Qwen-VL's processor resizes an image to: each side rounded to the nearest
    multiple of `grid.factor`, then both scaled (rounding down, or up) into the pixel range, the aspect
    ratio kept as near as whole merged patches allow; as transformers' `smart_resize`."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"{what}: aspect ratio {max(height, width) / min(height, width):.1f} is beyond "
                         f"{MAX_ASPECT_RATIO} ({width}x{height} pixels): its patches would not make a grid")
    factor = grid.factor
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > grid.max_pixels:
        beta = math.sqrt(height * width / grid.max_pixels)
        h, w = (max(factor, math.floor(side / beta / factor) * factor) for side in (height, width))
    elif h * w < grid.min_pixels:
        beta = math.sqrt(grid.min_pixels / (height * width))
        h, w = (math.ceil(side * beta / factor) * factor for side in (height, width))
    return h, w


def to_patches(pixels: np.ndarray, grid: PatchGrid) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32[H, W, C] (sides multiples of `grid.factor`) -> (float32[h * w, C * T * P * P], (1, h, w)):
    the patches in transformers' order (merged squares consecutive, each patch's values channel, time,
    row, column) and the grid of patches, one frame in time."""
    P, M, T = grid.patch_size, grid.merge_size, grid.temporal_patch_size
    H, W, C = pixels.shape
    h, w = H // P, W // P
    x = pixels.reshape(h // M, M, P, w // M, M, P, C).transpose(0, 3, 1, 4, 6, 2, 5)  # [h/M, w/M, M, M, C, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, P, P))  # the one frame, T times
    return np.ascontiguousarray(x).reshape(h * w, C * T * P * P), (1, h, w)


def preprocess_patches(image: Any, p: ImageProcessing, what: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> its patches and grid (`to_patches`), at the size `smart_resize` gives it."""
    pixels = to_rgb(load_image(image, what))
    height, width = smart_resize(*pixels.shape[:2], p.patches, what)
    pixels = np.asarray(PIL.Image.fromarray(pixels).resize((width, height), resample=p.resample))
    return to_patches(_pixel_values(pixels, p), p.patches)


def preprocess_with_crops(image: Any, p: ImageProcessing, what: str = "image") -> list[np.ndarray]:
    """One image -> [float32[H, W, 3]]: the whole image, then its pan-and-scan crops if `p` asks for them."""
    target = p.size or ((p.shortest_edge,) * 2 if p.shortest_edge is not None else None)
    pixels = to_rgb(load_image(image, what, resize_to=None if p.pan_and_scan else target))
    crops = pan_and_scan(pixels, p.pan_and_scan) if p.pan_and_scan is not None else []
    return [_pixel_values(x, p) for x in [pixels] + crops]


def preprocess(image: Any, p: ImageProcessing, what: str = "image") -> np.ndarray:
    """One image -> float32[H, W, 3] (the whole image: no pan-and-scan crops)."""
    return preprocess_with_crops(image, dataclasses.replace(p, pan_and_scan=None), what)[0]


def preprocess_images(images: Sequence[Any], p: ImageProcessing,
                      offset: int = 0) -> tuple[np.ndarray | PatchImages, list[int]]:
    """Images -> (float32[N, H, W, 3]: each image followed by its pan-and-scan crops, the number of crops
    of each image); errors name the image by its index (counted from `offset`). Images of any size
    (`p.patches`) come out as `PatchImages`, each at its own size, without crops."""
    if p.patches is not None:
        cut = [preprocess_patches(image, p, what=f"image {i + offset}") for i, image in enumerate(images)]
        return PatchImages(np.concatenate([v for v, _ in cut]), np.asarray([g for _, g in cut], np.int32)), \
            [0] * len(cut)
    out = [preprocess_with_crops(image, p, what=f"image {i + offset}") for i, image in enumerate(images)]
    shapes = {x.shape for pieces in out for x in pieces}
    if len(shapes) > 1:
        raise ImageError(f"images came out in different shapes {sorted(shapes)}; the processing config has no "
                         "fixed size or crop")
    return np.stack([x for pieces in out for x in pieces]), [len(pieces) - 1 for pieces in out]


def preprocess_batch(images: Sequence[Any], p: ImageProcessing) -> np.ndarray:
    """Images -> float32[B, H, W, 3], the whole images (no pan-and-scan crops); errors name the image by its
    index."""
    return preprocess_images(images, dataclasses.replace(p, pan_and_scan=None))[0]
