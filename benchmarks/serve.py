"""Serving: `jaxvlm serve` against `transformers serve --continuous-batching` and one request at a time
through jaxvlm's `generate`, on the same random weights, driven by the same client code.

A Gemma-shaped model (width 1024, 8 heads, 1 kv head, head_dim 128, MLP 4096, vocab 32000; --layers deep)
in float32 on the CPU, with a word-level tokenizer whose 32000 words are `w0` .. `w31999` (so a prompt's
length in tokens is exact). For 1, 4, 16 and 64 concurrent clients, each streams completions of mixed
prompt lengths (16 to 256 tokens) and output lengths (16 to 96 tokens) from the official `openai` client:
output tokens/s over the whole run, time to first token and inter-token latency (p50, p99). Then the prefix
cache: the time to first token of a request whose 2,000-token prompt begins like an earlier one's, with the
cache and without (the engine in process).

    python benchmarks/serve.py [--layers 4] [--clients 1,4,16,64] [--slots 64] [--skip-transformers]

transformers serve needs `accelerate` (pip install accelerate) to load a model on a device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

VOCAB = 32000


def build_checkpoint(directory: str, layers: int) -> str:
    """A Gemma-shaped transformers model and a word-level tokenizer, saved as a Hugging Face folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    config = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=1,
                                      head_dim=128, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=2, dtype=torch.float32)
    torch.manual_seed(0)
    transformers.GemmaForCausalLM(config).eval().save_pretrained(directory)
    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(os.path.join(directory, "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"),
                                                bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return directory


def requests(count: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens): prompts of 16 to 256 words, answers of 16 to 96 tokens."""
    rng = np.random.default_rng(seed)
    return [(" ".join(f"w{w}" for w in rng.integers(3, VOCAB, int(rng.integers(16, 257)))),
             int(rng.integers(16, 97))) for _ in range(count)]


async def drive(url: str, model: str, work: list[tuple[str, int]], clients: int) -> dict:
    """`clients` concurrent streams over `work`; the output tokens/s of the run and each request's timings."""
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    pending = list(work)
    ttft, itl, tokens = [], [], 0

    async def one(prompt: str, max_tokens: int):
        nonlocal tokens
        start = time.perf_counter()
        last = None
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].text:
                continue
            if last is None:
                ttft.append(now - start)
            else:
                itl.append(now - last)
            last = now

    async def worker():
        while pending:
            await one(*pending.pop(0))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - start
    await client.close()
    p = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")
    return dict(tps=tokens / seconds, ttft50=p(ttft, 50), ttft99=p(ttft, 99), itl50=p(itl, 50), itl99=p(itl, 99),
                tokens=tokens, seconds=seconds)


class Process:
    """A server process on 127.0.0.1, waited for until GET /health answers."""

    def __init__(self, command: list[str], port: int, log: str, timeout: float = 600):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited; see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"{command[0]} did not start; see {log}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models") as r:
        return json.load(r)["data"][0]["id"]


def warm_up() -> list[tuple[str, int]]:
    """Prompts of every bucket's length (16 to 256 tokens), 64 of them: at 64 clients the running batch
    passes through every size, so jaxvlm compiles all its programs here."""
    lengths = [16, 32, 64, 128, 160, 192, 224, 256]
    return [(" ".join(f"w{3 + (i * 7 + j) % (VOCAB - 3)}" for j in range(lengths[i % 8])), 16) for i in range(64)]


def measure_server(name: str, server: Process, model: str, levels: list[int], per_client: int) -> dict:
    for clients in (1, 64):
        asyncio.run(drive(server.url, model, warm_up()[:8] if clients == 1 else warm_up(), clients))
    out = {}
    for clients in levels:
        work = requests(max(8, per_client * clients), seed=clients)
        out[clients] = asyncio.run(drive(server.url, model, work, clients))
        r = out[clients]
        print(f"  {name} {clients:>3} clients: {r['tps']:.1f} tokens/s ({r['tokens']} in {r['seconds']:.1f} s)",
              flush=True)
    return out


