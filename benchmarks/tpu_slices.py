"""Which TPU slice holds which released model: the compiler's figures (`jaxvlm.aot`), not a run's.

For each preset, in bfloat16 and int8: the smallest v5e and v6e slice (and mesh) on which prefill of a batch
of 8 prompts of 8192 tokens and a decode step of 8 rows with 8192-slot caches both fit, and the largest
batch whose decode step (what the serving engine runs; it prefills one request at a time) fits v5e-8 and
v6e-8 (2x4) with 8192-slot caches. Compiles a few programs a cell, minutes a model on a 2-core CPU;
results are kept in a JSON file (one line a cell, done cells skipped when run again, so that runs over
different presets can share it) and printed as the README's table.

    python benchmarks/tpu_slices.py [--presets gemma-2-9b qwen3-8b] [--out tpu_slices.jsonl] [--table]
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxvlm import aot, presets  # noqa: E402
from jaxvlm.checkpoint import abstract_params  # noqa: E402

PRESETS = ["paligemma-3b-pt-224", "paligemma2-3b-pt-224", "gemma-3-4b-it", "qwen3-8b", "gemma-2-9b",
           "paligemma2-10b-pt-224", "gemma-3-12b-it", "phi-3-medium-4k-instruct", "gemma-2-27b", "gemma-3-27b-it",
           "paligemma2-28b-pt-224", "qwen3-30b-a3b", "qwen3-32b"]
LAYOUTS = ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]
CACHE = PROMPT = 8192
BATCH = 8
MOST = 4096  # the largest batch looked for


def meshes(name: str, devices: int) -> list[dict[str, int]]:
    """Every device on 'model'; and, where the kv heads do not split that far (their cache would be held
    again on each extra device), the kv heads' split on 'model' and the rest on 'data'."""
    kv = presets.get(name).decoder.num_kv_heads
    split = math.gcd(kv, devices)
    return [{"model": devices}] + ([{"data": devices // split, "model": split}] if split < devices else [])


def estimate(name: str, quantize: str | None, devices: int) -> float:
    """Bytes a device holds for batch 8 (weights and cache, evenly split): where the search starts."""
    config = presets.get(name)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
    d = config.decoder
    cache = 2 * d.depth * d.num_kv_heads * d.head_dim * CACHE * BATCH * 2
    return (params * (1 if quantize else 2) + cache) / devices


def fits(name, topology, quantize, mesh, programs=("decode", "prefill"), batch=BATCH):
    """(whether every program fits, the report): compiled one at a time, none after the first that does not
    fit (the decode step first, the quicker to compile)."""
    report = None
    for program in programs:
        one = aot.report(name, topology, batch=batch, cache=CACHE, prompt=PROMPT, quantize=quantize, mesh=mesh,
                         programs=(program,), find_largest=False)
        report = one if report is None else dict(report, programs={**report["programs"], **one["programs"]})
        if not one["programs"][program]["fits"]:
            return False, report
    return True, report


def smallest_slice(name: str, chip: str, quantize: str | None) -> dict:
    hbm = aot.HBM_BYTES[chip]
    devices = lambda i: math.prod(map(int, LAYOUTS[i].split("x")))

    def held(i):  # the first mesh on which layout i holds the model, or None
        return next((mesh for mesh in meshes(name, devices(i))
                     if fits(name, f"{chip}:{LAYOUTS[i]}", quantize, mesh)[0]), None)

    i = next((i for i in range(len(LAYOUTS)) if estimate(name, quantize, devices(i)) < 0.8 * hbm), len(LAYOUTS) - 1)
    start, mesh = i, held(i)
    while mesh is None and i + 1 < len(LAYOUTS):  # up until one holds it
        i += 1
        mesh = held(i)
    if mesh is None:
        return dict(topology=None, mesh=None)
    while i == start and i > 0 and (smaller := held(i - 1)) is not None:  # down while smaller ones hold it
        i, mesh, start = i - 1, smaller, i - 1
    return dict(topology=f"{chip}:{LAYOUTS[i]}", mesh=mesh)


def bracket(holds, guess: int, multiple: int, floor: int, most: int) -> tuple[int, int]:
    """(a batch that `holds`, a larger one that does not; or `most` twice where `most` holds), searched for
    from `guess` (a multiple of `multiple`, in [floor, most]; `floor` holds) in steps that double from
    `multiple` away from it: two compiles where the guess is right."""
    step = multiple
    if holds(guess):
        low = guess
        while low < most:
            probe = min(most, low + step)
            if not holds(probe):
                return low, probe
            low, step = probe, step * 2
        return most, most
    high = guess
    while high - step > floor:
        probe = high - step
        if holds(probe):
            return probe, high
        high, step = probe, step * 2
    return floor, high


def largest_batch(name: str, chip: str, quantize: str | None) -> dict:
    """The largest decode batch on chip:2x4 over the meshes tried: memory is about affine in the batch, so
    two compiles give a guess, and two more check it (the guess fits, one multiple of the batch more does
    not); where the guess is off, `bracket` and halving close in on the answer."""
    topology, hbm = f"{chip}:2x4", aot.HBM_BYTES[chip]
    best = dict(batch=0, mesh=None)
    for mesh in meshes(name, 8):
        multiple = mesh.get("data", 1)
        total = lambda b: fits(name, topology, quantize, mesh, ("decode",), b)[1]["programs"]["decode"]
        at8 = total(8)
        if not at8["fits"]:
            continue
        at16 = total(16)
        if not at16["fits"]:
            low, high = 8, 16
        else:
            d = presets.get(name).decoder  # at least a row's cache, split over the 8 devices at best
            per_row = max(2 * d.depth * d.num_kv_heads * d.head_dim * CACHE * 2 / 8,
                          (at16["total_bytes"] - at8["total_bytes"]) / 8)
            guess = min(MOST, max(16, int(8 + (hbm - at8["total_bytes"]) / per_row) // multiple * multiple))
            # (4096 rows fitting is reported as 4096)
            low, high = bracket(lambda b: total(b)["fits"], guess, multiple, 16, MOST)
        while high - low > multiple:
            middle = (low + high) // 2 // multiple * multiple
            low, high = (middle, high) if total(middle)["fits"] else (low, middle)
        if low > best["batch"]:
            best = dict(batch=low, mesh=mesh)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "tpu_slices.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the table of the results so far only")
    args = parser.parse_args()
    def read_done():  # read again before each cell, so that several runs can share the file
        done = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                for line in f:
                    row = json.loads(line)
                    done[(row["preset"], row["weights"], row["chip"])] = row
        return done

    done = read_done()
    if not args.table:
        for name in args.presets:
            for quantize in (None, "int8"):
                for chip in ("v5e", "v6e"):
                    key = (name, quantize or "bfloat16", chip)
                    done = read_done()
                    if key in done:
                        continue
                    row = dict(preset=name, weights=key[1], chip=chip, smallest=smallest_slice(name, chip, quantize),
                               largest=largest_batch(name, chip, quantize))
                    done[key] = row
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    mesh = lambda m: "" if not m else " (" + ",".join(f"{k}={v}" for k, v in m.items()) + ")"
    print("| model | weights | smallest v5e slice | smallest v6e slice | largest batch, v5e-8 | largest batch, v6e-8 |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        for weights in ("bfloat16", "int8"):
            cells = [done.get((name, weights, chip)) for chip in ("v5e", "v6e")]
            if not all(cells):
                continue
            slice_ = lambda c: (c["smallest"]["topology"] or "none") + mesh(c["smallest"]["mesh"])
            batch = lambda c: f"{c['largest']['batch']}{mesh(c['largest']['mesh'])}"
            print(f"| {name} | {weights} | {slice_(cells[0])} | {slice_(cells[1])} | {batch(cells[0])} | "
                  f"{batch(cells[1])} |")


if __name__ == "__main__":
    main()
