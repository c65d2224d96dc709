"""The fused CPU kernel for int8 and bfloat16 weights against XLA's path (dequantize, then einsum)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvlm

from jaxvlm import matvec
from jaxvlm.layers import contracted_axes, project
from jaxvlm.quantize import quantize

# (spec, x shape, kernel shape): the decoder's projections ([K, N] kernels, inputs first, including the
# attention output's two input axes) and the tied head ([N, K]: the embedding's rows are the outputs).
SPECS = [
    ("BTD,DNH->BTNH", (1, 1, 40), (40, 3, 8)),
    ("BTNH,NHD->BTD", (2, 1, 3, 8), (3, 8, 37)),
    ("BTD,DF->BTF", (5, 1, 48), (48, 333)),  # columns past the last whole tile of 256
    ("BTD,VD->BTV", (3, 1, 64), (77, 64)),
    ("BTD,VD->BTV", (1, 1, 24), (50, 24)),  # inputs past the last whole vector of 16
    ("BTD,DF->BTF", (1, 6, 32), (32, 1024)),  # a short prefill: six rows of one prompt (packed columns)
]


def _run(spec, x, kernel, scale, fused: bool, dtype=jnp.float32):
    @jax.jit
    def f(x, kernel, scale):
        with matvec.allowed(fused):
            return project(spec, x, kernel, scale, dtype)
    return np.asarray(f(x, kernel, scale), np.float32)


def _inputs(x_shape, k_shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape), jax.random.normal(kw, k_shape)


def test_the_library_was_built_by_the_install():
    assert matvec.available()


@pytest.mark.parametrize("spec,x_shape,k_shape", SPECS)
@pytest.mark.parametrize("group_size", [None, 8])
def test_int8_kernel_matches_xla(spec, x_shape, k_shape, group_size):
    x, w = _inputs(x_shape, k_shape)
    q, scale = quantize(w, contracted_axes(spec), group_size)
    want = _run(spec, x, q, scale, fused=False)
    got = _run(spec, x, q, scale, fused=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("spec,x_shape,k_shape", SPECS)
def test_bfloat16_kernel_matches_xla(spec, x_shape, k_shape):
    x, w = _inputs(x_shape, k_shape)
    w = w.astype(jnp.bfloat16)
    for dtype in (jnp.float32, jnp.bfloat16):  # float32 or bfloat16 activations
        want = _run(spec, x.astype(dtype), w, None, fused=False, dtype=dtype)
        got = _run(spec, x.astype(dtype), w, None, fused=True, dtype=dtype)
        tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bfloat16 output: rounding of the last bit
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_the_kernel_is_what_the_program_runs():
    """Where it serves, the compiled program calls the kernel on int8 weights: no conversion of the
    weights to float32 appears in it."""
    spec, x_shape, k_shape = SPECS[2]
    x, w = _inputs(x_shape, k_shape)
    q, scale = quantize(w, contracted_axes(spec), None)

    def program(fused):
        def f(x, q, scale):
            with matvec.allowed(fused):
                return project(spec, x, q, scale, jnp.float32)
        return jax.jit(f).lower(x, q, scale).compile().as_text()
    assert "jaxvlm_int8_matmul" in program(True)
    assert "jaxvlm_int8_matmul" not in program(False) and "s8[48,333]" in program(False)


def test_a_long_prefill_takes_the_kernel_too():
    """Many rows (a prompt's tokens) go through the kernel as well: no float32 copy of a weight, whatever
    the prompt's length; its packed path (more rows than one pass takes) matches XLA's."""
    x, w = _inputs((2, 150, 40), (40, 300))
    q, scale = quantize(w, (0,), 8)

    def f(x, q, scale):
        with matvec.allowed(True):
            return project("BTD,DF->BTF", x, q, scale, jnp.float32)
    assert "jaxvlm_int8_matmul" in jax.jit(f).lower(x, q, scale).compile().as_text()
    want = _run("BTD,DF->BTF", x, q, scale, fused=False)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, q, scale)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_missing_library_warns_once_and_falls_back(monkeypatch):
    spec, x_shape, k_shape = SPECS[0]
    x, w = _inputs(x_shape, k_shape, seed=1)
    q, scale = quantize(w, contracted_axes(spec), None)
    want = _run(spec, x, q, scale, fused=False)
    monkeypatch.setattr(matvec, "LIBRARY_PATTERN", "/nonexistent/_matvec*.so")
    matvec.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"unavailable, /nonexistent/_matvec\*\.so: no such library.*XLA"):
            got = _run(spec, x, q, scale, fused=True)
        np.testing.assert_array_equal(got, want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second product: no second warning
            _run(spec, x * 2, q, scale, fused=True)
    finally:
        matvec.available.cache_clear()


@pytest.mark.parametrize("flags", [("--dtype", "bfloat16"), ("--quantize", "int8")])
def test_decoding_holds_no_float32_copy_of_a_weight(flags, hf_checkpoint, convert_command, tmp_path):
    """bfloat16 and int8 weights stay as they are in the compiled decode step (products through the
    kernel, the embedding's rows taken as stored): no float32 array of any weight's shape appears."""
    model = jaxvlm.load(convert_command(hf_checkpoint("gemma"), str(tmp_path / "jax"), *flags))
    weights = {",".join(map(str, x.shape)) for x in jax.tree.leaves(model.params)
               if x.ndim >= 2 and x.dtype in (jnp.int8, jnp.bfloat16)}  # not the (float32) scales
    program = model.decode_program(np.array([[5, 9, 3, 17]]))
    assert "custom-call" in program
    copies = [shape for shape in weights if f"f32[{shape}]" in program]
    assert not copies, f"float32 copies of weights of shapes {copies}"
