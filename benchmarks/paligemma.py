"""Image encoding, prefill and decode speed of a PaliGemma-shaped model, jaxvlm vs transformers, on the same
random weights in one process.

Default: a SigLIP-style encoder (224 px, patch 14: 256 image tokens; width 384, 12 layers, 6 heads, MLP
1536) and a Gemma-style decoder (width 1024, 8 layers, 8 heads, 1 kv head, head_dim 128, MLP 4096, vocab
32000), float32, batch 1, a prompt of 256 image tokens + BOS + 10 text tokens + newline, 32 new tokens.

    python benchmarks/paligemma.py [--vision-layers 12] [--layers 8] [--new 32] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import convert_for_jaxvlm, ROWS, bench_jaxvlm, bench_transformers, header, print_table, timed

IMAGE_TOKEN = 31999


def build_hf(args):
    import torch
    import transformers
    vision = transformers.SiglipVisionConfig(image_size=224, patch_size=14, hidden_size=384, intermediate_size=1536,
                                             num_hidden_layers=args.vision_layers, num_attention_heads=6,
                                             vision_use_head=False)
    text = transformers.GemmaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                    num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=1,
                                    head_dim=128, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                                    bos_token_id=2)
    config = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                          projection_dim=1024, hidden_size=1024, vocab_size=32000)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).to(torch.float32).eval()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-layers", type=int, default=12)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch

    hf_model = build_hf(args)
    params = sum(p.numel() for p in hf_model.parameters())
    model = convert_for_jaxvlm(hf_model)
    rng = np.random.default_rng(0)
    prompt = np.concatenate([[IMAGE_TOKEN] * 256, [2], rng.integers(3, 31000, size=10), [108]])[None]
    pixels = rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

    print(header(f"PaliGemma-shaped model, {params / 1e6:.0f}M params, float32, batch 1, prompt {prompt.shape[1]} "
                 f"tokens (256 image), {args.new} new tokens"))
    with torch.inference_mode():
        hf_model.model.get_image_features(torch_pixels)  # warm-up
        hf_encode, _ = timed(lambda: hf_model.model.get_image_features(torch_pixels), args.repeats)
    inputs = {"input_ids": torch.tensor(prompt), "pixel_values": torch_pixels,
              "token_type_ids": torch.zeros(prompt.shape, dtype=torch.long)}
    hf = bench_transformers(hf_model, inputs, args.new, args.repeats)
    model.encode_image(pixels)  # compile
    jx_encode, _ = timed(lambda: jax.block_until_ready(model.encode_image(pixels)), args.repeats)
    jx = bench_jaxvlm(model, prompt, args.new, args.repeats, pixels)
    hf["encode_ms"], jx["encode_ms"] = hf_encode * 1e3, jx_encode * 1e3
    print_table(hf, jx, [("image encode ms", "encode_ms", False)] + ROWS)


if __name__ == "__main__":
    main()
