"""Prefill and decode speed, jaxvlm vs transformers, on the same random weights in one process.

Default: a Gemma-shaped model of about 270M parameters (width 1024, 16 layers, 8 heads, 1 kv head,
head_dim 128, MLP 4096, vocab 32000) in float32, batch 1, a 128-token prompt and 64 new tokens.

    python benchmarks/decode.py [--layers 16] [--prompt 128] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def build_hf(args, directory: str):
    import torch
    import transformers
    config = transformers.GemmaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=1,
                                      head_dim=128, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=2, dtype=torch.float32)
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls (after the caller's warm-up), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_transformers(model, prompt: np.ndarray, new: int, repeats: int) -> dict:
    import torch
    ids = torch.tensor(prompt)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model(ids)  # warm-up
        prefill, _ = timed(lambda: model(ids, use_cache=True), repeats)
        model.generate(ids, **kwargs)
        total, out = timed(lambda: model.generate(ids, **kwargs), repeats)
    return dict(prefill_ms=prefill * 1e3, decode_tps=(new - 1) / (total - prefill), total_s=total, compile_s=0.0,
                tokens=out[:, prompt.shape[1]:].numpy())


def bench_jaxvlm(model, prompt: np.ndarray, new: int, repeats: int) -> dict:
    from jaxvlm import generate
    from jaxvlm.sampling import Sampler

    c, sampler = model.config.decoder, Sampler()
    rows = list(prompt)
    length = generate.prompt_bucket(prompt.shape[1])
    tokens, valid = map(jnp.asarray, generate.right_align(rows, length, 0))
    steps = new - 1
    scalars = dict(key=jax.random.key(0), temperature=jnp.float32(1), top_p=jnp.float32(1),
                   eos_ids=jnp.asarray([1], jnp.int32), pad_id=jnp.int32(0))
    size = generate.cache_bucket(length + steps)

    def run_prefill():
        state, token = generate.prefill(c, model.dtype, sampler, size, model.params, tokens, valid,
                                        jnp.zeros(len(rows), bool), jnp.int32(0), **scalars)
        return jax.block_until_ready((state, token))

    def run_decode(state):
        return jax.block_until_ready(generate.decode(c, model.dtype, sampler, steps, model.params, state, **scalars))

    start = time.perf_counter()
    state, _ = run_prefill()
    run_decode(state)
    compile_s = time.perf_counter() - start
    prefill, _ = timed(run_prefill, repeats)
    decode_times = []
    for _ in range(repeats):
        state, _ = run_prefill()
        decode_times.append(timed(lambda: run_decode(state), 1)[0])
    model.generate_ids(prompt, max_new_tokens=new)  # compile the chunked path generate_ids uses
    total, out = timed(lambda: model.generate_ids(prompt, max_new_tokens=new), repeats)
    return dict(prefill_ms=prefill * 1e3, decode_tps=steps / statistics.median(decode_times), total_s=total,
                compile_s=compile_s, tokens=out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import jaxvlm
    from convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf(args, os.path.join(tmp, "hf"))
        params = sum(p.numel() for p in hf_model.parameters())
        convert(os.path.join(tmp, "hf"), os.path.join(tmp, "jax"), progress=False)
        model = jaxvlm.load(os.path.join(tmp, "jax"))
    prompt = np.random.default_rng(0).integers(3, 32000, size=(1, args.prompt))

    print(f"Gemma-shaped model, {params / 1e6:.0f}M params, float32, batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens | jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    hf = bench_transformers(hf_model, prompt, args.new, args.repeats)
    jx = bench_jaxvlm(model, prompt, args.new, args.repeats)
    same = np.array_equal(hf["tokens"], jx["tokens"])
    rows = [("prefill ms", "prefill_ms", False), ("decode tokens/s", "decode_tps", True),
            ("generate total s", "total_s", False), ("compile s", "compile_s", None)]
    print(f"{'':18}{'transformers':>14}{'jaxvlm':>10}{'speed-up':>10}")
    for label, key, higher_is_better in rows:
        ratio = "" if higher_is_better is None else (
            f"{jx[key] / hf[key]:.2f}x" if higher_is_better else f"{hf[key] / jx[key]:.2f}x")
        print(f"{label:18}{hf[key]:>14.2f}{jx[key]:>10.2f}{ratio:>10}")
    print(f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
