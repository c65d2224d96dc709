"""Every preset builds (abstractly) and has the parameter count of the released model."""

import jax
import numpy as np
import pytest

from jaxvlm import presets
from jaxvlm.checkpoint import abstract_params
from jaxvlm.config import ModelConfig

# Parameter counts transformers reports (`num_parameters()`) for the released checkpoints.
RELEASED = {"gemma-2b": 2_506_172_416, "gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952,
            "phi-3-mini-4k": 3_821_079_552, "qwen3-0.6b": 596_049_920}


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_preset_shapes(name):
    tree = abstract_params(ModelConfig(decoder=presets.get(name)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) == RELEASED[name]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt-5'"):
        presets.get("gpt-5")


AXIS_NAMES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "labels", "image_tokens", "patch", "channels"}


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_param_names_each_of_its_axes(name):
    """Sharding rules (and everything else keyed on a weight's layout) read these names."""
    from jaxvlm.checkpoint import param_axes
    config = ModelConfig(decoder=presets.get(name))
    shapes = jax.tree.leaves(abstract_params(config))
    axes = jax.tree.leaves(param_axes(config), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(shapes) == len(axes)
    for shape, names in zip(shapes, axes):
        assert len(names) == len(shape.shape) and set(names) <= AXIS_NAMES, (shape, names)


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
