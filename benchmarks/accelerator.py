"""Decode speed on an accelerator in bfloat16, jaxvlm vs transformers eager, on the same random weights:
a Gemma-2-2B-shaped text model and a PaliGemma-3B-shaped vision-language model (the published configs),
batch 1 and 8, with the fraction of the memory-bandwidth roofline each reaches (the weight bytes read per
decode step x steps/s / the device's bandwidth). It runs unchanged on a CPU (with --layers to keep it
small); the roofline needs the bandwidth, known for the GPUs below or given with --bandwidth.

    python benchmarks/accelerator.py [--models gemma2-2b paligemma-3b] [--batches 1 8] [--new 64]
                                     [--layers N] [--bandwidth GB/s]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from common import bench_jaxvlm, bench_transformers

# HBM bandwidth in GB/s by the device kind jax reports (the vendors' figures).
BANDWIDTH = {"NVIDIA H100 80GB HBM3": 3350, "NVIDIA H100": 3350, "NVIDIA H200": 4800, "NVIDIA A100-SXM4-80GB": 2039,
             "NVIDIA A100-SXM4-40GB": 1555}
IMAGE_TOKEN = 257152


def build_hf(name: str, layers: int | None, device: str):
    import torch
    import transformers
    gemma2 = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                  query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if name == "gemma2-2b":
        config = transformers.Gemma2Config(**dict(gemma2, num_hidden_layers=layers or 26))
        model_class = transformers.Gemma2ForCausalLM
    else:
        text = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=layers or 18, num_attention_heads=8,
                    num_key_value_heads=1, head_dim=256, vocab_size=257216, pad_token_id=0, bos_token_id=2,
                    eos_token_id=1, hidden_activation="gelu_pytorch_tanh")
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers or 27, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=2048, vision_use_head=False)
        config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                                              projection_dim=2048, hidden_size=2048, vocab_size=257216)
        model_class = transformers.PaliGemmaForConditionalGeneration
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(torch.bfloat16).eval()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma2-2b", "paligemma-3b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the published config")
    parser.add_argument("--bandwidth", type=float, default=None, help="device memory bandwidth, GB/s")
    args = parser.parse_args()

    import jax
    import torch
    import jaxvlm
    from convert import convert

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = jax.devices()[0].device_kind
    bandwidth = args.bandwidth or BANDWIDTH.get(kind)
    print(f"jax {jax.__version__} on {kind}, torch {torch.__version__} on {device}; bandwidth "
          f"{f'{bandwidth:.0f} GB/s' if bandwidth else 'unknown (--bandwidth)'}")
    print(f"{'model':14}{'batch':>6}{'weights GB':>12}{'jaxvlm tok/s':>14}{'roofline':>10}{'transformers':>14}"
          f"{'roofline':>10}{'speed-up':>10}")
    rng = np.random.default_rng(0)
    for name in args.models:
        hf_model = build_hf(name, args.layers, device)
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(os.path.join(tmp, "hf"))
            model = jaxvlm.load(convert(os.path.join(tmp, "hf"), os.path.join(tmp, "jax"), progress=False))
        weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
        for batch in args.batches:
            text = rng.integers(3, 200000, size=(batch, 16))
            inputs, pixels = {}, None
            if name == "paligemma-3b":
                prompt = np.concatenate([np.full((batch, 256), IMAGE_TOKEN), np.full((batch, 1), 2), text,
                                         np.full((batch, 1), 108)], axis=1)
                pixels = rng.uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
                inputs = {"pixel_values": torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device, torch.bfloat16),
                          "token_type_ids": torch.zeros(prompt.shape, dtype=torch.long, device=device)}
            else:
                prompt = text
            inputs["input_ids"] = torch.tensor(prompt, device=device)
            hf = bench_transformers(hf_model, inputs, args.new, args.repeats)
            jx = bench_jaxvlm(model, prompt, args.new, args.repeats, pixels)
            # a decode step reads every weight once, whatever the batch: steps/s = tokens/s / batch
            roof = lambda tps: "" if not bandwidth else f"{weights * tps / batch / (bandwidth * 1e9):.0%}"
            jx_tps, hf_tps = jx["decode_tps"] * batch, hf["decode_tps"] * batch
            print(f"{name:14}{batch:>6}{weights / 1e9:>12.2f}{jx_tps:>14.1f}{roof(jx_tps):>10}{hf_tps:>14.1f}"
                  f"{roof(hf_tps):>10}{jx_tps / hf_tps:>9.2f}x", flush=True)
        del hf_model, model


if __name__ == "__main__":
    main()
