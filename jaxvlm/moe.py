"""The mixture-of-experts MLP (Qwen3-MoE): a router picks `top_k` of E gated MLPs for each token.

Computed without a loop over experts: the B * T * top_k (token, expert) pairs are sorted by expert, so
each expert's tokens are one contiguous run, and `jax.lax.ragged_dot` multiplies each run by its
expert's weights ([E, ...] stacks); the outputs, weighted by the router, are added back to their tokens.
No capacity is set, so no token is ever dropped, and the result equals transformers' loop over experts.
Where XLA has no grouped matmul (its CPU lowering), `ragged_dot` runs every expert over every row
masked: E times a dense layer's work (see `benchmarks/moe.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm.config import MoeConfig
from jaxvlm.layers import ACTIVATIONS, Dtype, Einsum, named, stored_scale
from jaxvlm.quantize import dequantize


class MoeMLP(nn.Module):
    """x: [B, T, D] -> [B, T, D]. Params: `router/kernel` [D, E] and the experts' `gate`, `up` [E, D, F]
    and `down` [E, F, D] (F the experts' width)."""

    config: MoeConfig
    activation: str
    dtype: Dtype = jnp.float32

    def expert_kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]):
        """An [E, in, out] stack as stored, and its int8 scale (None for a float stack)."""
        kernel = self.param(name, named(nn.initializers.lecun_normal(batch_axis=(0,)), axes, contracted=(1,)),
                            shape, self.dtype)
        return kernel, stored_scale(self, name)

    def grouped(self, rows: jax.Array, stack, group_sizes: jax.Array, experts: jax.Array) -> jax.Array:
        """rows [N, in] (grouped by expert; `experts` [N] says whose) times their experts' [E, in, out] `stack`.
        An int8 stack scaled per output channel goes into `ragged_dot` as int8 (float32 accumulation) and its
        scales are applied to the products, row by row: dequantized first, it was a copy of the whole stack
        (the compiler fuses no conversion into a grouped product): for Qwen3-30B-A3B's layers on v5e:2x2,
        134 MB a device, and 2.7x the bytes a decode step reads, against 1.2x now."""
        kernel, scale = stack
        if scale is not None and scale.shape[1] == 1:
            out = jax.lax.ragged_dot(rows, kernel, group_sizes, preferred_element_type=jnp.float32)
            return (out * scale[experts, 0].astype(jnp.float32)).astype(self.dtype)
        w = kernel.astype(self.dtype) if scale is None else dequantize(kernel, scale, (-2,), self.dtype)
        return jax.lax.ragged_dot(rows, w, group_sizes)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        B, T, D = x.shape
        E, k, F = c.num_experts, c.top_k, c.mlp_dim
        logits = Einsum("BTD,DE->BTE", (D, E), ("embed", "experts"), dtype=self.dtype, name="router")(x)
        # softmax over every expert in float32, then the top k (renormalised), as transformers routes
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, chosen = jax.lax.top_k(probs, k)  # [B, T, k]
        if c.normalize_weights:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(logits.dtype)
        gate = self.expert_kernel("gate", (E, D, F), ("experts", "embed", "mlp"))
        up = self.expert_kernel("up", (E, D, F), ("experts", "embed", "mlp"))
        down = self.expert_kernel("down", (E, F, D), ("experts", "mlp", "embed"))

        with jax.named_scope("sort_by_expert"):
            flat = chosen.reshape(-1)  # [B*T*k], pair j belongs to token j // k
            order = jnp.argsort(flat, stable=True)
            token = order // k
            rows = x.reshape(B * T, D).astype(self.dtype)[token]  # [B*T*k, D], grouped by expert
            group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
            experts = flat[order]
        h = ACTIVATIONS[self.activation](self.grouped(rows, gate, group_sizes, experts)) \
            * self.grouped(rows, up, group_sizes, experts)
        out = self.grouped(h, down, group_sizes, experts) * weights.reshape(-1)[order][:, None]
        with jax.named_scope("combine"):
            y = jnp.zeros((B * T, D), out.dtype).at[token].add(out)
        return y.reshape(B, T, D)
