"""An engine with slots: continuous batching over a running decode batch.

The engine keeps a decode batch of a fixed number of slots on the device. A request (text, or text and
images) is prefilled alone, into a cache of its prompt's bucket, and inserted into a free slot of the running
batch by one jitted, donated call (`insert`); decoding runs in jitted scan chunks over every slot
(`generate.decode`, with each row's own sampling settings and key). A finished request frees its slot, which
the next request takes at the next chunk while the others go on. The host reads each chunk's tokens one chunk
late: it dispatches chunk n + 1 before it reads chunk n, so the device never waits for it.

The cache is circular (`jaxvlm.kv_cache`): a request's prompt is written to end at the shared cursor, in
whichever row is free, and the cursor never runs out. Shapes are fixed by the engine's slots, cache size and
chunk, and by the prompt buckets: after warm-up no mix of requests within the buckets compiles anything.

    engine = Engine(model, slots=8)
    request_id = engine.submit_text("caption en", image="cat.jpg", max_tokens=32)   # or submit(Request(...))
    for event in engine.step(): ...  # new tokens of each request as they come; engine.cancel(request_id)
    outputs = engine.run()  # {request id: Output(tokens, logprobs, finish_reason)} once all have ended
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import checks
from jaxvlm.generate import (DecodeState, cache_bucket, check_finite_tokens, decode, prefill, prompt_bucket,
                             right_align, sampling_rules)
from jaxvlm.kv_cache import KVCache, ring_slots
from jaxvlm.layout import is_stacked
from jaxvlm.sampling import check_sampling_args


@dataclasses.dataclass
class Request:
    """One prompt as the network takes it and how to answer it."""
    tokens: np.ndarray  # int32[T]: the prompt, image placeholders included
    pixels: np.ndarray | None = None  # its images, as the network takes one row's: [H, W, C] or [M, H, W, C]
    prefix: np.ndarray | None = None  # bool[T]: a prefix-LM's bidirectional prefix
    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    min_new_tokens: int = 0


@dataclasses.dataclass
class Output:
    """A request's answer: its tokens (through the end-of-sequence token), their log-probabilities, and why it
    ended ("stop": an end-of-sequence token; "length": max_tokens)."""
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


@dataclasses.dataclass
class Event:
    """What one step brought a request: its new tokens and their log-probabilities, and, on its last, why it
    ended ("stop", "length" or "cancelled")."""
    request_id: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state: DecodeState, prefilled: DecodeState, slot) -> DecodeState:
    """`prefilled` (one request's state after its prefill, batch 1) written into row `slot` of the running
    `state`: its cache entries at the sequence slots that end at the running cursor (each at its slot
    modulo the layer's size), the row's other slots no longer valid; its token, position, step and done."""
    end, inserted = state.cache.end, prefilled.cache.end  # the request's cache holds sequence slots 0 .. inserted-1

    def place(dst, src):  # dst [..., B, Sd, K, H], src [..., 1, Ss, K, H]
        held = ring_slots(inserted, src.shape[-3])  # the request's sequence slot in each entry of src
        index = jnp.mod(end - inserted + held, dst.shape[-3])
        row = jax.lax.dynamic_index_in_dim(dst, slot, axis=dst.ndim - 4, keepdims=False)
        row = row.at[..., index, :, :].set(src[..., 0, :, :, :].astype(dst.dtype))
        return jax.lax.dynamic_update_index_in_dim(dst, row, slot, axis=dst.ndim - 4)

    S = state.cache.size
    valid_row = jnp.zeros((S,), bool).at[jnp.mod(end - inserted + jnp.arange(prefilled.cache.size), S)].set(
        prefilled.cache.valid[0])
    cache = KVCache(k=jax.tree.map(place, state.cache.k, prefilled.cache.k),
                    v=jax.tree.map(place, state.cache.v, prefilled.cache.v), end=end,
                    valid=state.cache.valid.at[slot].set(valid_row))
    row = lambda field: getattr(state, field).at[slot].set(getattr(prefilled, field)[0])
    return DecodeState(cache=cache, token=row("token"), position=row("position"), done=row("done"), step=row("step"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _empty_state(decoder, slots: int, size: int, dtype, stacked: bool) -> DecodeState:
    """Every slot free: nothing valid, done. (Made by one program, so that no two leaves share a buffer: the
    state is donated.)"""
    cache = KVCache.init(decoder, slots, size, dtype, stacked)
    # The cursor starts one round in: a request's prompt, written to end at the cursor, then lies at sequence
    # slots >= 0 (a ring's negative slots mean "never written").
    cache = cache.replace(end=jnp.int32(size))
    return DecodeState(cache=cache, token=jnp.zeros(slots, jnp.int32),
                       position=jnp.zeros(slots, jnp.int32), done=jnp.ones(slots, bool),
                       step=jnp.zeros(slots, jnp.int32))


class Engine:
    """Continuous batching for one model (see the module docstring). `slots` requests decode at once; the
    cache holds `cache_size` slots a row (a request's prompt bucket plus its max_tokens must fit); decoding
    runs `chunk` steps a call."""

    def __init__(self, model, slots: int = 8, cache_size: int | None = None, chunk: int = 8):
        model._require_lm_head()
        if model.shard is not None:
            raise ValueError("the engine runs on one device for now; load the model without mesh=")
        self.model, self.slots, self.chunk = model, checks.integer("slots", slots, 1), checks.integer("chunk", chunk, 1)
        context = model.config.decoder.max_position_embeddings
        self.cache_size = cache_bucket(min(context, 2048) if cache_size is None else
                                       checks.integer("cache_size", cache_size, 1))
        rope = model.config.decoder.rope
        if rope.is_longrope and model.config.vision is None:
            self.context = min(context, rope.original_max_position)  # past it, Phi-3 rebuilds its cache
        else:
            self.context = context
        self.config = model.config.computation
        tokens = model.config.tokens
        self.eos_ids, self.pad_id = set(tokens.eos_ids), tokens.pad_id
        self.rules = sampling_rules(self.slots, tokens.eos_ids, tokens.pad_id)  # each slot's, set on insert
        self.state = _empty_state(self.config.decoder, self.slots, self.cache_size, model.dtype, is_stacked(model.params))
        self.queue: collections.deque[tuple[int, Request]] = collections.deque()
        self.running: dict[int, int] = {}  # slot -> request id
        self.outputs: dict[int, Output] = {}  # of the running requests
        self.limits: dict[int, int] = {}  # their max_tokens
        self.finished: dict[int, Output] = {}  # not yet handed out by `run`
        self._in_flight = None  # (tokens, logprobs, {slot: request id}) of the chunk dispatched last
        self._ids = itertools.count()
        self._events: list[Event] = []

    # --- requests -----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Queues `request`; returns its id. Its settings are checked here."""
        tokens = np.asarray(request.tokens, np.int32)
        if tokens.ndim != 1 or not len(tokens):
            raise ValueError("tokens: a request's prompt must be a non-empty int array [T]")
        checks.integer("max_tokens", request.max_tokens, 1)
        check_sampling_args(request.temperature, request.top_k, request.top_p)
        checks.seed(request.seed)
        checks.integer("min_new_tokens", request.min_new_tokens, 0)
        length = prompt_bucket(len(tokens)) + request.max_tokens
        if len(tokens) + request.max_tokens > self.context:
            raise ValueError(f"the prompt ({len(tokens)} tokens) plus max_tokens={request.max_tokens} is longer than "
                             f"the model's context of {self.context} tokens")
        if length > self.cache_size:
            raise ValueError(f"the prompt's bucket ({prompt_bucket(len(tokens))} tokens) plus max_tokens="
                             f"{request.max_tokens} needs {length} cache slots; the engine has {self.cache_size}")
        request_id = next(self._ids)
        self.queue.append((request_id, dataclasses.replace(request, tokens=tokens)))
        return request_id

    def submit_text(self, prompt: str, image=None, **settings: Any) -> int:
        """`submit` for a plain-text prompt (and its images), laid out by the model's processor."""
        encoded = self.model.processor.encode(prompt, image)
        ids, mask, prefix, pixels = self.model._inputs(*encoded)
        keep = mask[0]
        return self.submit(Request(tokens=ids[0][keep], pixels=None if pixels is None else pixels[0],
                                   prefix=None if prefix is None else prefix[0][keep], **settings))

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running and self._in_flight is None

    # --- the loop -----------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One turn of the loop: requests enter the free slots (their first token, from prefill, is an event
        at once), the next chunk is dispatched, and the previous chunk's tokens are read. Returns the
        events, a request's tokens in order."""
        self._events: list[Event] = []
        self._admit()
        previous, self._in_flight = self._in_flight, None
        if self.running:
            tokens, logprobs = self._dispatch()
            self._in_flight = (tokens, logprobs, dict(self.running))
        if previous is not None:
            self._read(previous)
        return self._events

    def cancel(self, request_id: int) -> bool:
        """Ends a queued or running request now (a client that went away): its slot is free for the next
        request. Returns whether it was still there."""
        for i, (queued, _) in enumerate(self.queue):
            if queued == request_id:
                del self.queue[i]
                return True
        slot = next((s for s, r in self.running.items() if r == request_id), None)
        if slot is None:
            return False
        out = self.outputs.pop(request_id)
        out.finish_reason = "cancelled"
        del self.running[slot], self.limits[request_id]
        self.finished[request_id] = out
        return True

    def run(self) -> dict[int, Output]:
        """Steps until every submitted request has finished; returns them all by id."""
        while not self.idle:
            self.step()
        out, self.finished = self.finished, {}
        return out

    def _admit(self) -> None:
        free = [s for s in range(self.slots) if s not in self.running]
        while free and self.queue:
            request_id, request = self.queue.popleft()
            slot = free.pop(0)
            self._insert(slot, request_id, request)

    def _insert(self, slot: int, request_id: int, request: Request) -> None:
        length = prompt_bucket(len(request.tokens))
        tokens, valid = right_align([request.tokens], length, self.pad_id)
        prefix = None if request.prefix is None else right_align([request.prefix], length, False, bool)[0]
        pixels = None if request.pixels is None else np.asarray(request.pixels, np.float32)[None]
        one = sampling_rules(1, self.model.config.tokens.eos_ids, self.pad_id, temperature=request.temperature,
                             top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                             min_new_tokens=request.min_new_tokens)
        for key, value in one.items():
            if key not in ("eos_ids", "pad_id"):  # the row's settings become the slot's
                self.rules[key][slot] = value[0]
        prefilled, token, logprob = prefill(self.config, self.model.dtype, False, length, None, self.model.params,
                                            tokens, valid, prefix, pixels, np.zeros(1, bool), np.zeros(1, np.int32),
                                            one)
        self.state = insert(self.state, prefilled, np.int32(slot))
        self.running[slot] = request_id
        first, first_logprob = int(np.asarray(token)[0]), float(np.asarray(logprob)[0])
        check_finite_tokens(np.asarray([[first]]), 0)
        self.outputs[request_id] = Output([], [])
        self.limits[request_id] = request.max_tokens
        self._append(slot, request_id, [first], [first_logprob])

    def _dispatch(self):
        rules = {k: np.array(v) for k, v in self.rules.items()}  # a copy: the host changes its own while this runs
        self.state, tokens, logprobs = decode(self.config, self.model.dtype, False, self.chunk, None,
                                              self.model.params, self.state, rules)
        return tokens, logprobs

    def _read(self, chunk) -> None:
        tokens, logprobs, owners = chunk
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for slot, request_id in owners.items():
            if self.running.get(slot) != request_id:  # it ended (or was cancelled) before this chunk was read
                continue
            check_finite_tokens(tokens[slot:slot + 1], len(self.outputs[request_id].tokens))
            self._append(slot, request_id, list(map(int, tokens[slot])), list(map(float, logprobs[slot])))

    def _append(self, slot: int, request_id: int, tokens: list[int], logprobs: list[float]) -> None:
        """Adds a chunk's tokens to a request, up to its end, as an event; a request that ends frees its slot."""
        out = self.outputs[request_id]
        start = len(out.tokens)
        for token, logprob in zip(tokens, logprobs):
            out.tokens.append(token)
            out.logprobs.append(logprob)
            if token in self.eos_ids:
                out.finish_reason = "stop"
            elif len(out.tokens) >= self.limits[request_id]:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                del self.running[slot], self.outputs[request_id], self.limits[request_id]
                self.finished[request_id] = out
                break
        self._events.append(Event(request_id, out.tokens[start:], out.logprobs[start:], out.finish_reason))
