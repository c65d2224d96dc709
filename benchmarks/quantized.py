"""int8 and bfloat16 weights against float32, on the same random weights: decode speed and the memory
that decoding adds, each variant in a fresh process.

Default: a Gemma-shaped model of about 212M parameters (width 1024, 12 layers, 8 heads, 1 kv head,
head_dim 128, MLP 4096, vocab 32000), converted as float32, as bfloat16 and as int8 (per output channel,
and with groups of 128), batch 1, a 16-token prompt and 48 new tokens. Each quantized or bfloat16 variant
runs twice: through the fused CPU kernel (`jaxvlm.matvec`) and through XLA's path (the kernel switched
off), which is what the kernel is for.

"memory added" is how far the peak resident memory rises during a generation, once compiled
(VmHWM after resetting it), over the bytes of the float32 model.

    python benchmarks/quantized.py [--layers 12] [--new 48] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from common import bench_jaxvlm, peak_kb, reset_peak

VARIANTS = {  # name: (converted folder, convert flags, fused kernel)
    "float32": ("float32", [], False),
    "bfloat16": ("bfloat16", ["--dtype", "bfloat16"], True),
    "bfloat16, XLA path": ("bfloat16", ["--dtype", "bfloat16"], False),
    "int8": ("int8", ["--quantize", "int8"], True),
    "int8, XLA path": ("int8", ["--quantize", "int8"], False),
    "int8, groups of 128": ("int8-g128", ["--quantize", "int8", "--group-size", "128"], True),
}


def build_hf(layers: int, directory: str) -> str:
    import torch
    import transformers
    config = transformers.GemmaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=1,
                                      head_dim=128, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=2, dtype=torch.float32)
    torch.manual_seed(0)
    transformers.GemmaForCausalLM(config).save_pretrained(directory)
    return directory


def measure(folder: str, fused: bool, new: int, batch: int, repeats: int) -> dict:
    """In a fresh process: decode tokens/s, and the peak memory a compiled generation adds."""
    import jax
    import jaxvlm
    from jaxvlm import matvec
    if not fused:
        matvec.MAX_ROWS = 0  # every product through XLA's path
    model = jaxvlm.load(folder, verify=False)
    prompt = np.random.default_rng(0).integers(3, 32000, size=(batch, 16))
    timing = bench_jaxvlm(model, prompt, new, repeats)
    model.generate_ids(prompt, max_new_tokens=new)  # compiled
    reset_peak()
    before = peak_kb()
    tokens = model.generate_ids(prompt, max_new_tokens=new)
    added = (peak_kb() - before) * 1024
    return dict(decode_tps=timing["decode_tps"], added=added, tokens=tokens.tolist(),
                params=int(sum(x.nbytes for x in jax.tree.leaves(model.params))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # folder, fused: one measurement
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "1", args.new, args.batch, args.repeats)))
        return

    import jax
    from convert import convert
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf(args.layers, os.path.join(tmp, "hf"))
        for name, (folder, flags, fused) in VARIANTS.items():
            path = os.path.join(tmp, folder)
            if not os.path.exists(path):
                options = dict(zip(flags[::2], flags[1::2]))
                convert(hf, path, progress=False, dtype=options.get("--dtype"), quantize=options.get("--quantize"),
                        group_size=int(options["--group-size"]) if "--group-size" in options else None)
            out = subprocess.run([sys.executable, __file__, "--child", path, "1" if fused else "0", "--new",
                                  str(args.new), "--batch", str(args.batch), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])

    base = results["float32"]
    print(f"Gemma-shaped model, {args.layers} layers, float32 {base['params'] / 1e9:.2f} GB, batch {args.batch}, "
          f"prompt 16, {args.new} new tokens | jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cores")
    print(f"{'':22}{'params GB':>10}{'x f32':>7}{'decode tok/s':>14}{'x f32':>7}{'memory added GB':>17}"
          f"{'x f32 model':>13}{'tokens = f32':>14}")
    for name, r in results.items():
        print(f"{name:22}{r['params'] / 1e9:>10.3f}{r['params'] / base['params']:>7.2f}{r['decode_tps']:>14.1f}"
              f"{r['decode_tps'] / base['decode_tps']:>7.2f}{r['added'] / 1e9:>17.3f}"
              f"{r['added'] / base['params']:>13.2f}{str(r['tokens'] == base['tokens']):>14}")


if __name__ == "__main__":
    main()
