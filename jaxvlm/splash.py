"""Prefill's attention on TPU through jax's splash attention kernel (Pallas), which never holds the [B, N, T, S]
scores: a prompt of 8k tokens at batch 8 would need 8k x 8k float32 scores a head and a row otherwise.

It serves prompts run into a fresh cache (`prefill`: the keys are the prompt's own): causal attention, a
sliding window where the layer has one, the padding kept apart by segment ids (a padding token attends only
to padding, and no real token to it), Gemma 2's soft-cap. Bidirectional blocks (PaliGemma's prefix, Gemma 3's
images) take a second kernel call over the keys the causal mask leaves out, those after the query in its
block (and, where the window does not bound the blocks, those of its block behind the window), with the
block ids as segment ids; the two parts, disjoint, are merged by their log-sum-exps. The image encoders'
full attention over an image's patches, which prefill runs too, takes it with every key visible. Everything
else (a cache holding earlier tokens, prompts whose length is no multiple of 128, the attention weights asked
for inspection) keeps the einsum path. On other platforms the einsum path is compiled
(`jax.lax.platform_dependent`); `use(interpret=True)` runs the kernel in Pallas' interpret mode on any
platform, which is how its numerics are checked against the einsum path on CPU.

On a mesh the kernel runs per device (`shard_map`) over the batch and heads the device holds; where the
query heads a device holds do not line up with its key/value heads (kv heads that the mesh cannot split,
more than one of them), the einsum path.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxvlm.sharding import MeshRules

BLOCK = 128  # the kernel's smallest tile: the prompt's length must be a multiple


@dataclasses.dataclass(frozen=True)
class Use:
    shard: MeshRules | None  # the mesh the batch and heads are split over (None: one device)
    interpret: bool  # Pallas' interpret mode, on any platform (numerics checks)


_use = contextvars.ContextVar("jaxvlm_splash", default=None)


@contextlib.contextmanager
def use(shard: MeshRules | None = None, interpret: bool = False):
    """Within this block (while a function is traced), the prompt's attention into a fresh cache may take
    the kernel (`prefill` sets it)."""
    token = _use.set(Use(shard, interpret))
    try:
        yield
    finally:
        _use.reset(token)


def active() -> bool:
    return _use.get() is not None


def _blocks(T: int) -> tuple[int, int]:
    block = 512 if T % 512 == 0 else BLOCK
    return block, block


@functools.cache
def _kernel(T: int, groups: int, window: int | None, softcap: float | None, interpret: bool,
            residuals: bool = False, after: int | None = None, behind: int | None = None, full: bool = False):
    """The kernel for one row and one kv head: q [G, T, H] and k, v [T, H] -> [G, T, H], and with
    `residuals` each query's log-sum-exp [G, T] too. Keys visible: q - window < k <= q (transformers'
    sliding window), else causal; or with `after`, the keys after the query, q < k <= q + after, and with
    `behind` also k <= q - behind; with `full`, every key."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    if full:
        one = sa.FullMask((T, T))
    elif after is None:
        one = sa.LocalMask((T, T), (None if window is None else window - 1, 0), offset=0)
    else:
        one = sa.LocalMask((T, T), (0, after - 1), offset=1)
        if behind is not None:
            one = one | sa.LocalMask((T, T), (None, 0), offset=-behind)
    block_q, block_kv = _blocks(T)
    # Its mask tables made outside whatever is being traced (a scan's body is traced with partial evaluation,
    # which `ensure_compile_time_eval` does not reach), so that one kernel serves every trace.
    with jax.core.eval_context():
        return sa.make_splash_mqa_single_device(
            sa.MultiHeadMask([one] * groups), block_sizes=sa.BlockSizes(block_q=block_q, block_kv=block_kv),
            attn_logits_soft_cap=softcap, interpret=interpret, save_residuals=residuals)


