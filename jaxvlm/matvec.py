"""Fused products with int8 or bfloat16 weights on CPU (C++, `matvec.cc`, through `jax.ffi`).

XLA:CPU converts int8 or bfloat16 weights to float32 before a product, which makes a matrix-vector
product about 10x slower than with float32 weights, and inside the decode loop it hoists that conversion
out of the loop: a float32 copy of every weight for as long as decoding runs. The kernel reads each
weight once, in its own dtype, and accumulates in float32: an int8 model decodes faster than a float32
one and holds no float32 weights (`benchmarks/quantized.py` measures both).

It serves the products of the decode step and of prefill alike, so that a long prompt never holds
float32 copies of the weights either (against XLA's path for the same weights, 2048 x 16384: 2.4-6.9x
faster with int8 and 1.7-3.9x with bfloat16 at 16 to 64 rows; at 268 rows 1.1x faster and 1.3x slower;
at 1024 rows 1.1x and 1.7x slower). It is used where the inference functions allow it (`allowed`, on
one device: the kernel has no sharding rule) and the backend is the CPU. Everything else, GPU and TPU
included (where XLA fuses the conversion into the product), takes XLA's path. A missing or unloadable
library is one warning, then XLA's path.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import glob
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

MAX_ROWS: int | None = None  # past this many rows of x, XLA's path (None: no limit; 0: XLA's path always)
LIBRARY_PATTERN = os.path.join(os.path.dirname(__file__), "_matvec*.so")
_TARGETS = {jnp.dtype(jnp.int8): "jaxvlm_int8_matmul", jnp.dtype(jnp.bfloat16): "jaxvlm_bf16_matmul"}

_allowed = contextvars.ContextVar("jaxvlm_fused_matvec", default=False)


@contextlib.contextmanager
def allowed(enabled: bool = True):
    """Within this block (while a function is traced), products that the kernel serves use it."""
    token = _allowed.set(enabled)
    try:
        yield
    finally:
        _allowed.reset(token)


@functools.cache
def available() -> bool:
    """Loads the kernel library and registers its functions with XLA, once; False (after one warning)
    when the library is missing or cannot be loaded."""
    paths = glob.glob(LIBRARY_PATTERN)
    problem = f"{LIBRARY_PATTERN}: no such library (the install did not build it)"
    if paths:
        try:
            library = ctypes.cdll.LoadLibrary(paths[0])
            for target in _TARGETS.values():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
            return True
        except (OSError, AttributeError) as e:
            problem = f"{paths[0]}: cannot be loaded ({e})"
    warnings.warn(f"jaxvlm's CPU kernel for int8 and bfloat16 weights is unavailable, {problem}; "
                  "falling back to XLA, which decodes more slowly and holds float32 copies of the weights "
                  "(reinstall jaxvlm with a C++ compiler to build it)", RuntimeWarning, stacklevel=2)
    return False


def _layout(spec: str):
    """For 'BTD,DNH->BTNH': (batch letters, input letters, output letters, whether the kernel's inputs
    lead), when x is [batch..., inputs...], the kernel [inputs..., outputs...] or [outputs..., inputs...]
    and the result [batch..., outputs...]; None for any other spec."""
    inputs, out = spec.split("->")
    x, kernel = inputs.split(",")
    contracted = "".join(c for c in kernel if c not in out)
    produced = "".join(c for c in kernel if c in out)
    batch = x[:len(x) - len(contracted)]
    if x != batch + contracted or out != batch + produced:
        return None
    if kernel == contracted + produced:
        return batch, contracted, produced, True
    if kernel == produced + contracted:
        return batch, contracted, produced, False
    return None


def einsum(spec: str, x: jax.Array, kernel: jax.Array, scale: jax.Array | None, out_dtype) -> jax.Array | None:
    """jnp.einsum(spec, x, dequantized kernel) through the kernel, as `out_dtype`; None when the kernel
    does not serve this product (not allowed here, not the CPU, another dtype or layout, too many rows)."""
    target = _TARGETS.get(jnp.dtype(kernel.dtype))
    if (target is None or not _allowed.get() or jax.default_backend() != "cpu"
            or (scale is None) != (kernel.dtype == jnp.bfloat16)):
        return None
    layout = _layout(spec)
    if layout is None:
        return None
    batch, contracted, produced, leading = layout
    rows = int(np.prod(x.shape[:len(batch)]))
    if (MAX_ROWS is not None and rows > MAX_ROWS) or not available():
        return None
    K = int(np.prod(x.shape[len(batch):]))
    out_shape = kernel.shape[len(contracted):] if leading else kernel.shape[:len(produced)]
    N = int(np.prod(out_shape))
    w = kernel.reshape((K, N) if leading else (N, K))
    args = [x.reshape(rows, K).astype(jnp.float32), w]
    if scale is not None:
        groups = scale.size // N
        args.append(scale.astype(jnp.float32).reshape((groups, N) if leading else (N, groups)))
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, N), jnp.float32))(*args, contract_leading=leading)
    return y.reshape(x.shape[:len(batch)] + tuple(out_shape)).astype(out_dtype)
