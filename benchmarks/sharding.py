"""A model over 8 simulated CPU devices: host memory while loading it sharded, and the collectives of
the decode step on each mesh.

A Gemma-shaped decoder (width 1024, 16 layers, 8 heads, 1 kv head, head_dim 128, MLP 4096, vocab 32000;
272M parameters, 1.09 GB in float32) is saved once; each load runs in a fresh process, which reports how
far its peak resident memory rose while loading (VmHWM after resetting it). The simulated devices live in
host memory, so that rise holds the params' shards on every device (more than the model where an axis
replicates them: `data` always does); what it holds beyond them is transient, and a full copy of the
model on one device or on the host before sharding would add the model's size.

    python benchmarks/sharding.py [--layers 16]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import peak_kb, reset_peak  # noqa: E402

MESHES = {"1 device": None, "(1, 8) data, model": ((1, 8), ("data", "model")),
          "(2, 4) data, model": ((2, 4), ("data", "model")),
          "(2, 2, 2) data, fsdp, model": ((2, 2, 2), ("data", "fsdp", "model")),
          "(1, 8, 1) data, fsdp, model": ((1, 8, 1), ("data", "fsdp", "model"))}


def measure(folder: str, mesh_name: str) -> dict:
    """In a fresh process: peak memory added by loading, and the decode step's collectives."""
    import jaxvlm
    jax.devices()  # the backend's own memory is not the model's
    reset_peak()
    before = peak_kb()
    spec = MESHES[mesh_name]
    model = jaxvlm.load(folder, verify=False, mesh=None if spec is None else jax.make_mesh(*spec))
    jax.block_until_ready(model.params)
    added = (peak_kb() - before) * 1024
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    shards = sum(s.data.nbytes for x in jax.tree.leaves(model.params) for s in x.addressable_shards)
    collectives = collections.Counter()
    if spec is not None:
        text = model.decode_program(np.arange(3, 19)[None].repeat(2, 0))
        for dtype, shape, op in re.findall(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all|"
                                           r"collective-permute)(?:-start)?\(", text):
            collectives[f"{op} {dtype}[{shape}]"] += 1
    return {"added": added, "nbytes": nbytes, "shards": shards, "collectives": dict(collectives)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "MESH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    from jaxvlm import checkpoint
    from jaxvlm.config import DecoderConfig, ModelConfig, TokensConfig
    config = ModelConfig(decoder=DecoderConfig(
        vocab_size=32000, width=1024, depth=args.layers, num_heads=8, num_kv_heads=1, head_dim=128, mlp_dim=4096,
        mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True, tie_embeddings=True),
        tokens=TokensConfig(eos_ids=(1,), pad_id=0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint.save_model(os.path.join(tmp, "model"), config,
                                       checkpoint.init_params(config, jax.random.key(0)))
        print(f"sharded load and decode | jax {jax.__version__}, 8 simulated CPU devices, {args.layers} layers")
        for name in MESHES:
            out = subprocess.run([sys.executable, __file__, "--measure", folder, name], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:30} load: peak memory +{r['added'] / 1e9:.2f} GB = shards on all devices "
                  f"{r['shards'] / 1e9:.2f} GB + transient {(r['added'] - r['shards']) / 1e9:.2f} GB "
                  f"({(r['added'] - r['shards']) / r['nbytes']:.2f}x the model)")
            for op, count in sorted(r["collectives"].items()):
                print(f"{'':32}decode step: {count} x {op}")


if __name__ == "__main__":
    main()
