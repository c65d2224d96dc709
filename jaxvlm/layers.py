"""The building blocks shared by every model: projections, norms, MLPs, embeddings.

Shape alphabet, used in docstrings, names and einsum strings across jaxvlm:
  B batch, T query length, S key/value (cache) length, D model width, F MLP width,
  N query heads, K kv heads, G = N // K, H head dim, V vocab, L layers,
  P image tokens per image, C channels.

Every parameter names what each of its axes is (its logical axes), so that sharding rules, and whatever
else depends on a weight's layout, are derived from the names in one place (`jaxvlm.sharding`):
  embed (D, and a vision encoder's width), heads (N), kv_heads (K), head_dim (H), mlp (F), vocab (V),
  labels (a classification head's outputs), image_tokens (the encoder's positions), patch and channels
  (the patch embedding's kernel). A weight that a product contracts also says which of its axes are the
  inputs (`Weight.contracted`): int8 scales are taken over them (`jaxvlm.quantize`). The names ride on
  the params only at `init` (flax's logical partitioning boxes); `jaxvlm.checkpoint.param_axes` and
  `contracted_axes` read them, everything else sees plain arrays.

Parameters are stored in whatever dtype the checkpoint holds and cast to the module's `dtype` (the
compute dtype) where they are used; norms, softmax and logits run in float32. A weight stored as int8
has its scale beside it (`<name>_scale`, see `jaxvlm.quantize`); `project` dequantizes it, or hands int8
and bfloat16 weights to the fused CPU kernel (`jaxvlm.matvec`) where that serves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax import struct

from jaxvlm import lora, matvec
from jaxvlm.quantize import SCALE_SUFFIX, dequantize

Dtype = Any
Axes = tuple[str, ...]


class Weight(nn.LogicallyPartitioned):
    """A param's box at init: the logical names of its axes and, for a weight that a product contracts,
    which axes are its inputs, counted from the end (so a stack of layers, which adds a leading axis,
    keeps them)."""

    contracted: tuple[int, ...] = struct.field(pytree_node=False, default=())


def named(init: Callable, axes: Axes, contracted: tuple[int, ...] = ()) -> Callable:
    """An initializer whose parameter carries the logical names of its axes (and its input axes)."""
    contracted = tuple(i - len(axes) if i >= 0 else i for i in contracted)
    return lambda *args: Weight(init(*args), axes, contracted=contracted)


def contracted_axes(spec: str) -> tuple[int, ...]:
    """The kernel axes an einsum spec such as 'BTD,DNH->BTNH' sums over: (0,) here."""
    kernel, out = spec.split(",")[1].split("->")
    return tuple(i for i, letter in enumerate(kernel) if letter not in out)


def project(spec: str, x: jax.Array, kernel: jax.Array, scale: jax.Array | None, dtype: Dtype,
            out_dtype: Dtype | None = None) -> jax.Array:
    """jnp.einsum(spec, x, kernel) in `dtype` (accumulated and returned in `out_dtype` when given), with
    the kernel in any float dtype or int8 with its `scale`."""
    fused = matvec.einsum(spec, x, kernel, scale, out_dtype or dtype)
    if fused is not None:
        return fused
    w = kernel.astype(dtype) if scale is None else dequantize(kernel, scale, contracted_axes(spec), dtype)
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def stored_scale(module: nn.Module, name: str) -> jax.Array | None:
    """The int8 scale stored beside param `name`, or None for a float param."""
    scale = name + SCALE_SUFFIX
    return module.get_variable("params", scale) if module.has_variable("params", scale) else None


class Einsum(nn.Module):
    """A projection spelled as an einsum, e.g. 'BTD,DNH->BTNH' with kernel `shape` (D, N, H) and `axes`
    ('embed', 'heads', 'head_dim'). A bias covers the kernel's axes that reach the output, (N, H) here."""

    spec: str
    shape: tuple[int, ...]
    axes: Axes
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None  # accumulate and return in this dtype (float32 for output logits)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", named(nn.initializers.lecun_normal(), self.axes, contracted_axes(self.spec)),
                            self.shape, self.dtype)
        y = project(self.spec, x, kernel, stored_scale(self, "kernel"), self.dtype, self.out_dtype)
        if self.has_variable("params", lora.A):  # low-rank adapters beside the kernel (see jaxvlm.lora)
            a, b = self.get_variable("params", lora.A), self.get_variable("params", lora.B)
            y = y + lora.apply(self.spec, x, a, b, self.dtype).astype(y.dtype)
        if self.use_bias:
            kernel_letters, out_letters = self.spec.split(",")[1].split("->")
            kept = [i for i, letter in enumerate(kernel_letters) if letter in out_letters]
            shape, axes = tuple(self.shape[i] for i in kept), tuple(self.axes[i] for i in kept)
            y = y + self.param("bias", named(nn.initializers.zeros_init(), axes), shape, self.dtype).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) * scale, normalised in float32.

    `scale_offset = 1` is Gemma's convention: the stored weight w is used as (1 + w), and the product is
    taken in float32 before casting back. With no offset (Llama, Qwen3, Phi-3) the normalised value is
    cast to the input dtype first and then scaled, as those references do; in float32 the two agree.
    """

    eps: float = 1e-6
    scale_offset: float = 0.0
    dtype: Dtype = jnp.float32
    axis: str = "embed"  # what the normalised axis is: head_dim for q/k norms

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.scale_offset else nn.initializers.ones_init()
        scale = self.param("scale", named(init, (self.axis,)), (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale_offset:
            return (normed * (self.scale_offset + scale.astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's
}


class GatedMLP(nn.Module):
    """down(act(x W_gate) * x W_up): SwiGLU with silu, GeGLU with gelu_tanh.  x: [B, T, D] -> [B, T, D]."""

    width: int
    mlp_dim: int
    activation: str
    use_bias: bool = False  # Qwen2.5-VL's image encoder has them
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F, bias = self.width, self.mlp_dim, self.use_bias
        gate = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias, dtype=self.dtype, name="gate")(x)
        up = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias, dtype=self.dtype, name="up")(x)
        down = Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), bias, dtype=self.dtype, name="down")
        return down(ACTIVATIONS[self.activation](gate) * up)


class MLP(nn.Module):
    """fc2(act(fc1(x))) with biases: the vision encoder's MLP and LLaVA's projector.  [B, T, D] -> [B, T, out]."""

    mlp_dim: int
    out_dim: int
    activation: str
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F, O = x.shape[-1], self.mlp_dim, self.out_dim
        h = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), self.use_bias, dtype=self.dtype, name="fc1")(x)
        fc2 = Einsum("BTF,FD->BTD", (F, O), ("mlp", "embed"), self.use_bias, dtype=self.dtype, name="fc2")
        return fc2(ACTIVATIONS[self.activation](h))


def take_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] along axis 0. On CPU a bfloat16 table's rows are taken as their 16-bit patterns: XLA:CPU
    gathers bfloat16 through float32, and inside the decode loop it would hoist that conversion, a float32
    copy of the whole table, out of the loop. Elsewhere a plain gather: on TPU the bitcast is itself a copy
    of the table (16-bit integers are tiled unlike bfloat16 there).

    One row of an 8-bit table (a decode step at batch 1) is gathered with a second, unused one: XLA:TPU
    turns a lone row's gather into a slice, which it serves by laying the whole table out anew (Gemma 2's
    int8 embedding on v5e:2x2: a 147 MB copy a device, a step), while a gather of two reads in place.
    (Taking the 32-row tile that holds the row instead copies the table where a device's share of the
    vocabulary is not whole tiles: PaliGemma's 257,216 rows over 4 devices.)"""
    if table.dtype.itemsize == 1 and index.size == 1:
        pair = jnp.concatenate([index.reshape(1), jnp.zeros(1, index.dtype)])
        return jnp.take(table, pair, axis=0)[:1].reshape(*index.shape, table.shape[1])
    if table.dtype != jnp.bfloat16:
        return jnp.take(table, index, axis=0)

    def as_bits(table, index):
        bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), index, axis=0)
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)

    return jax.lax.platform_dependent(table, index, cpu=as_bits, default=lambda t, i: jnp.take(t, i, axis=0))


