"""The engine: requests arriving at different times share a running decode batch of slots, and each gets the
tokens `generate` gives it alone (and transformers' generate), whatever shares the batch."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

import jaxvlm
from jaxvlm.engine import Engine, Request
from tests import hf_models

IMAGE = "examples/shapes.png"


def alone(model, row: np.ndarray, max_tokens: int, ids=None, **settings) -> list[int]:
    """`generate_ids` for one prompt, through its end-of-sequence token (from its `ids` [1, n] where given)."""
    out = (model.generate_ids(row[None], max_new_tokens=max_tokens, **settings) if ids is None else ids)[0]
    ended = np.isin(out, list(model.config.tokens.eos_ids))
    return list(map(int, out[:int(np.argmax(ended)) + 1] if ended.any() else out))


def staggered(engine: Engine, requests: list[Request], arrivals: list[int], logprobs: bool = False) -> list:
    """Submits request i before step arrivals[i] (steps counted from 0), runs to the end, and returns each
    request's tokens (and log-probabilities) in submission order."""
    ids, step = [], 0
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    while pending or not engine.idle:
        while pending and arrivals[pending[0]] <= step:
            ids.append((pending[0], engine.submit(requests[pending.pop(0)])))
        engine.step()
        step += 1
    done = engine.run()
    out = [done[request_id] for _, request_id in sorted(ids)]
    return [(o.tokens, o.logprobs) for o in out] if logprobs else [o.tokens for o in out]


@pytest.fixture(scope="module", params=["gemma2", "qwen3"])
def text_family(request, convert_and_load):
    """(name, transformers model, jaxvlm model); EOS a token the greedy run produces, so rows end early."""
    name = request.param
    model = hf_models.build(name, seed=5)
    rows = hf_models.prompts(4, [5, 13, 9, 3, 20, 7, 11, 4])
    eos = int(hf_models.hf_generate(model, rows, 12)[1, 5])
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    return name, model, convert_and_load(model, f"{name}-engine"), rows


def test_staggered_requests_get_the_tokens_of_each_alone(text_family):
    """Eight prompts of different lengths arrive at different steps into 2 slots; a cache of 64 slots makes
    the cursor go round (gemma2's local layers keep rings of their window)."""
    import torch
    name, hf, jx, rows = text_family
    limits = [12, 10, 7, 12, 9, 12, 12, 11]
    engine = Engine(jx, slots=2, cache_size=64, chunk=4)
    # the shared cursor starts 24 slots before the end of the 64: requests straddle it as it goes round
    engine.state = engine.state.replace(cache=engine.state.cache.replace(end=jax.numpy.int32(64 + 40)))
    scored = staggered(engine, [Request(tokens=r, max_tokens=n) for r, n in zip(rows, limits)],
                       [0, 0, 1, 3, 3, 4, 9, 9], logprobs=True)
    assert int(engine.state.cache.end) > 2 * 64 + 16  # well past the round
    got = [tokens for tokens, _ in scored]
    each = [jx.generate_ids(r[None], max_new_tokens=n, logprobs=True) for r, n in zip(rows, limits)]
    want = [alone(jx, r, n, ids=ids) for r, n, (ids, _) in zip(rows, limits, each)]
    assert got == want, name
    for (tokens, logprobs), (_, expected) in zip(scored, each):  # the same logits, not only the same argmax
        np.testing.assert_allclose(logprobs, expected[0, :len(tokens)], atol=1e-5)
    assert any(len(w) < n for w, n in zip(want, limits))  # some rows ended on their end-of-sequence token
    for i, (row, limit) in enumerate(zip(rows, limits)):  # transformers' generate of each prompt alone
        with torch.no_grad():
            out = hf.generate(torch.tensor(row[None]), max_new_tokens=limit, do_sample=False, pad_token_id=0)
        assert got[i] == list(map(int, out[0, len(row):])), f"{name}: request {i}"


