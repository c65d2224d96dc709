"""Numerics of the shared layers against the reference modules, in bfloat16 where the quirks show."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvlm.layers import Embedder, RMSNorm


@pytest.mark.parametrize("family", ["gemma", "qwen3"])
def test_rms_norm_matches_transformers_in_bfloat16(family):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32) * 3
    w = rng.normal(size=(64,)).astype(np.float32)
    ref = GemmaRMSNorm(64, eps=1e-6) if family == "gemma" else Qwen3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        want = ref.to(torch.bfloat16)(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    norm = RMSNorm(eps=1e-6, scale_offset=1.0 if family == "gemma" else 0.0, dtype=jnp.bfloat16)
    got = norm.apply({"params": {"scale": jnp.asarray(w, jnp.bfloat16)}}, jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_embedding_scale_is_rounded_to_the_activation_dtype():
    """sqrt(2048) = 45.2548... becomes 45.25 in bfloat16, as Gemma multiplies by it."""
    table = jnp.ones((4, 2048), jnp.bfloat16)
    out = Embedder(4, 2048, scale_by_sqrt_width=True, dtype=jnp.bfloat16).apply(
        {"params": {"embedding": table}}, jnp.array([[1]]), method=Embedder.encode)
    assert float(out[0, 0, 0]) == 45.25
    out32 = Embedder(4, 2048, scale_by_sqrt_width=True).apply(
        {"params": {"embedding": table.astype(jnp.float32)}}, jnp.array([[1]]), method=Embedder.encode)
    assert float(out32[0, 0, 0]) == pytest.approx(np.sqrt(2048), rel=1e-7)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 2)])
def test_take_rows_is_the_rows_in_every_path(dtype, shape):
    """One row of an 8-bit table is gathered with a second one (see take_rows); the rest plainly."""
    from jaxvlm.layers import take_rows
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.integers(-127, 128, size=(60, 8)), dtype)
    index = jnp.asarray(rng.integers(1, 60, size=shape), jnp.int32)
    got = jax.jit(take_rows)(table, index)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[np.asarray(index)])