class Embedder(nn.Module):
    """Token embedding table [V, D], optionally scaled by sqrt(D) (Gemma), and the tied output head."""

    vocab_size: int
    width: int
    scale_by_sqrt_width: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        # Unit-variance inputs after the sqrt(D) scale, and unit-scale logits from the tied head, at init.
        # A lookup takes rows; the tied head contracts D: the inputs are the embed axis either way.
        init = named(nn.initializers.normal(stddev=self.width ** -0.5), ("vocab", "embed"), contracted=(1,))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.width), self.dtype)

    def encode(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[B, T] -> float[B, T, D]."""
        x = take_rows(self.embedding, tokens)
        scale = stored_scale(self, "embedding")
        x = x.astype(self.dtype) if scale is None else dequantize(x, jnp.take(scale, tokens, axis=0), (-1,), self.dtype)
        if self.scale_by_sqrt_width:
            # The scale is rounded to the activation dtype before multiplying, as Gemma does
            # (sqrt(2048) = 45.25 in bfloat16).
            x = x * jnp.asarray(np.sqrt(self.width), dtype=self.dtype)
        return x

    def decode(self, x: jax.Array) -> jax.Array:
        """Tied output head. x: float[B, T, D] -> float32[B, T, V]."""
        return project("BTD,VD->BTV", x, self.embedding, stored_scale(self, "embedding"), self.dtype, jnp.float32)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): Gemma 2's bound on attention and output logits."""
    return x if cap is None else cap * jnp.tanh(x / cap)
