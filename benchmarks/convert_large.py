"""Converting and loading a real-size checkpoint in bounded memory: a random PaliGemma-3B-shaped
transformers checkpoint in bfloat16 (the published paligemma-3b-pt-224 config, about 5.9 GB in 3
safetensors shards), converted, loaded and run for one generated token on the CPU, each step in a fresh
process with its time and peak resident memory (VmHWM).

The converter reads a tensor at a time and writes the params a layer (or module) at a time, so its
peak memory is about the largest part it holds plus the runtime, not the model: the bound checked here is
the largest tensor plus 2 GB.

    python benchmarks/convert_large.py [--workdir /tmp/paligemma-3b] [--quantize]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from common import peak_kb, reset_peak

SHARD_BYTES = 2 * 1024 ** 3


def hf_config():
    """paligemma-3b-pt-224's config.json, as transformers builds it."""
    import transformers
    text = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, vocab_size=257216, max_position_embeddings=8192,
                hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=2048, vision_use_head=False)
    return transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=257152,
                                        projection_dim=2048, hidden_size=2048, vocab_size=257216, dtype="bfloat16")


def build(directory: str) -> tuple[int, int]:
    """Writes config.json and random bfloat16 weights under the names a transformers model holds, in
    shards with their index, a tensor at a time; returns (total bytes, largest tensor's bytes)."""
    import ml_dtypes
    import torch
    import transformers
    from safetensors.numpy import save_file
    config = hf_config()
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in
                  transformers.PaliGemmaForConditionalGeneration(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the embedding, as in the published files
    os.makedirs(directory)
    config.save_pretrained(directory)
    rng = np.random.default_rng(0)
    shards, shard, size, index = [], {}, 0, {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        shards.append(name)
        index.update({tensor: name for tensor in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        tensor = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        if size and size + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name], size = tensor, size + tensor.nbytes
    flush()
    for old in shards:  # the names transformers gives shards: model-0000i-of-0000n
        new = old.replace(".safetensors", f"-of-{len(shards):05d}.safetensors")
        os.rename(os.path.join(directory, old), os.path.join(directory, new))
        index = {k: (new if v == old else v) for k, v in index.items()}
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    return total, max(int(np.prod(s)) * 2 for s in shapes.values())


def step(name: str, hf: str, out: str, quantize: bool) -> dict:
    """One step in this (fresh) process: its seconds and how far it raised the peak resident memory."""
    import jax
    jax.devices()  # the runtime's own memory is not the step's
    reset_peak()
    before = peak_kb()
    start = time.perf_counter()
    result = {}
    if name == "convert":
        from convert import convert
        convert(hf, out, progress=False, quantize="int8" if quantize else None)
    else:
        import jaxvlm
        model = jaxvlm.load(out, verify=False)
        jax.block_until_ready(model.params)
        result["load_s"] = time.perf_counter() - start
        result["params_gb"] = sum(x.nbytes for x in jax.tree.leaves(model.params)) / 1e9
        c = model.config
        prompt = np.concatenate([np.full(c.vision.num_features, c.image_token_id), [2, 1000, 2000, 108]])[None]
        pixels = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
        token_start = time.perf_counter()
        result["token"] = int(model.generate_ids(prompt, pixel_values=pixels, max_new_tokens=1)[0, 0])
        result["token_s"] = time.perf_counter() - token_start
    result.update(seconds=time.perf_counter() - start, peak_gb=(peak_kb() - before) * 1024 / 1e9,
                  vmhwm_gb=peak_kb() * 1024 / 1e9)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/paligemma-3b")
    parser.add_argument("--quantize", action="store_true", help="also convert with --quantize int8")
    parser.add_argument("--step", nargs=3, help=argparse.SUPPRESS)  # name, hf folder, out folder
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(*args.step, args.quantize)))
        return

    shutil.rmtree(args.workdir, ignore_errors=True)
    hf = os.path.join(args.workdir, "hf")
    start = time.perf_counter()
    total, largest = build(hf)
    print(f"PaliGemma-3B-shaped checkpoint, bfloat16: {total / 1e9:.2f} GB in "
          f"{len([n for n in os.listdir(hf) if n.endswith('.safetensors')])} shards, largest tensor "
          f"{largest / 1e9:.2f} GB (built in {time.perf_counter() - start:.0f} s)")
    variants = [("bfloat16", False)] + ([("int8", True)] if args.quantize else [])
    for label, quantize in variants:
        out = os.path.join(args.workdir, label)
        results = {}
        for name in ("convert", "load"):
            flags = ["--quantize"] if quantize else []
            run = subprocess.run([sys.executable, __file__, "--step", name, hf, out, *flags], check=True,
                                 capture_output=True, text=True)
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        c, g = results["convert"], results["load"]
        bound = largest / 1e9 + 2
        print(f"{label:9} convert {c['seconds']:6.1f} s, peak memory added {c['peak_gb']:.2f} GB (bound: largest "
              f"tensor + 2 GB = {bound:.2f} GB: {'within' if c['peak_gb'] <= bound else 'OVER'}), process peak "
              f"{c['vmhwm_gb']:.2f} GB")
        print(f"{'':9} load    {g['load_s']:6.1f} s, params {g['params_gb']:.2f} GB, peak memory added "
              f"{g['peak_gb']:.2f} GB; one generated token (268-token prompt with the image) in "
              f"{g['token_s']:.1f} s: id {g['token']}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