def one_at_a_time(checkpoint: str, count: int) -> float:
    """Output tokens/s of `count` requests through `generate`, one after another: the second time, so that
    every program they need is compiled."""
    import jaxvlm
    model = jaxvlm.load(checkpoint)
    work = requests(count, seed=7)
    for _ in range(2):
        start, tokens = time.perf_counter(), 0
        for prompt, max_tokens in work:
            tokens += len(model.generate(prompt, max_new_tokens=max_tokens, logprobs=True).token_ids)
    return tokens / (time.perf_counter() - start)


def prefix_cache_ttft(checkpoint: str, shared: int = 2000) -> tuple[float, float]:
    """Time to first token (s) of a prompt that shares its first `shared` tokens with an earlier one, with the
    engine's prefix cache and without (each measured after a warm-up pair of the same shapes)."""
    import jaxvlm
    from jaxvlm.engine import Engine, Request
    model = jaxvlm.load(checkpoint)
    rng = np.random.default_rng(3)
    out = []
    for budget in (1 << 30, 0):
        engine = Engine(model, slots=4, cache_size=2560, prefix_cache_bytes=budget)
        times = []
        for _ in range(2):  # the first pair compiles
            prefix = rng.integers(3, VOCAB, shared)
            first, second = (np.concatenate([prefix, rng.integers(3, VOCAB, 20)]) for _ in range(2))
            engine.submit(Request(tokens=first, max_tokens=2))
            engine.run()
            start = time.perf_counter()
            engine.submit(Request(tokens=second, max_tokens=2))
            while not any(event.tokens for event in engine.step()):
                pass
            times.append(time.perf_counter() - start)
            engine.run()
        out.append(times[-1])
    return out[0], out[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="the jaxvlm server's decode steps a call")
    parser.add_argument("--alone", type=int, default=8, help="requests timed one at a time through generate")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    import torch
    import jax
    print(f"serving | jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores, {args.layers} layers", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(os.path.join(tmp, "hf"), args.layers)
        alone = one_at_a_time(checkpoint, args.alone)
        print(f"  one at a time through generate: {alone:.1f} tokens/s", flush=True)
        with_cache, without = prefix_cache_ttft(checkpoint)
        print(f"  prefix cache, 2,000 shared tokens: first token in {with_cache * 1e3:.0f} ms, "
              f"{without * 1e3:.0f} ms without ({without / with_cache:.1f}x)", flush=True)
        results = {}
        port = free_port()
        server = Process([sys.executable, "-m", "jaxvlm.cli", "serve", "--checkpoint", checkpoint, "--port", str(port),
                          "--slots", str(args.slots), "--chunk", str(args.chunk), "--max-queue", "1024"], port, os.path.join(tmp, "jaxvlm.log"))
        try:
            results["jaxvlm"] = measure_server("jaxvlm", server, served_model(server.url), levels, args.per_client)
        finally:
            server.stop()
        if not args.skip_transformers:
            port = free_port()
            cli = os.path.join(os.path.dirname(sys.executable), "transformers")
            server = Process([cli, "serve", checkpoint, "--continuous-batching", "--port", str(port),
                              "--device", "cpu"], port, os.path.join(tmp, "transformers.log"))
            try:
                results["transformers"] = measure_server("transformers serve", server, checkpoint, levels,
                                                         args.per_client)
            finally:
                server.stop()
    print()
    print(f"{'clients':>7} | {'jaxvlm tok/s':>12} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} | "
          f"{'transformers tok/s':>18} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} | {'vs generate':>11} "
          f"{'vs transformers':>15}")
    for clients in levels:
        j = results["jaxvlm"][clients]
        t = results.get("transformers", {}).get(clients)
        cell = lambda r: (f"{r['tps']:>12.1f} {r['ttft50']:>7.0f}/{r['ttft99']:<8.0f} "
                          f"{r['itl50']:>6.0f}/{r['itl99']:<8.0f}")
        peer = (f"{t['tps']:>18.1f} {t['ttft50']:>7.0f}/{t['ttft99']:<8.0f} {t['itl50']:>6.0f}/{t['itl99']:<8.0f}"
                if t else f"{'-':>18} {'-':>16} {'-':>15}")
        versus = f"{j['tps'] / t['tps']:.2f}x" if t else "-"
        print(f"{clients:>7} | {cell(j)} | {peer} | {j['tps'] / alone:>10.2f}x {versus:>15}")
    print(f"one at a time through generate: {alone:.1f} tokens/s")


if __name__ == "__main__":
    main()
