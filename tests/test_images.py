"""Image preprocessing equals transformers' PIL image processors, for every PIL mode and input kind."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from convert.families import VISION_FAMILIES
from convert.hf_config import image_processing
from jaxvlm.config import VisionConfig
from jaxvlm.images import ImageError, preprocess, preprocess_batch


def sample_images(tmp_path) -> dict:
    """name -> image (PIL, uint8 array or path) covering the modes and input kinds met in the wild."""
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    rgba = np.concatenate([np.asarray(rgb), rng.integers(0, 256, (37, 50, 1), dtype=np.uint8)], axis=-1)
    gray = rng.integers(0, 256, (61, 23), dtype=np.uint8)
    palette = rgb.quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    images = {
        "RGB": rgb, "L": PIL.Image.fromarray(gray), "LA": PIL.Image.fromarray(rgba[..., [0, 3]]),
        "RGBA": PIL.Image.fromarray(rgba), "P": palette, "P_transparency": transparent,
        "CMYK": rgb.convert("CMYK"), "I;16": PIL.Image.fromarray(gray.astype(np.uint16) * 200),
        "1": PIL.Image.fromarray(gray > 128), "array_rgb": np.asarray(rgb), "array_rgba": rgba,
        "small": PIL.Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)),
    }
    rgb.save(tmp_path / "image.jpg", quality=90)
    PIL.Image.fromarray(rgba).save(tmp_path / "image.png")
    images["path_jpeg"], images["path_png"] = str(tmp_path / "image.jpg"), str(tmp_path / "image.png")
    return images


def processors(tmp_path):
    """(transformers processor, jaxvlm ImageProcessing read from the preprocessor_config.json it saves)."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
    siglip = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=3, do_rescale=True,
                                     rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36})
    out = {}
    for name, proc, vision in [("siglip", siglip, VisionConfig(image_size=32, patch_size=8, width=8, depth=1,
                                                                 num_heads=1, mlp_dim=8)),
                               ("clip", clip, VisionConfig(image_size=36, patch_size=6, width=8, depth=1, num_heads=1,
                                                           mlp_dim=8, class_token=True))]:
        folder = tmp_path / name
        proc.save_pretrained(folder)
        out[name] = (proc, image_processing(str(folder), vision, VISION_FAMILIES[f"{name}_vision_model"]))
    return out


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_preprocessing_equals_transformers(tmp_path, kind):
    proc, config = processors(tmp_path)[kind]
    assert (config.size, config.shortest_edge, config.crop_size) == \
        (((32, 32), None, None) if kind == "siglip" else (None, 40, (36, 36)))
    for name, image in sample_images(tmp_path).items():
        hf_input = PIL.Image.open(image) if isinstance(image, str) else image
        want = proc(images=hf_input, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = preprocess(image, config)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.abs(got - want).max() <= 1e-6, f"{kind} {name}: max |diff| {np.abs(got - want).max()}"


def test_batch_of_mixed_inputs(tmp_path):
    config = processors(tmp_path)["siglip"][1]
    images = list(sample_images(tmp_path).values())
    batch = preprocess_batch(images, config)
    assert batch.shape == (len(images), 32, 32, 3) and batch.min() >= -1 and batch.max() <= 1


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.png"), r"image 0: .*missing.png: no such file"),
    (lambda d: (d / "bad.png").write_bytes(b"not an image") and str(d / "bad.png"),
     r"image 0: .*bad.png: cannot read the image"),
    (lambda d: PIL.Image.new("RGB", (0, 0)), r"image 0: the image is empty \(0x0\)"),
    (lambda d: np.zeros((0, 4, 3), np.uint8), r"image 0: the image is empty"),
    (lambda d: np.zeros((4, 4, 3), np.float32), r"image 0: an array image must be uint8"),
    (lambda d: 42, r"image 0: expected a path, a PIL image or a uint8 array, got int"),
])
def test_bad_images_name_the_image(tmp_path, make, message):
    config = processors(tmp_path)["siglip"][1]
    with pytest.raises(ImageError, match=message) as err:
        preprocess_batch([make(tmp_path)], config)
    assert "\n" not in str(err.value)


def test_truncated_file(tmp_path):
    PIL.Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"image 1: .*cut.png: cannot read the image"):
        preprocess_batch([str(tmp_path / "full.png"), str(tmp_path / "cut.png")], processors(tmp_path)["siglip"][1])


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (20, 30), (300, 90), (1000, 700)],
                         ids=["wide", "tall", "below_min", "long", "beyond_max"])
def test_patches_equal_qwen2_vl_processor(tmp_path, size):
    """Images of any size as Qwen2-VL's processor cuts them: the resized size (rounded to whole 28-pixel
    squares, scaled into the pixel range), the patch grid and each patch's values."""
    import json
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from convert.fields import Fields
    from convert.hf_config import patch_grid
    from jaxvlm.config import ImageProcessing
    from jaxvlm.images import preprocess_patches
    hf = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    processing = ImageProcessing(patches=patch_grid(Fields(saved, "preprocessor_config.json")), resample=3,
                                 mean=tuple(saved["image_mean"]), std=tuple(saved["image_std"]))
    pixels = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)  # (height, width)
    want = hf(images=PIL.Image.fromarray(pixels), return_tensors="np")
    patches, grid = preprocess_patches(pixels, processing)
    assert grid == tuple(want["image_grid_thw"][0])
    assert patches.shape == want["pixel_values"].shape
    assert np.abs(patches - want["pixel_values"]).max() <= 1e-6


def test_an_image_too_long_for_a_patch_grid_is_named():
    from jaxvlm.config import ImageProcessing, PatchGrid
    from jaxvlm.images import ImageError, preprocess_patches
    with pytest.raises(ImageError, match=r"image 3: aspect ratio 201.0 is beyond 200 \(402x2 pixels\)"):
        preprocess_patches(np.zeros((2, 402, 3), np.uint8), ImageProcessing(patches=PatchGrid()), what="image 3")


def test_patch_grid_settings_in_either_layout():
    """transformers 5 writes the pixel range as size's shortest and longest edge; older files as
    min_pixels and max_pixels. A grid sets each image's size itself, so no fixed size goes with it."""
    from convert.fields import Fields
    from convert.hf_config import patch_grid
    from jaxvlm.config import ImageProcessing, PatchGrid
    new = patch_grid(Fields({"size": {"shortest_edge": 3136, "longest_edge": 50176}, "merge_size": 2}, "p.json"))
    old = patch_grid(Fields({"min_pixels": 3136, "max_pixels": 50176, "patch_size": 14}, "p.json"))
    assert new == old == PatchGrid(min_pixels=3136, max_pixels=50176)
    with pytest.raises(ValueError, match="ImageProcessing.patches: sets each image's size itself"):
        ImageProcessing(patches=PatchGrid(), size=(224, 224))
    with pytest.raises(ValueError, match="PatchGrid.max_pixels: must be at least min_pixels=3136, got 100"):
        PatchGrid(min_pixels=3136, max_pixels=100)
