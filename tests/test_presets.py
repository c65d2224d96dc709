"""Every preset builds (abstractly) and has the parameter count of the released model, which transformers
gives its config too."""

import functools

import jax
import numpy as np
import pytest

from jaxvlm import presets
from jaxvlm.checkpoint import abstract_params, param_axes

# Parameter counts of the released checkpoints (transformers' `num_parameters()`).
RELEASED = {"gemma-2b": 2_506_172_416, "gemma-2-2b": 2_614_341_888, "gemma-2-9b": 9_241_705_984,
            "gemma-2-27b": 27_227_128_320, "gemma-3-1b": 999_885_952, "gemma-3-4b-it": 4_300_079_472,
            "gemma-3-12b-it": 12_187_325_040, "gemma-3-27b-it": 27_432_406_640,
            "paligemma-3b-pt-224": 2_923_466_480, "paligemma2-3b-pt-224": 3_032_242_416,
            "paligemma2-10b-pt-224": 9_662_638_832, "paligemma2-28b-pt-224": 27_650_487_024,
            "phi-3-mini-4k": 3_821_079_552, "phi-3-medium-4k-instruct": 13_960_238_080, "qwen3-0.6b": 596_049_920,
            "qwen3-8b": 8_190_735_360, "qwen3-32b": 32_762_123_264, "qwen3-30b-a3b": 30_532_122_624,
            "llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400, "mistral-7b-v0.3": 7_248_023_552,
            "qwen2.5-7b": 7_615_616_512, "llava-1.5-7b": 7_063_427_072, "qwen2.5-vl-3b-instruct": 3_754_622_976,
            "qwen2.5-vl-7b-instruct": 8_292_166_656, "qwen3-vl-4b-instruct": 4_437_815_808}


@functools.cache
def params_and_axes(name: str):
    """The preset's abstract params and their axes' names, its layers stacked where they stack: a stack's
    layer is traced once rather than each layer (a large preset's trace takes seconds a layer stack). The
    layers' code is the same either way; tests/test_layout.py checks the two layouts against each other."""
    config = presets.get(name)
    try:
        return abstract_params(config, scan_layers=True), param_axes(config, scan_layers=True)
    except ValueError:  # layers of different shapes (a mixture with dense layers between): unrolled
        return abstract_params(config), param_axes(config)


def count(name: str) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_and_axes(name)[0]))


@pytest.mark.parametrize("name", presets.PRESETS)
def test_preset_shapes(name):
    assert count(name) == RELEASED[name]


@pytest.mark.parametrize("name", presets.PRESETS)
def test_transformers_counts_the_same_parameters_for_the_config(name):
    """transformers' model for the same config.json, built on the meta device (nothing allocated)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    published = presets.CONFIGS[name]
    with torch.device("meta"):
        model = getattr(transformers, published["architectures"][0])(transformers.AutoConfig.for_model(**published))
    assert sum(p.numel() for p in model.parameters()) == count(name)


def test_a_vision_language_preset_has_its_encoder():
    config = presets.get("paligemma2-10b-pt-224")
    assert config.is_vlm and config.vision.image_size == 224 and config.decoder.width == 3584
    assert presets.get("gemma-3-27b-it").vision.image_size == 896


def test_a_null_window_is_none():
    """mistral-7b-v0.3 writes "sliding_window": null: no window, where a missing field is Mistral's 4096."""
    assert presets.get("mistral-7b-v0.3").decoder.sliding_window is None


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        presets.get("gpt-5")


AXIS_NAMES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "labels", "image_tokens", "patch", "channels",
              "experts"}


@pytest.mark.parametrize("name", presets.PRESETS)
def test_every_param_names_each_of_its_axes(name):
    """Sharding rules (and everything else keyed on a weight's layout) read these names."""
    params, axes = params_and_axes(name)
    shapes = jax.tree.leaves(params)
    axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(shapes) == len(axes)
    for shape, names in zip(shapes, axes):
        assert len(names) == len(shape.shape) and set(names) <= AXIS_NAMES | {"layers"}, (shape, names)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_projection_names_its_input_axes(scan_layers):
    """int8 scales are taken over a weight's input axes, read from the layers (no per-family table):
    every kernel and the embedding name them; nothing else does."""
    from jaxvlm.checkpoint import contracted_axes, param_name
    from jaxvlm.shapes.train import CONFIG  # a vision-language model: encoder, projector and decoder
    contracted = contracted_axes(CONFIG, scan_layers)
    names = [param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params(CONFIG, scan_layers=scan_layers))[0]]
    expected = {n for n in names if (n.endswith("/kernel") and "patch_embed" not in n) or n.endswith("/embedding")}
    assert set(contracted) == expected
    assert contracted["decoder/embedder/embedding"] == (-1,)  # [V, D]: D
    layer = "layers" if scan_layers else "layer_0"
    assert contracted[f"decoder/{layer}/attn/q/kernel"] == (-3,)  # [D, N, H]: D
    assert contracted[f"decoder/{layer}/attn/o/kernel"] == (-3, -2)  # [N, H, D]: N and H
    assert contracted[f"decoder/{layer}/mlp/down/kernel"] == (-2,)  # [F, D]: F
