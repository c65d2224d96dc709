"""The mixture-of-experts MLP against a dense gated MLP with the same active parameters per token.

A Qwen3-MoE-shaped layer (width 1024, 32 experts of width 512, top 4: 2048 active hidden units per token)
and a dense `GatedMLP` of width 2048, random float32 weights, on a prompt (one sequence of 512 tokens)
and a decode step (8 sequences of one token). Prints the median times and their ratio.

    python benchmarks/moe.py [--width 1024 --experts 32 --top-k 4 --expert-dim 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from common import timed
from jaxvlm.config import MoeConfig
from jaxvlm.layers import GatedMLP
from jaxvlm.moe import MoeMLP


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    D, k, F = args.width, args.top_k, args.expert_dim
    moe = MoeMLP(MoeConfig(num_experts=args.experts, top_k=k, mlp_dim=F), "silu")
    dense = GatedMLP(D, k * F, "silu")
    print(f"{jax.devices()[0].device_kind}: width {D}, {args.experts} experts of {F}, top {k}; "
          f"dense MLP of {k * F}")
    print(f"{'input':>18} {'MoE ms':>9} {'dense ms':>9} {'MoE / dense':>12}")
    for name, shape in [("prompt 1 x 512", (1, 512, D)), ("decode step 8 x 1", (8, 1, D))]:
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        times = []
        for layer in (moe, dense):
            params = jax.jit(layer.init)(jax.random.key(1), x)
            run = jax.jit(layer.apply)
            run(params, x).block_until_ready()  # compile
            seconds, _ = timed(lambda: run(params, x).block_until_ready(), args.repeats)
            times.append(seconds * 1e3)
        print(f"{name:>18} {times[0]:9.2f} {times[1]:9.2f} {times[0] / times[1]:11.2f}x")


if __name__ == "__main__":
    main()
