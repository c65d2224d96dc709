"""int8 weights: w ~ scale * q, q = round(w / scale) in [-127, 127], symmetric.

A weight that a product contracts (every projection's kernel and the embedding; `layers.Weight` names
their input axes) is stored as int8 `q` beside a float32 `<name>_scale`, which has the weight's rank and
axis names so that it is sharded and stacked with it:
- per output channel (group_size None): one scale per output, the input axes of the scale are 1;
- per group: one scale per output and per `group_size` consecutive inputs along the last input axis
  (which group_size must divide); the other input axes keep their size.
For the kernel [N, H, D] of an attention output (inputs N and H) that is a scale [1, 1, D] per channel
and [N, H / g, D] per group of g.

Norms, biases, position embeddings and the conv patch embedding stay as they are: they are small, and
a product does not contract them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

SCALE_SUFFIX = "_scale"
_QMAX = 127


def scale_shape(shape: tuple[int, ...], contracted: tuple[int, ...], group_size: int | None,
                name: str = "the weight") -> tuple[int, ...]:
    """The scale's shape for a weight of `shape` whose input axes are `contracted` (counted from the end)."""
    axes = sorted(i % len(shape) for i in contracted)
    last = axes[-1]
    if group_size is None:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    if shape[last] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input axis of {name} "
                         f"(size {shape[last]}, shape {list(shape)})")
    return tuple(n // group_size if i == last else n for i, n in enumerate(shape))


def _grouped(shape: tuple[int, ...], scale: tuple[int, ...], contracted: tuple[int, ...]):
    """The weight's shape with its last input axis split into (groups, group), and the scale's with a 1
    for the group: shapes that broadcast against each other."""
    last = max(i % len(shape) for i in contracted)
    groups = scale[last]
    split = shape[:last] + (groups, shape[last] // groups) + shape[last + 1:]
    return split, scale[:last] + (groups, 1) + scale[last + 1:], last


def quantize(w: jax.Array, contracted: tuple[int, ...], group_size: int | None,
             name: str = "the weight") -> tuple[jax.Array, jax.Array]:
    """(int8 q, float32 scale) with w ~ q * scale."""
    shape = scale_shape(w.shape, contracted, group_size, name)
    split, _, last = _grouped(w.shape, shape, contracted)
    grouped = w.astype(jnp.float32).reshape(split)
    # Per channel, every input axis is reduced (those before the last are shifted by the split); per
    # group, only the group.
    inputs = [i % w.ndim for i in contracted]
    reduce = tuple(i + (i > last) for i in inputs if i != last) if group_size is None else ()
    amax = jnp.max(jnp.abs(grouped), axis=reduce + (last + 1,), keepdims=True)
    scale = jnp.where(amax > 0, amax / _QMAX, 1.0)
    q = jnp.clip(jnp.round(grouped / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return q.reshape(w.shape), scale.reshape(shape)


def dequantize(q: jax.Array, scale: jax.Array, contracted: tuple[int, ...], dtype) -> jax.Array:
    """q * scale in float32, cast to `dtype`. Also for rows taken from both (an embedding lookup), as
    long as the input axes are still there."""
    split, split_scale, _ = _grouped(q.shape, scale.shape, contracted)
    w = q.astype(jnp.float32).reshape(split) * scale.astype(jnp.float32).reshape(split_scale)
    return w.reshape(q.shape).astype(dtype)


def quantize_params(params: Mapping[str, Any], contracted: Mapping[str, tuple[int, ...]],
                    group_size: int | None, prefix: str = "", one: Callable = quantize) -> dict:
    """The params tree with each weight named in `contracted` ('decoder/layer_0/attn/q/kernel' -> its input
    axes) replaced by its int8 values, beside its `<name>_scale`. Works on arrays and on ShapeDtypeStructs
    (under `jax.eval_shape`); `one` quantizes one weight (`quantize`, or a jit-compiled one)."""
    out = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out[key] = quantize_params(value, contracted, group_size, path + "/", one)
        elif path in contracted:
            out[key], out[key + SCALE_SUFFIX] = one(value, contracted[path], group_size, path)
        else:
            out[key] = value
    return out


def scale_axes(axes: Mapping[str, Any], contracted: Mapping[str, tuple[int, ...]], prefix: str = "") -> dict:
    """A tree of logical axis names (`checkpoint.param_axes`) with each scale named as its weight."""
    out = {}
    for key, value in axes.items():
        path = f"{prefix}{key}"
        out[key] = scale_axes(value, contracted, path + "/") if isinstance(value, Mapping) else value
        if path in contracted:
            out[key + SCALE_SUFFIX] = value
    return out
