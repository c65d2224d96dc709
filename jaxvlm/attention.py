"""Multi-head attention for every family: MHA (K = N), GQA, MQA (K = 1) through one grouped einsum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm.config import DecoderConfig
from jaxvlm.kv_cache import write
from jaxvlm.layers import Dtype, Einsum, RMSNorm, softcap
from jaxvlm.rope import apply_rope

# Masked logits get a large finite value rather than -inf, so a fully masked row (a padding query)
# stays finite instead of turning into NaN.
_MASKED = -2.3819763e38


class Attention(nn.Module):
    config: DecoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache_kv: tuple[jax.Array, jax.Array] | None = None, end: jax.Array | int = 0):
        """x: [B, T, D]; cos, sin: float32[B, T, R]; mask: bool[B, T, S].

        With `cache_kv` ([B, S, K, H] each) the new keys and values are written at slots end .. end + T - 1
        and attention runs over the whole cache; without it, S = T. Returns (out [B, T, D], (k, v)).
        """
        c = self.config
        D, N, K, G, H = c.width, c.num_heads, c.num_kv_heads, c.group_size, c.head_dim
        bias = lambda *shape: shape if c.qkv_bias else None
        q = Einsum("BTD,DNH->BTNH", (D, N, H), bias(N, H), dtype=self.dtype, name="q")(x)
        k = Einsum("BSD,DKH->BSKH", (D, K, H), bias(K, H), dtype=self.dtype, name="k")(x)
        v = Einsum("BSD,DKH->BSKH", (D, K, H), bias(K, H), dtype=self.dtype, name="v")(x)
        if c.use_qk_norm:  # per-head RMSNorm over H, before RoPE (Qwen3)
            q = RMSNorm(c.norm_eps, c.norm_scale_offset, dtype=self.dtype, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, c.norm_scale_offset, dtype=self.dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is not None:
            k, v = write(cache_kv[0], k, end), write(cache_kv[1], v, end)

        B, T = q.shape[:2]
        q = (q * jnp.asarray(c.query_scale, q.dtype)).reshape(B, T, K, G, H)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        logits = softcap(logits, c.attn_logit_softcap)
        logits = jnp.where(mask[:, None, None], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
        out = Einsum("BTNH,NHD->BTD", (N, H, D), (D,) if c.out_bias else None, dtype=self.dtype, name="o")(out)
        return out, (k, v)