def test_sampled_requests_get_the_tokens_of_each_alone(text_family):
    """A request's sampled tokens come from its own seed and step, and its repetition penalty from its own
    prompt and tokens: the same in the engine as alone."""
    _, _, jx, rows = text_family
    settings = [dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=5, seed=4), dict(repetition_penalty=1.5),
                dict(temperature=1.2, top_p=0.8, seed=5, repetition_penalty=0.8)]
    engine = Engine(jx, slots=2, cache_size=64, chunk=4)
    got = staggered(engine, [Request(tokens=r, max_tokens=8, **s) for r, s in zip(rows, settings)], [0, 1, 1, 2])
    assert got == [alone(jx, r, 8, **s) for r, s in zip(rows, settings)]


def test_a_new_mix_of_requests_compiles_nothing(text_family, caplog):
    _, _, jx, rows = text_family
    engine = Engine(jx, slots=2, cache_size=64, chunk=4)
    prompts, lengths, arrivals = [rows[2], rows[0][:4], rows[1][:10]], [3, 11, 5], [0, 2, 2]
    # the engine's programs: prompt buckets, one or both slots decoding, greedy and sampling (each request
    # runs to its max_tokens, so that both warm-ups see the same chunks)
    for warm_up in ({}, dict(temperature=1.0)):
        staggered(engine, [Request(tokens=p, max_tokens=n, min_new_tokens=n, **warm_up)
                           for p, n in zip(prompts, lengths)], arrivals)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        caplog.clear()
        settings = [dict(temperature=0.9, seed=8), dict(top_k=3, temperature=1.0), dict(min_new_tokens=2)]
        mix = [Request(tokens=p, max_tokens=n, **s) for p, n, s in zip(prompts, lengths, settings)]
        staggered(engine, mix, arrivals)
        compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled


def test_vision_language_requests_with_images():
    """The built-in model (PaliGemma's prefix, an image a request) in 2 slots, five questions arriving
    apart: each answer is generate's for that question alone."""
    model = jaxvlm.load()
    prompts = ["caption en", "count shapes", "what color is the circle?", "where is the square?",
               "what is in the top left?"]
    engine = Engine(model, slots=2, cache_size=128, chunk=4)
    ids = {}
    for i, prompt in enumerate(prompts):
        ids[engine.submit_text(prompt, IMAGE, max_tokens=20)] = i
        engine.step()
    done = engine.run()
    for request_id, i in ids.items():
        assert model.tokenizer.decode(done[request_id].tokens) == model.generate(prompts[i], image=IMAGE,
                                                                              max_new_tokens=20)
        assert done[request_id].finish_reason == "stop"


@pytest.mark.parametrize("change, message", [
    (dict(max_tokens=0), "max_tokens must be an int >= 1"),
    (dict(max_tokens=60), r"needs 76 cache slots; the engine has 64"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(tokens=np.zeros((0,), np.int32)), "a request's prompt must be a non-empty int array"),
])
def test_bad_requests_are_named(text_family, change, message):
    _, _, jx, rows = text_family
    engine = Engine(jx, slots=1, cache_size=64)
    request = Request(tokens=rows[0], max_tokens=4)
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(ValueError, match=message):
        engine.submit(request)
    assert engine.idle


def test_events_bring_each_token_once_and_cancel_frees_the_slot(text_family):
    _, _, jx, rows = text_family
    engine = Engine(jx, slots=1, cache_size=64, chunk=4)
    first = engine.submit(Request(tokens=rows[0], max_tokens=12))
    second = engine.submit(Request(tokens=rows[1], max_tokens=6))  # waits: one slot
    seen: dict[int, list[int]] = {first: [], second: []}
    reasons = {}
    while not engine.idle:
        for event in engine.step():
            seen[event.request_id] += event.tokens
            if event.finish_reason:
                reasons[event.request_id] = event.finish_reason
            if event.request_id == first and len(seen[first]) >= 3 and first not in reasons:
                assert engine.cancel(first)
                reasons[first] = "cancelled"
    done = engine.run()
    assert done[first].finish_reason == "cancelled" and seen[first] == done[first].tokens
    assert seen[second] == done[second].tokens == alone(jx, rows[1], 6)  # it took the freed slot
    assert not engine.cancel(first) and engine.idle


