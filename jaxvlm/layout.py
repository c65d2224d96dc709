"""How a stack of layers is held: unrolled (`layer_0`, `layer_1`, ... each its own params) or stacked
(`layers`, every param with a leading [L] axis, run by a `lax.scan`).

The params say which layout they are in, so the model reads its layout from them and no flag travels
beside them. Stacked layers compile in a time that does not grow with depth and are the norm on TPU;
unrolled layers decode about twice as fast on XLA:CPU, where slicing a stacked weight inside the decode
loop copies it (`benchmarks/layers.py` measures both).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STACKED = "layers"  # the name of a stack of layers held as [L, ...] arrays
_UNROLLED = re.compile(r"layer_(\d+)$")


def is_stacked(params) -> bool:
    """Whether `params` (a tree with a decoder and/or a vision encoder) hold their layers stacked."""
    return any(isinstance(sub, dict) and STACKED in sub for sub in params.values()) if isinstance(params, dict) \
        else False


def _unrolled_keys(tree: dict) -> list[str]:
    keys = sorted((k for k in tree if _UNROLLED.match(k)), key=lambda k: int(_UNROLLED.match(k).group(1)))
    return keys


def stack(params: Any) -> Any:
    """Unrolled -> stacked: every run of `layer_i` subtrees becomes one `layers` subtree of [L, ...] arrays."""
    if not isinstance(params, dict):
        return params
    keys = _unrolled_keys(params)
    out = {k: stack(v) for k, v in params.items() if k not in keys}
    if keys:
        out[STACKED] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in keys])
    return out


def unstack(params: Any) -> Any:
    """Stacked -> unrolled: each `layers` subtree of [L, ...] arrays becomes `layer_0` .. `layer_{L-1}`."""
    if not isinstance(params, dict):
        return params
    out = {k: unstack(v) for k, v in params.items() if k != STACKED}
    if STACKED in params:
        depth = jax.tree.leaves(params[STACKED])[0].shape[0]
        for i in range(depth):
            out[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params[STACKED])
    return out


def relayout(params: Any, stacked: bool) -> Any:
    """`params` in the asked layout (as they are when already in it)."""
    if is_stacked(params) == stacked:
        return params
    return stack(params) if stacked else unstack(params)


def layer_stack(block: type[nn.Module], depth: int, scan: bool, remat: bool, in_axes: tuple,
                per_layer=lambda i: {}, **kwargs):
    """`depth` blocks: a list of unrolled layers, or one module scanning a stacked block (params [L, ...],
    named `layers`; the remaining call arguments split along L where `in_axes` says 0). `per_layer(i)`
    gives layer i's own attributes, which a stack needs to be the same for every layer."""
    block = nn.remat(block) if remat else block
    if not scan:
        return [block(**kwargs, **per_layer(i), name=f"layer_{i}") for i in range(depth)]
    own = [per_layer(i) for i in range(depth)]
    if any(o != own[0] for o in own):
        differ = next(k for o in own for k in o if o[k] != own[0][k])
        raise ValueError(f"layers differ in {differ!r} (their params have other shapes), so they cannot be "
                         "stacked: use unrolled layers (scan_layers=False)")
    kwargs.update(own[0])
    scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                      in_axes=in_axes, length=depth, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(**kwargs, name=STACKED)