def _local(q, k, v, valid, blocks, window, softcap, interpret, longest_block, window_bounds_blocks, full):
    """q [b, T, n, H], k, v [b, T, k, H], valid bool[b, T], blocks int32[b, T] or None (the device's part)
    -> [b, T, n, H]."""
    b, T, n, H = q.shape
    K = k.shape[2]
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    segments = valid.astype(jnp.int32)
    q = q.reshape(b, T, K, n // K, H).transpose(0, 2, 3, 1, 4)  # [b, K, G, T, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, K, T, H]
    if blocks is None:
        kernel = _kernel(T, n // K, window, softcap, interpret, full=full)
        attend = lambda q, k, v, s, ids: kernel(q, k, v, SegmentIds(s, s))
        ids = None
    else:
        # The causal part as above, and the keys it leaves out that a query's block shows it: those after it
        # (a static band as wide as the longest block: its tiles alone are run) and, where the window does not
        # bound the blocks (PaliGemma 2), those of its block behind the window; a token outside any block has
        # an id of its own, which no other token's matches. A query with no such key gets a log-sum-exp near
        # the kernel's mask value (its tiles run with every logit masked): its weight in the merge is 0.
        causal = _kernel(T, n // K, window, softcap, interpret, residuals=True)
        behind = window if window is not None and not window_bounds_blocks else None
        later = _kernel(T, n // K, None, softcap, interpret, residuals=True,
                        after=max(1, min(longest_block or T, T) - 1), behind=behind)
        ids = jnp.where(blocks >= 0, blocks, -1 - jnp.arange(T)).astype(jnp.int32)

        def attend(q, k, v, s, ids):
            out_a, (lse_a,) = causal(q, k, v, SegmentIds(s, s))
            out_b, (lse_b,) = later(q, k, v, SegmentIds(ids, ids))
            top = jnp.maximum(lse_a, lse_b)
            w_a, w_b = jnp.exp(lse_a - top)[..., None], jnp.exp(lse_b - top)[..., None]
            out = (w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)) / (w_a + w_b)
            return out.astype(out_a.dtype)

    per_head = jax.vmap(attend, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(q, k, v, segments, ids)  # [b, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, T, n, H)


def supported(q: jax.Array, k: jax.Array) -> bool:
    """Whether the kernel serves these queries and keys (q [B, T, N, H], k [B, T, K, H]) as placed."""
    setting = _use.get()
    T = q.shape[1]
    if setting is None or T % BLOCK or q.shape[2] % k.shape[2]:
        return False
    if setting.shard is None:
        return True
    heads, kv_heads = (setting.shard.spec(names, x.shape)[2] for names, x in
                       ((("batch", None, "heads", "head_dim"), q), (("batch", None, "kv_heads", "head_dim"), k)))
    # each device's query heads must be served by its own kv heads: both split alike, or one kv head for all
    return heads == kv_heads or k.shape[2] == 1


def attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array | None, window: int | None, scale: float,
              softcap: float | None, dense, blocks: jax.Array | None = None, longest_block: int | None = None,
              window_bounds_blocks: bool = False, full: bool = False) -> jax.Array:
    """softmax(scale * q k^T, causal within `window`, padding apart) v for a prompt run into a fresh cache:
    q [B, T, N, H], k, v [B, T, K, H] (the prompt's own keys), valid bool[B, T] -> [B, T, N, H], through the
    kernel on TPU (or in interpret mode where `use` asks), else `dense()`. With `blocks` int32[B, T]
    (`jaxvlm.masks.decoder_mask`'s: an id >= 0 a block, -1 none; `longest_block` tokens at most, None for
    any number) a block's tokens see each other in both directions, within the window where
    `window_bounds_blocks`. With `full` (an image encoder's patches, `valid` None) every query sees every
    key. Check `supported` first."""
    setting = _use.get()
    q = (q * jnp.asarray(scale, q.dtype)).astype(k.dtype)
    if valid is None:
        valid = jnp.ones(q.shape[:2], bool)

    def kernel(q, k, v, valid, blocks):
        run = functools.partial(_local, window=window, softcap=softcap, interpret=setting.interpret,
                                longest_block=longest_block, window_bounds_blocks=window_bounds_blocks, full=full)
        if setting.shard is None:
            return run(q, k, v, valid, blocks)
        shard = setting.shard
        spec = lambda names, x: shard.spec(names, x.shape)
        q_spec = spec(("batch", None, "heads", "head_dim"), q)
        kv_spec = spec(("batch", None, "kv_heads", "head_dim"), k)
        rows = PartitionSpec(q_spec[0])
        blocks_spec = None if blocks is None else rows
        return jax.shard_map(run, mesh=shard.mesh, in_specs=(q_spec, kv_spec, kv_spec, rows, blocks_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v, valid, blocks)

    if setting.interpret:
        return kernel(q, k, v, valid, blocks)
    return jax.lax.platform_dependent(q, k, v, valid, blocks, tpu=kernel,
                                      default=lambda *_: dense().astype(k.dtype))