def test_text_stop_strings_and_top_logprobs():
    """The built-in model: a request's text streams a piece a token and ends before its stop string, as
    generate's does; its top tokens hold the chosen one first (greedy) with the same log-probability."""
    model = jaxvlm.load()
    plain = model.generate("caption en", image=IMAGE, max_new_tokens=20)
    stop = plain[len(plain) // 2:len(plain) // 2 + 3]
    engine = Engine(model, slots=2, cache_size=128, chunk=4)
    stopped = engine.submit_text("caption en", IMAGE, max_tokens=20, stop=[stop])
    scored = engine.submit_text("caption en", IMAGE, max_tokens=20, top_logprobs=3)
    pieces = {stopped: [], scored: []}
    while not engine.idle:
        for event in engine.step():
            assert len(event.pieces) == len(event.tokens) == len(event.logprobs)
            pieces[event.request_id] += event.pieces
    done = engine.run()
    assert done[stopped].text == "".join(pieces[stopped]) == model.generate("caption en", image=IMAGE,
                                                                            max_new_tokens=20, stop=stop)
    assert done[stopped].finish_reason == "stop" and len(done[stopped].tokens) < len(done[scored].tokens)
    assert done[scored].text == "".join(pieces[scored]) == plain
    assert sum(1 for p in pieces[scored] if p) > 3  # a piece a token, not a chunk's
    for token, logprob, top in zip(done[scored].tokens, done[scored].logprobs, done[scored].top_logprobs):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-5
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_a_request_that_fails_ends_alone(text_family):
    _, _, jx, rows = text_family
    engine = Engine(jx, slots=2, cache_size=64, chunk=4)
    good = engine.submit(Request(tokens=rows[1], max_tokens=6))
    bad = engine.submit(Request(tokens=rows[0], max_tokens=6, pixels=np.zeros((4, 4, 3), np.float32)))
    done = engine.run()
    assert done[bad].finish_reason == "error" and done[bad].error
    assert done[good].tokens == alone(jx, rows[1], 6)


def test_prompts_that_begin_alike_reuse_the_cache_and_change_nothing(text_family):
    """A shared 40-token system prompt, a second turn that begins with the first, the same prompt twice:
    with the prefix cache each runs only its end, and every request's tokens and log-probabilities are
    those without it (gemma2's sliding-window layers take keys from before their window)."""
    _, _, jx, rows = text_family
    system = np.concatenate(hf_models.prompts(9, [40]))
    first = np.concatenate([system, rows[0]])
    prompts = [first, np.concatenate([system, rows[1]]), np.concatenate([first, rows[2], rows[3]]), first,
               rows[4]]
    penalties = [1.0, 1.0, 1.0, 1.3, 1.0]  # a reused prompt's penalty counts all of its tokens
    requests = [Request(tokens=p, max_tokens=8, repetition_penalty=r) for p, r in zip(prompts, penalties)]
    arrivals = [0, 2, 4, 4, 6]
    cached = Engine(jx, slots=2, cache_size=128, chunk=4)
    plain = Engine(jx, slots=2, cache_size=128, chunk=4, prefix_cache_bytes=0)
    got = staggered(cached, requests, arrivals, logprobs=True)
    want = staggered(plain, requests, arrivals, logprobs=True)
    assert [t for t, _ in got] == [t for t, _ in want] == [alone(jx, p, 8, repetition_penalty=r)
                                                           for p, r in zip(prompts, penalties)]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # each runs its last 16 tokens (the bucket of what it does not share): 53 - 16, 57 - 16, 45 - 16
    assert cached.prefix_cache.hits == 3 and cached.prefix_cache.reused == 37 + 41 + 29
    assert plain.prefix_cache is None


def test_the_prefix_cache_keeps_to_its_budget(text_family):
    _, _, jx, rows = text_family
    """Prompts of one bucket (16 tokens): room for two caches keeps the last two."""
    engine = Engine(jx, slots=1, cache_size=64, chunk=4)
    engine.submit(Request(tokens=rows[0], max_tokens=2))
    engine.run()
    size = engine.prefix_cache.nbytes  # one prompt's cache
    engine = Engine(jx, slots=1, cache_size=64, chunk=4, prefix_cache_bytes=2 * size + size // 2)
    for row in rows[:4]:
        engine.submit(Request(tokens=row, max_tokens=2))
        engine.run()
        assert engine.prefix_cache.nbytes <= 2 * size + size // 2
    assert [list(e.tokens) for e in engine.prefix_cache.entries.values()] == [list(r) for r in rows[2:4]]


def test_longrope_factors_are_each_requests_own(convert_and_load):
    """LLaVA-style Phi-3 (LongRoPE, 32 positions on short factors): requests crossing them at different
    steps, beside free slots whose positions run on, each get the tokens of generate alone."""
    jx = convert_and_load(hf_models.build_vlm("llava_phi3", seed=4), "engine-llava")
    rows = hf_models.vlm_prompts("llava_phi3", 1, [5, 9, 7])
    pixels = hf_models.pixels(0, 3)
    ids, mask = hf_models.left_pad(rows)
    ids, mask, _, images = jx._inputs(ids, mask, pixels)
    engine = Engine(jx, slots=4, cache_size=64, chunk=4)
    submitted = []
    for i, keep in enumerate(mask):
        submitted.append(engine.submit(Request(tokens=ids[i][keep], pixels=images.of_row(i), max_tokens=12)))
        engine.step()
    done = engine.run()
    for i, request_id in enumerate(submitted):
        assert len(rows[i]) + 12 > 32
        assert done[request_id].tokens == alone(jx, ids[i][mask[i]], 12, pixel_values=pixels[i:i + 1]), f"row {i}"


def test_text_longrope_requests_run_again_when_they_cross(convert_and_load):
    """Phi-3 text (LongRoPE, 32 positions on short factors): a request that crosses them leaves its slot and
    is prefilled again, whole, with the long factors (as transformers does); arriving at different times,
    two slots for three requests, each crossing at its own step, each gets the tokens of generate alone
    (which `test_parity` holds to transformers' for that row alone)."""
    jx = convert_and_load(hf_models.build("phi3_longrope", seed=3), "engine-longrope")
    rows = hf_models.prompts(5, [20, 14, 26])
    engine = Engine(jx, slots=2, cache_size=128, chunk=4)
    submitted = []
    for row in rows:
        submitted.append(engine.submit(Request(tokens=row, max_tokens=24)))
        engine.step()
    done = engine.run()
    for i, request_id in enumerate(submitted):
        assert len(rows[i]) <= 32 < len(rows[i]) + 23
        assert done[request_id].tokens == alone(jx, rows[i], 24), f"row {i}"


def test_a_request_ending_in_the_chunk_in_flight_hands_its_slot_on(text_family):
    """One slot, chunks of 4: the first request's last tokens (max_tokens 5: its prefill's and one chunk's)
    are in flight at the second step, so the waiting request takes the slot then, not a chunk later."""
    _, _, jx, rows = text_family
    engine = Engine(jx, slots=1, cache_size=64, chunk=4)
    first = engine.submit(Request(tokens=rows[0], max_tokens=5))
    second = engine.submit(Request(tokens=rows[1], max_tokens=6))
    seen = {first: [], second: []}
    for _ in range(2):
        for event in engine.step():
            seen[event.request_id] += event.tokens
    assert len(seen[first]) == 5 and len(seen[second]) == 1
    done = engine.run()
    assert seen[first] == done[first].tokens[:5] and done[first].finish_reason == "length"
    assert done[second].tokens == alone(jx, rows[1], 6) and done[first].tokens == alone(jx, rows[0], 5)
