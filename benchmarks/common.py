"""What the benchmarks share: timing, jaxvlm and transformers generation side by side, the table."""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def convert_for_jaxvlm(hf_model):
    """The jaxvlm model with `hf_model`'s weights: saved as Hugging Face does, converted, loaded."""
    import jaxvlm
    from convert import convert
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(os.path.join(tmp, "hf"))
        convert(os.path.join(tmp, "hf"), os.path.join(tmp, "jax"), progress=False)
        return jaxvlm.load(os.path.join(tmp, "jax"))


def reset_peak() -> None:
    """Resets this process's peak resident memory (VmHWM) to its current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_kb() -> int:
    """This process's peak resident memory since the last `reset_peak`, in KiB (not ru_maxrss, which a
    child inherits from its parent)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls (after the caller's warm-up), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_transformers(model, inputs: dict, new: int, repeats: int) -> dict:
    """Prefill (one forward over the prompt, images included) and greedy generation of `new` tokens."""
    import torch
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None  # GPU calls return early
    with torch.inference_mode():
        model(**inputs)  # warm-up
        prefill, _ = timed(lambda: (model(**inputs, use_cache=True), sync()), repeats)
        model.generate(**inputs, **kwargs)
        total, out = timed(lambda: model.generate(**inputs, **kwargs).cpu(), repeats)
    return dict(prefill_ms=prefill * 1e3, decode_tps=(new - 1) / (total - prefill), total_s=total, compile_s=0.0,
                tokens=out[:, inputs["input_ids"].shape[1]:].numpy())


def bench_jaxvlm(model, prompt: np.ndarray, new: int, repeats: int, pixels: np.ndarray | None = None) -> dict:
    """The same with jaxvlm: prefill (encoding the images) and the scanned decode, each jit-compiled once."""
    from jaxvlm import generate

    c = model.config.computation
    length = generate.prompt_bucket(prompt.shape[1])
    tokens, valid = map(jnp.asarray, generate.right_align(list(prompt), length, 0))
    prefix = valid if c.prefix_lm else None
    pixels = None if pixels is None else jnp.asarray(pixels)
    steps = new - 1
    B = len(prompt)
    rules = generate.sampling_rules(B, [1], 0)  # greedy
    size = generate.cache_bucket(length + steps)

    def run_prefill():
        state, token, _, _ = generate.prefill(c, model.dtype, False, size, model.shard, model.params, tokens, valid,
                                           prefix, pixels, None, jnp.zeros(B, bool), np.zeros(B, np.int32), rules)
        return jax.block_until_ready((state, token))

    def run_decode(state):
        return jax.block_until_ready(generate.decode(c, model.dtype, False, steps, model.shard, model.params, state,
                                                     rules))

    start = time.perf_counter()
    state, _ = run_prefill()
    run_decode(state)
    compile_s = time.perf_counter() - start
    prefill, _ = timed(run_prefill, repeats)
    decode_times = []
    for _ in range(repeats):
        state, _ = run_prefill()
        decode_times.append(timed(lambda: run_decode(state), 1)[0])
    generate_ids = lambda: model.generate_ids(prompt, pixel_values=pixels, max_new_tokens=new)
    generate_ids()  # compile the chunked path generate_ids uses
    total, out = timed(generate_ids, repeats)
    return dict(prefill_ms=prefill * 1e3, decode_tps=steps / statistics.median(decode_times), total_s=total,
                compile_s=compile_s, tokens=out)


ROWS = [("prefill ms", "prefill_ms", False), ("decode tokens/s", "decode_tps", True),
        ("generate total s", "total_s", False), ("compile s", "compile_s", None)]


def print_table(hf: dict, jx: dict, rows=ROWS) -> None:
    """One line per measure, with jaxvlm's speed-up over transformers (> 1 is faster)."""
    print(f"{'':18}{'transformers':>14}{'jaxvlm':>10}{'speed-up':>10}")
    for label, key, higher_is_better in rows:
        ratio = "" if higher_is_better is None else (
            f"{jx[key] / hf[key]:.2f}x" if higher_is_better else f"{hf[key] / jx[key]:.2f}x")
        print(f"{label:18}{hf[key]:>14.2f}{jx[key]:>10.2f}{ratio:>10}")
    print(f"greedy tokens identical: {np.array_equal(hf['tokens'], jx['tokens'])}")


def header(description: str) -> str:
    import torch
    return (f"{description} | jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
