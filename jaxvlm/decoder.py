"""The decoder: one block and one stack for every text family, driven by `DecoderConfig` flags.

The stack is unrolled (`layer_0`, `layer_1`, ..., looped over in Python) or, with `scan_layers`, one
`layers` subtree of [L, ...] params run by `nn.scan` (see `jaxvlm.layout`). Per-layer choices (Gemma 2's
local and global layers) are data to the scan: each layer picks its mask by a flag.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from jaxvlm import splash
from jaxvlm.attention import Attention
from jaxvlm.config import DecoderConfig
from jaxvlm.kv_cache import KVCache, ring_slots, write
from jaxvlm.layout import layer_stack
from jaxvlm.layers import Dtype, Einsum, Embedder, GatedMLP, RMSNorm, softcap
from jaxvlm.masks import decoder_mask
from jaxvlm.moe import MoeMLP
from jaxvlm.rope import rope_tables


@struct.dataclass
class DecoderOutput:
    logits: jax.Array  # float32[B, T, V] (T = 1 with last_only)
    cache: KVCache | None


def _ring_keys(kv_valid, kv_blocks, valid, blocks, end, size: int):
    """What a ring buffer's keys are, for `decoder_mask`'s (kv_valid, blocks, key_slots) arguments: one new
    token attends over the ring after it is written; several over the ring before and themselves."""
    T = valid.shape[1]
    if T == 1:
        slots = ring_slots(end + 1, size)
        new_valid = new_blocks = None
    else:
        slots = ring_slots(end, size)
        new_valid, new_blocks = valid, blocks
    # the full-length valid and block arrays are circular too: a sequence slot s sits at s % S
    held = lambda x, none: jnp.where(slots >= 0, jnp.take(x, jnp.mod(jnp.maximum(slots, 0), x.shape[1]), axis=1),
                                     none)
    join = lambda old, new: old if new is None else jnp.concatenate([old, new], axis=1)
    key_valid = join(held(kv_valid, False), new_valid)
    key_blocks = None if blocks is None else (blocks, join(held(kv_blocks, -1), new_blocks))
    key_slots = slots if T == 1 else jnp.concatenate([slots, end + jnp.arange(T)])
    return key_valid, key_blocks, key_slots


class Block(nn.Module):
    """Pre-norm attention and gated MLP, with Gemma 2's extra norms on each branch's output.

    `masks` is (global mask, sliding-window mask or None, each bool[B, T, S]; the prompt's (valid flags,
    blocks or None) where `jaxvlm.splash` may serve its attention, else None), and `ropes` (global
    (cos, sin), the local layers' own or None); `local` (a bool, traced when the layers are scanned) says
    which this layer uses. `deepstack` [n, B, T, D] (or None): what the first n layers add to their
    outputs (Qwen3-VL's DeepStack: image features at the image tokens, zero elsewhere), this being layer
    `layer` (an int, traced when the layers are scanned). Returns (x, (k, v)): the scan's carry and this
    layer's keys and values.
    """

    config: DecoderConfig
    dtype: Dtype = jnp.float32
    mixture: bool = False  # the MLP is the mixture of experts (`config.moe`)
    window_bounds_blocks: bool = False  # see Decoder
    longest_block: int | None = None

    @nn.compact
    def __call__(self, x, ropes, masks, local, cache_kv=None, end=0, deepstack=None, layer=0, ring=False):
        c = self.config
        if isinstance(local, bool):  # unrolled layers: a ring buffer's mask has its own shape
            mask = masks[1] if local else masks[0]
            rope = ropes[1] if local and ropes[1] is not None else ropes[0]
        else:
            mask = masks[0] if masks[1] is None else jnp.where(local, masks[1], masks[0])
            rope = ropes[0] if ropes[1] is None else jax.tree.map(lambda l, g: jnp.where(local, l, g), *ropes[::-1])
        norm = lambda name: RMSNorm(c.norm_eps, c.norm_scale_offset, dtype=self.dtype, name=name)
        prompt = None if masks[2] is None else (*masks[2], c.sliding_window, local, self.longest_block,
                                                 self.window_bounds_blocks)
        h, kv = Attention.for_decoder(c, self.dtype, "attn")(norm("pre_attn_norm")(x), rope, mask, cache_kv, end,
                                                             ring=ring, prompt=prompt)
        if c.use_post_norms:
            h = norm("post_attn_norm")(h)
        x = x + h
        mlp = MoeMLP(c.moe, c.mlp_activation, self.dtype, name="mlp") if self.mixture else \
            GatedMLP(c.width, c.mlp_dim, c.mlp_activation, dtype=self.dtype, name="mlp")
        h = mlp(norm("pre_mlp_norm")(x))
        if c.use_post_norms:
            h = norm("post_mlp_norm")(h)
        x = x + h
        self.sow("intermediates", "output", x)  # kept only when asked for (Model.logits' hidden states)
        if deepstack is not None:  # (after the layer's output is kept, as transformers lists its outputs)
            n = deepstack.shape[0]
            if isinstance(layer, int):
                x = x + deepstack[layer].astype(x.dtype) if layer < n else x
            else:
                x = x + jnp.where(layer < n, deepstack[jnp.minimum(layer, n - 1)], 0).astype(x.dtype)
        return x, kv


class Decoder(nn.Module):
    """A decoder-only transformer for every text family, driven by its `DecoderConfig`: the embedding,
    `depth` pre-norm blocks (attention, then a gated MLP or a mixture of experts; Gemma 2's post-norms where
    the config says), local and global layers chosen per layer, the final norm and the language-model head
    (tied to the embedding or not), with Gemma's soft-caps. A pure function of its params and inputs; the
    KV cache goes in and comes out."""

    config: DecoderConfig
    dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each layer's activations in the backward pass instead of storing them
    scan_layers: bool = False  # stacked [L, ...] params run by a scan, rather than unrolled layers
    window_bounds_blocks: bool = False  # the sliding window bounds bidirectional blocks too (see decoder_mask)
    longest_block: int | None = None  # the most tokens a bidirectional block holds (Gemma 3: an image's); None: any

    def setup(self):
        c = self.config
        self.embedder = Embedder(c.vocab_size, c.width, c.embed_scale, dtype=self.dtype)
        # Scanned, the arguments after x are: ropes, masks (shared), local (per layer), cache_kv (per layer), end,
        # deepstack (shared), the layer's index (per layer).
        self.layers = layer_stack(Block, c.depth, self.scan_layers, self.remat,
                                  (nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast, 0),
                                  per_layer=lambda i: dict(mixture=c.is_moe(i)), config=c, dtype=self.dtype,
                                  window_bounds_blocks=self.window_bounds_blocks, longest_block=self.longest_block)
        self.final_norm = RMSNorm(c.norm_eps, c.norm_scale_offset, dtype=self.dtype)
        if not c.tie_embeddings:
            self.lm_head = Einsum("BTD,DV->BTV", (c.width, c.vocab_size), ("embed", "vocab"), dtype=self.dtype,
                                  out_dtype=jnp.float32)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """int[B, T] -> [B, T, D]."""
        return self.embedder.encode(tokens)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array, cache: KVCache | None = None,
                      embeddings: jax.Array | None = None, blocks: jax.Array | None = None,
                      deepstack: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The final hidden states [B, T, D] (after the final norm) of T new tokens, and the updated cache.

        tokens, positions: int[B, T] (M-RoPE's positions: [B, T, 3]); valid: bool[B, T] (False at padding);
        embeddings: optional [B, T, D] used instead of embedding `tokens`; blocks: optional int32[B, T], tokens
        of the same block (>= 0) attend to each other in both directions (`masks.decoder_mask`); deepstack:
        optional [n, B, T, D] the first n layers add to their outputs (`Block`). With a cache
        the tokens go to slots cache.end .. cache.end + T - 1 and the updated cache is returned.
        """
        c = self.config
        # (padding is never looked up: its id, the end-of-sequence one where a config names no pad, may lie
        # past the vocabulary, and an out-of-range lookup gives NaN, which masked attention still multiplies)
        x = self.embed(jnp.where(valid, tokens, 0)) if embeddings is None else embeddings.astype(self.dtype)
        self.sow("intermediates", "embeddings", x)
        T = x.shape[1]
        # Padding slots get position 0 so they never decide LongRoPE's short/long switch.
        positions = jnp.where(valid.reshape(valid.shape + (1,) * (positions.ndim - 2)), positions, 0)
        ropes = (rope_tables(positions, c.rope, c.head_dim),
                 None if c.local_rope is None else rope_tables(positions, c.local_rope, c.head_dim))
        if cache is None:
            kv_valid, end = valid, jnp.zeros((), jnp.int32)
        else:
            kv_valid, end = write(cache.valid, valid, cache.end), cache.end
        kv_blocks = None
        if blocks is not None:
            kv_blocks = blocks if cache is None else write(jnp.full(cache.valid.shape, -1, jnp.int32), blocks, end)
        local = [c.window(i) is not None for i in range(c.depth)]
        # Unrolled local layers whose cache is a ring of their window (`jaxvlm.kv_cache`).
        ring = [cache is not None and not self.scan_layers and cache.k[i].shape[1] < cache.size
                for i in range(c.depth)]
        key_blocks = None if blocks is None else (blocks, kv_blocks)
        bounded = self.window_bounds_blocks
        # The sequence slot each cache slot holds once these tokens are written (the cache is circular; before
        # it wraps, slot s holds sequence slot s).
        slots = None if cache is None else ring_slots(end + T, cache.size)
        if any(ring):
            size = cache.k[ring.index(True)].shape[1]
            key_valid, ring_blocks, key_slots = _ring_keys(kv_valid, kv_blocks, valid, blocks, end, size)
            windowed = decoder_mask(key_valid, end, T, c.sliding_window, ring_blocks, key_slots, bounded)
        else:
            windowed = decoder_mask(kv_valid, end, T, c.sliding_window, key_blocks, slots, bounded) \
                if any(local) else None
        # a prompt run into a fresh cache (as `prefill` runs one): jaxvlm.splash may serve it
        prompt = (valid, blocks) if splash.active() and T > 1 else None
        masks = (decoder_mask(kv_valid, end, T, None, key_blocks, slots) if not all(local) else windowed, windowed,
                 prompt)

        if self.scan_layers:
            cache_kv = None if cache is None else (cache.k, cache.v)
            x, (new_k, new_v) = self.layers(x, ropes, masks, jnp.asarray(local), cache_kv, end, deepstack,
                                            jnp.arange(c.depth))
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                with jax.named_scope(f"layer_{i}"):
                    cache_kv = None if cache is None else (cache.k[i], cache.v[i])
                    x, (k, v) = layer(x, ropes, masks, local[i], cache_kv, end, deepstack, i, ring[i])
                new_k.append(k)
                new_v.append(v)
            new_k, new_v = tuple(new_k), tuple(new_v)
        new_cache = None if cache is None else KVCache(k=new_k, v=new_v, end=end + T, valid=kv_valid)
        x = self.final_norm(x)
        self.sow("intermediates", "final", x)
        return x, new_cache

    def __call__(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array, cache: KVCache | None = None,
                 embeddings: jax.Array | None = None, blocks: jax.Array | None = None,
                 last_only: bool = False, deepstack: jax.Array | None = None) -> DecoderOutput:
        """Next-token logits of T new tokens (see `hidden_states` for the arguments). `last_only` computes
        logits for the last slot only (prefill)."""
        c = self.config
        x, cache = self.hidden_states(tokens, positions, valid, cache, embeddings, blocks, deepstack)
        if last_only:
            x = x[:, -1:]
        logits = self.embedder.decode(x) if c.tie_embeddings else self.lm_head(x)
        return DecoderOutput(logits=softcap(logits, c.final_logit_softcap), cache=cache)
