"""Prefill and decode speed, jaxvlm vs transformers, on the same random weights in one process.

Default: a Gemma-shaped model of about 270M parameters (width 1024, 16 layers, 8 heads, 1 kv head,
head_dim 128, MLP 4096, vocab 32000) in float32, batch 1, a 128-token prompt and 64 new tokens.

    python benchmarks/decode.py [--layers 16] [--prompt 128] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import convert_for_jaxvlm, bench_jaxvlm, bench_transformers, header, print_table


def build_hf(args):
    import torch
    import transformers
    config = transformers.GemmaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=1,
                                      head_dim=128, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=2, dtype=torch.float32)
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).eval()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    hf_model = build_hf(args)
    params = sum(p.numel() for p in hf_model.parameters())
    model = convert_for_jaxvlm(hf_model)
    prompt = np.random.default_rng(0).integers(3, 32000, size=(1, args.prompt))

    print(header(f"Gemma-shaped model, {params / 1e6:.0f}M params, float32, batch 1, prompt {args.prompt}, "
                 f"{args.new} new tokens"))
    hf = bench_transformers(hf_model, {"input_ids": torch.tensor(prompt)}, args.new, args.repeats)
    jx = bench_jaxvlm(model, prompt, args.new, args.repeats)
    print_table(hf, jx)


if __name__ == "__main__":
    main()
