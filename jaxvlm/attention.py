"""Multi-head attention for every model: MHA (K = N), GQA, MQA (K = 1).

The decoders add RoPE, a mask and a KV cache; the vision encoders use it bare (full attention, biases);
SigLIP's pooling head gives it a separate key/value input (a learned probe attends over the patches).

Attention runs through `jax.nn.dot_product_attention` (`fused_attention`): cuDNN's flash attention on
GPU where it takes the dtype and shapes, XLA's implementation elsewhere. Masks of every kind (causal,
sliding window, bidirectional prefix, padding) reach it as one boolean mask, so they stay exact. The
grouped einsum remains for what the fused function cannot express: Gemma 2's soft-capped logits, and the
attention weights kept for inspection (applied with mutable=["intermediates"]); and for a decode step
over one kv head off GPU, which it spells without the query axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm import splash
from jaxvlm.config import DecoderConfig
from jaxvlm.kv_cache import ring_write, write
from jaxvlm.layers import Dtype, Einsum, RMSNorm, softcap
from jaxvlm.rope import apply_rope

# Masked logits get a large finite value rather than -inf, so a fully masked row (a padding query)
# stays finite instead of turning into NaN.
_MASKED = -2.3819763e38


class Attention(nn.Module):
    """Multi-head attention over [B, T, D] inputs: query, key and value projections ([D, N, H], [D, K, H]),
    optional query/key RMSNorms and rotary embedding, a boolean mask, an optional KV cache (or ring of a
    sliding window) and the output projection [N, H, D]. Grouped-query: each of the K key/value heads
    serves N / K query heads. Every kernel names its axes, so sharding, int8 and LoRA follow from them."""

    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    query_scale: float
    qkv_bias: bool = False
    out_bias: bool = False
    logit_softcap: float | None = None
    qk_norm_eps: float | None = None  # set: RMSNorm over H on q and k before RoPE (Qwen3)
    norm_scale_offset: float = 0.0
    dtype: Dtype = jnp.float32

    @classmethod
    def for_decoder(cls, c: DecoderConfig, dtype: Dtype, name: str) -> "Attention":
        return cls(c.num_heads, c.num_kv_heads, c.head_dim, c.query_scale, c.qkv_bias, c.out_bias,
                   c.attn_logit_softcap, c.norm_eps if c.use_qk_norm else None, c.norm_scale_offset, dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None, mask: jax.Array | None = None,
                 cache_kv: tuple[jax.Array, jax.Array] | None = None, end: jax.Array | int = 0,
                 kv_input: jax.Array | None = None, ring: bool = False, prompt=None):
        """x: [B, T, D]; rope: (cos, sin), float32[B, T, R]; mask: bool[B, T, S], None for full attention.

        Keys and values come from `kv_input` [B, S, D] when given, else from x. With `cache_kv` ([B, S, K, H]
        each) the new keys and values are written at slots end .. end + T - 1 and attention runs over the
        whole cache. A `ring` cache ([B, W, K, H], see `jaxvlm.kv_cache`) takes them at their slots modulo
        W; one new token attends over the ring after the write, several over the ring before it and
        themselves (the mask is laid out accordingly). `prompt` (valid bool[B, T], the blocks int32[B, T] or
        None, the layer's window, whether it is local: a bool, or traced in a scan, the longest block, whether
        the window bounds the blocks) says that the tokens are a prompt run into a fresh cache, which
        `jaxvlm.splash` may serve. Returns (out [B, T, D], the updated (k, v)).
        """
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        D = x.shape[-1]
        own_keys = kv_input is None
        kv_input = x if kv_input is None else kv_input
        q_axes, kv_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = Einsum("BTD,DNH->BTNH", (D, N, H), q_axes, self.qkv_bias, dtype=self.dtype, name="q")(x)
        k = Einsum("BSD,DKH->BSKH", (D, K, H), kv_axes, self.qkv_bias, dtype=self.dtype, name="k")(kv_input)
        v = Einsum("BSD,DKH->BSKH", (D, K, H), kv_axes, self.qkv_bias, dtype=self.dtype, name="v")(kv_input)
        if self.qk_norm_eps is not None:
            qk_norm = lambda name: RMSNorm(self.qk_norm_eps, self.norm_scale_offset, self.dtype, "head_dim", name=name)
            q, k = qk_norm("q_norm")(q), qk_norm("k_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new_kv = prompt_kv = (k, v)
        if cache_kv is not None and ring:
            new_kv = ring_write(cache_kv[0], k, end), ring_write(cache_kv[1], v, end)
            if k.shape[1] == 1:
                k, v = new_kv
            else:
                k, v = (jnp.concatenate([old, new.astype(old.dtype)], axis=1) for old, new in zip(cache_kv, (k, v)))
        elif cache_kv is not None:
            k, v = new_kv = write(cache_kv[0], k, end), write(cache_kv[1], v, end)

        inspect = self.is_mutable_collection("intermediates")
        # A decode step (one query a row) over one kv head (MQA) off GPU takes the grouped einsum too, spelt
        # without the query axis: through XLA's attention the TPU compiler read PaliGemma's step (int8,
        # batch 8, 8192 slots, v5e:2x2, greedy) as 1.16x the minimal step's bytes, this way 1.07x. (With
        # several kv heads XLA's attention reads a little less: Qwen3-0.6B 1.09x against 1.10x.)
        decode_mqa = q.shape[1] == 1 and k.shape[2] == 1 and jax.default_backend() != "gpu"
        fused = self.logit_softcap is None and not inspect and not decode_mqa
        dense = lambda: (fused_attention(q, k, v, mask, self.query_scale) if fused
                         else self._grouped_einsum(q, k, v, mask))
        if prompt is not None and not inspect and splash.supported(q, prompt_kv[0]):
            valid, blocks, window, local, longest_block, bounded = prompt  # a fresh cache: the prompt's keys alone
            run = lambda w: splash.attention(q, *prompt_kv, valid, w, self.query_scale, self.logit_softcap, dense,
                                             blocks, longest_block, bounded)
            out = run(window if local else None) if isinstance(local, bool) else \
                jax.lax.cond(local, lambda: run(window), lambda: run(None))
        elif mask is None and own_keys and cache_kv is None and not inspect and splash.supported(q, k):
            # an image encoder's full attention over its patches, inside prefill: 4096 patches (Gemma 3 at
            # 896 px) would hold [B, N, 4096, 4096] float32 scores
            out = splash.attention(q, k, v, None, None, self.query_scale, self.logit_softcap, dense, full=True)
        else:
            out = dense()
        out = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), self.out_bias, dtype=self.dtype,
                     name="o")(out)
        return out, new_kv

    def _grouped_einsum(self, q, k, v, mask):
        """Attention spelled out, with the soft-cap, and the weights sown for inspection."""
        B, T, N, H = q.shape
        K = k.shape[2]
        q = q * jnp.asarray(self.query_scale, q.dtype)
        if T == 1 and not self.is_mutable_collection("intermediates"):
            # a decode step: one query a row, spelt without T (the TPU compiler then reads the cache as it
            # lies; with T it read about 7 MB more a layer per device for Gemma 2 at batch 8)
            logits = jnp.einsum("BKGH,BSKH->BKGS", q.reshape(B, K, N // K, H), k, preferred_element_type=jnp.float32)
            logits = softcap(logits, self.logit_softcap)
            if mask is not None:
                logits = jnp.where(mask[:, 0, None, None], logits, _MASKED)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            return jnp.einsum("BKGS,BSKH->BKGH", probs, v).reshape(B, T, N, H)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, N // K, H), k, preferred_element_type=jnp.float32)
        logits = softcap(logits, self.logit_softcap)
        if mask is not None:
            logits = jnp.where(mask[:, None, None], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        # float[B, K, G, T, S], kept only when applied with mutable=["intermediates"] (for inspection).
        self.sow("intermediates", "attention", probs)
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                    implementation: str | None = None) -> jax.Array:
    """softmax(scale * q k^T, masked) v through `jax.nn.dot_product_attention`: q [B, T, N, H], k and v
    [B, S, K, H], mask bool[B, T, S] or None -> [B, T, N, H].

    On GPU in bfloat16 or float16, cuDNN's flash attention where it supports the shapes (head size, cuDNN
    version; refused while tracing), else XLA's; `implementation` forces one.
    """
    mask = None if mask is None else mask[:, None]  # the same for every head
    q = q.astype(k.dtype)
    if implementation is None and jax.default_backend() == "gpu" and k.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # shapes or a cuDNN this GPU's cuDNN does not take: XLA's implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation or "xla")
