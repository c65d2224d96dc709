"""Unrolled vs stacked (scanned) layers: compile time and decode speed as depth grows, same weights.

A Gemma-shaped decoder (width 1024, 8 heads, 1 kv head, head_dim 128, MLP 4096, vocab 32000) in float32
at several depths; for each, the unrolled and the stacked layout of the same random weights, batch 1, a
64-token prompt and 32 new tokens. Compile time is the first prefill plus decode call less the time the
same calls take once compiled.

    python benchmarks/layers.py [--depths 4 16 48] [--new 32] [--repeats 3]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from common import bench_jaxvlm


def model_at(depth: int, width: int):
    from jaxvlm import checkpoint
    from jaxvlm.config import DecoderConfig, ModelConfig, TokensConfig
    from jaxvlm.model import Model
    config = ModelConfig(decoder=DecoderConfig(
        vocab_size=32000, width=width, depth=depth, num_heads=8, num_kv_heads=1, head_dim=128, mlp_dim=4 * width,
        mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True, tie_embeddings=True),
        tokens=TokensConfig(eos_ids=(1,), pad_id=0))
    return Model(config, checkpoint.init_params(config, jax.random.key(0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 48])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from jaxvlm import layout

    print(f"unrolled vs stacked layers | jax {jax.__version__} on {jax.devices()[0].platform}, width {args.width}, "
          f"prompt {args.prompt}, {args.new} new tokens")
    print(f"{'layers':>6}{'compile s':>22}{'decode tokens/s':>26}{'stacked decode':>16}")
    print(f"{'':6}{'unrolled':>11}{'stacked':>11}{'unrolled':>13}{'stacked':>13}{'speed':>16}")
    prompt = np.random.default_rng(0).integers(3, 32000, size=(1, args.prompt))
    for depth in args.depths:
        model = model_at(depth, args.width)
        results = {}
        for stacked in (False, True):
            model.params = layout.relayout(model.params, stacked)
            jax.clear_caches()  # each layout's compile time from cold
            results[stacked] = bench_jaxvlm(model, prompt, args.new, args.repeats)
        same = np.array_equal(results[False]["tokens"], results[True]["tokens"])
        for r in results.values():
            r["compile_s"] -= r["prefill_ms"] / 1e3 + (args.new - 1) / r["decode_tps"]
        u, s = results[False], results[True]
        print(f"{depth:>6}{u['compile_s']:>11.2f}{s['compile_s']:>11.2f}{u['decode_tps']:>13.1f}{s['decode_tps']:>13.1f}"
              f"{s['decode_tps'] / u['decode_tps']:>15.2f}x  tokens equal: {same}")
        del model, results


if __name__ == "__main__":
    main()
