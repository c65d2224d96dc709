"""An engine with slots: continuous batching over a running decode batch.

The engine keeps a decode batch of a fixed number of slots on the device. A request (text, or text and
images) is prefilled alone, into a cache of its prompt's bucket, and inserted into a free slot of the running
batch by one jitted, donated call (`insert`); decoding runs in jitted scan chunks over the slots in use
(`generate.decode`, with each row's own sampling settings and key). A finished request frees its slot, which
the next request takes at the next chunk while the others go on. The host reads each chunk's tokens one chunk
late: it dispatches chunk n + 1 before it reads chunk n, so the device never waits for it. The host also
turns each request's tokens into text as they come (`processor.TextStream`) and ends it at a stop string.

The cache is circular (`jaxvlm.kv_cache`): a request's prompt is written to end at the shared cursor, in
whichever row is free, and the cursor never runs out. A prompt that begins like a recent one takes that
one's keys and values and runs only its end (`jaxvlm.prefix_cache`). Shapes are fixed by the engine's slots
and cache size, and by the prompt buckets: after warm-up no mix of requests within the buckets compiles
anything. A chunk's step count is an argument of the decode program, not a shape: engines of any chunk up
to `MAX_CHUNK` (a server's, `Model.stream`'s, `Model.generate`'s, which fits its chunk to the answers'
length) share one program. A chunk in which no request samples (temperature 0 in all) runs a greedy program
of its own, with no filters and no draw (smaller and quicker to compile), so warm-up means greedy and sampled
requests both; so do a repetition penalty and top log-probabilities, whose chunks keep what they need.

    engine = Engine(model, slots=8)
    request_id = engine.submit_text("caption en", image="cat.jpg", max_tokens=32)   # or submit(Request(...))
    for event in engine.step(): ...  # each request's new tokens and text as they come; engine.cancel(request_id)
    outputs = engine.run()  # {request id: Output(tokens, logprobs, text, ...)} once all have ended
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import checks
from jaxvlm.generate import (MAX_CHUNK, DecodeState, cache_bucket, check_finite_tokens, decode, pad_rows, place_state,
                             prefill, prefill_after, prompt_bucket, right_align, sampling_rules)
from jaxvlm.inputs import Images
from jaxvlm.kv_cache import KVCache, ring_slots
from jaxvlm.layout import is_stacked
from jaxvlm.prefix_cache import PrefixCache, images_digest, position_shift
from jaxvlm.processor import TextStream, check_stop
from jaxvlm.sampling import check_sampling_args
from jaxvlm.sharding import place


MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
DEFAULT_CHUNK = 8  # decode steps a call: few enough that a request waits little to join


@dataclasses.dataclass
class Request:
    """One prompt as the network takes it and how to answer it."""
    tokens: np.ndarray  # int32[T]: the prompt, image placeholders included
    pixels: np.ndarray | None = None  # its images, float[N, H, W, C], in the order of its placeholders
    prefix: np.ndarray | None = None  # bool[T]: a prefix-LM's bidirectional prefix
    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()  # strings that end the answer (the text ends before the first)
    stop_token_ids: Sequence[int] = ()  # tokens that end it too, besides the model's end-of-sequence ids
    top_logprobs: int = 0  # the likeliest tokens to report at each step, with their log-probabilities


@dataclasses.dataclass
class Output:
    """A request's answer: its tokens (through the one that ended it), their log-probabilities (and the
    likeliest tokens at each step, [(id, log-probability)], when asked), its text (ended before a stop
    string), and why it ended ("stop": an end-of-sequence token or stop string; "length": max_tokens;
    "cancelled"; "error", with `error` saying why)."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def add(self, event: "Event") -> None:
        """Appends what `event` brought (its tokens, their scores and text)."""
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        self.top_logprobs += event.top_logprobs
        self.text += event.text


@dataclasses.dataclass
class Event:
    """What one step brought a request: its new tokens, their log-probabilities (and top tokens, when asked),
    the text each adds (`pieces`, one a token, often ""; a character whose bytes span tokens comes whole with
    the last of them), and, on its last, why it ended (see `Output`)."""
    request_id: int
    tokens: list[int]
    logprobs: list[float]
    pieces: list[str]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclasses.dataclass
class _Live:
    """A running request: its settings, its output so far, its text stream (None without a tokenizer), and
    the count of its tokens at which its whole sequence is run again (LongRoPE's switch; else None)."""
    request: Request
    output: Output
    text: TextStream | None
    rerun_at: int | None = None
    phase: int = 0  # times run again: a chunk dispatched before that holds no tokens of it

    @property
    def phase_end(self) -> int:
        """The count of tokens at which this request leaves its slot (ending, or to be run again)."""
        return self.request.max_tokens if self.rerun_at is None else self.rerun_at


def rerun_at(config, length: int, max_tokens: int) -> int | None:
    """For a text-only LongRoPE model, the count of new tokens after which a prompt of `length` tokens
    crosses the model's original length, where transformers' Phi-3 drops its cache and runs the whole
    sequence again with the long factors (and so does the engine); None where it does not cross."""
    rope = config.decoder.rope
    if not rope.is_longrope or config.vision is not None:
        return None
    original = rope.original_max_position
    return original - length + 1 if length <= original < length + max_tokens - 1 else None


def cache_slots(config, length: int, max_tokens: int) -> int:
    """The cache slots a row needs for a prompt of `length` tokens and `max_tokens` new ones: the prompt's
    bucket and the new tokens, or, where it is run again (`rerun_at`), the larger of its two phases'."""
    need = prompt_bucket(length) + max_tokens
    again = rerun_at(config, length, max_tokens)
    return need if again is None else max(need, prompt_bucket(length + again) + max_tokens - again)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state: DecodeState, prefilled: DecodeState, slot) -> DecodeState:
    """`prefilled` (one request's state after its prefill, batch 1) written into row `slot` of the running
    `state`: its cache entries at the sequence slots that end at the running cursor (each at its slot
    modulo the layer's size), the row's other slots no longer valid; its token, position, step and done."""
    end, inserted = state.cache.end, prefilled.cache.end  # the request's cache holds sequence slots 0 .. inserted-1

    def place(dst, src):  # dst [..., B, Sd, K, H], src [..., 1, Ss, K, H]
        held = ring_slots(inserted, src.shape[-3])  # the request's sequence slot in each entry of src
        index = jnp.mod(end - inserted + held, dst.shape[-3])
        # a ring shorter than src (a sliding-window layer) takes src's last slots only
        index = jnp.where(held >= inserted - dst.shape[-3], index, dst.shape[-3])
        row = jax.lax.dynamic_index_in_dim(dst, slot, axis=dst.ndim - 4, keepdims=False)
        row = row.at[..., index, :, :].set(src[..., 0, :, :, :].astype(dst.dtype), mode="drop")
        return jax.lax.dynamic_update_index_in_dim(dst, row, slot, axis=dst.ndim - 4)

    S = state.cache.size
    valid_row = jnp.zeros((S,), bool).at[jnp.mod(end - inserted + jnp.arange(prefilled.cache.size), S)].set(
        prefilled.cache.valid[0])
    cache = KVCache(k=jax.tree.map(place, state.cache.k, prefilled.cache.k),
                    v=jax.tree.map(place, state.cache.v, prefilled.cache.v), end=end,
                    valid=state.cache.valid.at[slot].set(valid_row))
    row = lambda field: getattr(state, field).at[slot].set(getattr(prefilled, field)[0])
    return DecodeState(cache=cache, token=row("token"), position=row("position"), done=row("done"), step=row("step"),
                       seen=row("seen"))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "penalize", "steps", "rows", "shard", "top_n",
                                             "sampling"), donate_argnames=("state",))
def decode_rows(config, dtype, penalize: bool, steps: int, rows: int, shard, params, state: DecodeState, rules,
                top_n: int, sampling: bool = True, run=None):
    """`generate.decode` of the first `rows` rows of `state` (the others kept as they are): `run` steps (traced)
    of at most `steps`."""
    if rows == state.token.shape[0]:
        return decode(config, dtype, penalize, steps, shard, params, state, rules, top_n=top_n, sampling=sampling,
                      run=run)
    batch_axis = lambda x: x.ndim - 4 if x.ndim >= 4 else 0  # cache entries [..., B, S, K, H]; the rest [B, ...]
    rows_of = lambda tree: jax.tree.map(lambda x: x if x.ndim == 0 else jax.lax.slice_in_dim(x, 0, rows,
                                                                                           axis=batch_axis(x)), tree)
    part, tokens, logprobs, top = decode(config, dtype, penalize, steps, None, params, rows_of(state), rules,
                                         top_n=top_n, sampling=sampling, run=run)
    state = jax.tree.map(lambda x, y: y if x.ndim == 0 else jax.lax.dynamic_update_slice_in_dim(x, y, 0, batch_axis(x)),
                         state, part)
    return state, tokens, logprobs, top


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _empty_state(decoder, slots: int, size: int, dtype, stacked: bool, shard) -> DecodeState:
    """Every slot free: nothing valid, done; on `shard`'s mesh, split as decoding splits it. (Made by one
    program, so that no two leaves share a buffer: the state is donated.)"""
    # The cursor starts one round in: a request's prompt, written to end at the cursor, then lies at sequence
    # slots >= 0 (a ring's negative slots mean "never written").
    cache = KVCache.init(decoder, slots, size, dtype, stacked).replace(end=jnp.int32(size))
    return place_state(DecodeState(cache=cache, token=jnp.zeros(slots, jnp.int32),
                                   position=jnp.zeros(slots, jnp.int32), done=jnp.ones(slots, bool),
                                   step=jnp.zeros(slots, jnp.int32), seen=jnp.zeros((slots, decoder.vocab_size), bool)),
                       shard)


class Engine:
    """Continuous batching for one model (see the module docstring). `slots` requests decode at once; the
    cache holds `cache_size` slots a row (a request's prompt bucket plus its max_tokens must fit); decoding
    runs `chunk` steps a call. A request may ask for up to `MAX_TOP_LOGPROBS` top tokens a step; the chunks
    that serve such a request compute them (a second compiled program). Prompts' caches are kept for reuse
    by later prompts that begin alike, up to `prefix_cache_bytes` (0: none; see `jaxvlm.prefix_cache`). A step
    admits requests until their prompts (bucketed) pass `prefill_tokens` (one at least), so that a crowd
    arriving at once neither stalls the running requests nor waits for the last prefill to see its first
    token. `compact`: decode only the slots up to the highest one in use (rounded up to a power of two; a
    program each); else every slot, always (one program). `fail_alone=False`: a request that fails raises
    from `step` (as `Model.generate`'s batch does) rather than ending alone. `overlap=False`: each chunk is read
    as soon as it is done rather than a chunk late, so that no chunk runs past the end of the last request
    (a batch whose rows end at an end-of-sequence token, all submitted at once: `Model.generate`'s case).

    On several hosts (a mesh across processes) every host must submit the same requests in the same order
    and step alike, as `Model.generate` does: the engine's choices depend only on its requests and the
    tokens read, which every host reads alike."""

    def __init__(self, model, slots: int = 8, cache_size: int | None = None, chunk: int = DEFAULT_CHUNK,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, prefill_tokens: int = 512,
                 compact: bool = True, fail_alone: bool = True, overlap: bool = True):
        model._require_lm_head()
        self.model, self.slots, self.chunk = model, checks.integer("slots", slots, 1), checks.integer("chunk", chunk, 1)
        self._most_steps = max(self.chunk, MAX_CHUNK)  # the decode program's: any chunk up to it is the same one
        self.shard = model.shard
        self.prefill_tokens = checks.integer("prefill_tokens", prefill_tokens, 1)
        self.compact, self.fail_alone = checks.flag("compact", compact), checks.flag("fail_alone", fail_alone)
        self.overlap = checks.flag("overlap", overlap)
        if self.shard is not None:
            if slots % self.shard.batch_multiple:
                raise ValueError(f"slots={slots}: the mesh splits the batch over {self.shard.batch_multiple} "
                                 "devices; give a multiple of that")
            prefix_cache_bytes = 0  # prefill_after runs on one device

        self.context = model.config.decoder.max_position_embeddings
        self.cache_size = cache_bucket(min(self.context, 2048) if cache_size is None else
                                       checks.integer("cache_size", cache_size, 1))
        rope = model.config.decoder.rope
        # A LongRoPE model's prompts past its original length run with the long factors: their caches are
        # kept and reused only for prompts within it, all of whose keys have the short ones.
        self.short_factors_up_to = rope.original_max_position if rope.is_longrope else None
        self.config = model.config.computation
        if rope.is_longrope:  # each request its own LongRoPE factors, as alone, whatever shares the batch
            decoder = self.config.decoder
            self.config = dataclasses.replace(self.config, decoder=dataclasses.replace(
                decoder, rope=dataclasses.replace(rope, per_row=True)))
        tokens = model.config.tokens
        self.eos_ids, self.pad_id = set(tokens.eos_ids), tokens.pad_id
        self.rules = sampling_rules(self.slots, tokens.eos_ids, tokens.pad_id)  # each slot's, set on insert
        self.state = _empty_state(self.config.decoder, self.slots, self.cache_size, model.cache_dtype,
                                  is_stacked(model.params), self.shard)
        if self.shard is None:
            # Committed to the params' device, as the state that inserts and decodes return is: XLA compiles
            # uncommitted and committed inputs as two programs (the first insert would compile twice). Params
            # given as numpy arrays live nowhere yet: jax's default device, where the programs will run.
            leaf = jax.tree.leaves(model.params)[0]
            self.state = jax.device_put(self.state, leaf.sharding if isinstance(leaf, jax.Array) else jax.devices()[0])
        self.prefix_cache_bytes = checks.integer("prefix_cache_bytes", prefix_cache_bytes, 0)
        image_token = None if model.config.vision is None else model.config.image_token_id
        self.prefix_cache = PrefixCache(prefix_cache_bytes, image_token) if prefix_cache_bytes else None
        self.queue: collections.deque[tuple[int, Request]] = collections.deque()
        self.running: dict[int, int] = {}  # slot -> request id
        self.live: dict[int, _Live] = {}  # the running requests, by id
        self.finished: dict[int, Output] = {}  # not yet handed out by `run`
        # (tokens, logprobs, top, {slot: (request id, its phase)}) of the chunk dispatched last
        self._in_flight = None
        self._ids = itertools.count()
        self._events: list[Event] = []

    # --- requests -----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Queues `request` (checked by `check`); returns its id."""
        request = self.check(request)
        request_id = next(self._ids)
        self.queue.append((request_id, request))
        return request_id

    def check(self, request: Request) -> Request:
        """`request` with its settings checked (a ValueError names the first that cannot be served) and its
        arrays made. Reads nothing that changes: any thread may call it while another steps the engine."""
        tokens = np.asarray(request.tokens, np.int32)
        if tokens.ndim != 1 or not len(tokens):
            raise ValueError("tokens: a request's prompt must be a non-empty int array [T]")
        checks.integer("max_tokens", request.max_tokens, 1)
        check_sampling_args(request.temperature, request.top_k, request.top_p, request.repetition_penalty)
        checks.seed(request.seed)
        checks.integer("min_new_tokens", request.min_new_tokens, 0)
        stop = check_stop(request.stop)
        if stop and self.model.tokenizer is None:
            raise ValueError("stop: stop strings need the model's tokenizer, and this model has none")
        stop_ids = [checks.integer("stop_token_ids", i, 0) for i in request.stop_token_ids]
        top = checks.integer("top_logprobs", request.top_logprobs, 0)
        if top > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}")
        if len(tokens) + request.max_tokens > self.context:
            raise ValueError(f"the prompt ({len(tokens)} tokens) plus max_tokens={request.max_tokens} is longer than "
                             f"the model's context of {self.context} tokens")
        need = cache_slots(self.model.config, len(tokens), request.max_tokens)
        if need > self.cache_size:
            raise ValueError(f"the prompt ({len(tokens)} tokens, bucket {prompt_bucket(len(tokens))}) plus max_tokens="
                             f"{request.max_tokens} needs {need} cache slots; the engine has {self.cache_size}")
        return dataclasses.replace(request, tokens=tokens, stop=stop, stop_token_ids=stop_ids)

    def submit_text(self, prompt: str, image=None, add_bos: bool | None = None, **settings: Any) -> int:
        """`submit` for a plain-text prompt (and its images), laid out by the model's processor."""
        return self.submit(self.request(prompt, image, add_bos, **settings))

    def request(self, prompt: str, image=None, add_bos: bool | None = None, **settings: Any) -> Request:
        """`Model.request`: the `Request` for a plain-text prompt (and its images)."""
        return self.model.request(prompt, image, add_bos, **settings)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running and self._in_flight is None

    # --- the loop -----------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One turn of the loop: requests enter the free slots (their first token, from prefill, is an event
        at once), the next chunk is dispatched, and the previous chunk's tokens are read. Returns the
        events, a request's tokens in order. A request that fails (its prefill, or logits that are not
        finite) ends alone, with finish_reason "error"."""
        self._events: list[Event] = []
        self._admit()
        previous, self._in_flight = self._in_flight, None
        if self.running:
            self._in_flight = (*self._dispatch(), {s: (r, self.live[r].phase) for s, r in self.running.items()})
        if previous is not None:
            self._read(previous)
        if not self.overlap and self._in_flight is not None:
            current, self._in_flight = self._in_flight, None
            self._read(current)
        return self._events

    def cancel(self, request_id: int) -> bool:
        """Ends a queued or running request now (a client that went away): its slot is free for the next
        request. Returns whether it was still there."""
        for i, (queued, _) in enumerate(self.queue):
            if queued == request_id:
                del self.queue[i]
                if request_id in self.live:  # waiting to be run again (`rerun_at`)
                    self._end(request_id, "cancelled")
                return True
        if request_id not in self.live:
            return False
        self._end(request_id, "cancelled")
        return True

    def run(self) -> dict[int, Output]:
        """Steps until every submitted request has finished; returns them all by id."""
        while not self.idle:
            self.step()
        out, self.finished = self.finished, {}
        return out

    def decode_program(self, sampling: bool = True, penalize: bool = False) -> str:
        """The optimised program (XLA's HLO text) of a decode chunk over every slot, as a batch with a sampled
        row runs it (`sampling=False`: a greedy batch's; `penalize`: with a repetition penalty): where a
        sharded model's collectives, or a stacked model's copies, show."""
        return decode_rows.lower(self.config, self.model.dtype, penalize, self._most_steps, self.slots, self.shard,
                                 self.model.params, self.state, self.rules, 0, sampling,
                                 run=np.int32(self.chunk)).compile().as_text()

    def _admit(self) -> None:
        if self._in_flight is not None:
            # A request whose last tokens are all in the chunk in flight (its max_tokens) gives up its slot now:
            # the device runs that chunk before the next insert, its tokens are read as any other's, and no
            # chunk is run for it past its end.
            in_flight = self._in_flight[-1]
            for slot, request_id in list(self.running.items()):
                live = self.live[request_id]
                if in_flight.get(slot) == (request_id, live.phase) and \
                        len(live.output.tokens) + self.chunk >= live.phase_end:
                    del self.running[slot]
        free = [s for s in range(self.slots) if s not in self.running]
        admitted = 0  # prompt tokens prefilled this step
        while free and self.queue and (not admitted or admitted + prompt_bucket(len(self.queue[0][1].tokens))
                                       <= self.prefill_tokens):
            request_id, request = self.queue.popleft()
            admitted += prompt_bucket(len(request.tokens))
            slot = free[0]
            try:
                self._insert(slot, request_id, request)
            except Exception as e:  # noqa: BLE001 - the request fails alone; the others go on
                if not self.fail_alone:
                    raise
                self.live.pop(request_id, None)
                self.running.pop(slot, None)
                self.finished[request_id] = Output(finish_reason="error", error=str(e))
                self._events.append(Event(request_id, [], [], [], [], "error", str(e)))
                continue
            free.pop(0)

    def _insert(self, slot: int, request_id: int, request: Request) -> None:
        """Prefills `request` (or, for a request that is run again, its sequence so far) into `slot`."""
        again = self.live.get(request_id)  # (its tokens so far count as steps taken)
        length = prompt_bucket(len(request.tokens))
        tokens, valid = right_align([request.tokens], length, self.pad_id)
        prefix = None if request.prefix is None else right_align([request.prefix], length, False, bool)[0]
        one = sampling_rules(1, self.model.config.tokens.eos_ids, self.pad_id, temperature=request.temperature,
                             top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                             min_new_tokens=request.min_new_tokens, repetition_penalty=request.repetition_penalty)
        top_n = MAX_TOP_LOGPROBS if request.top_logprobs else 0
        images = images_digest(request.pixels)
        reuse = self._reusable(request, images)
        steps = 0 if again is None else len(again.output.tokens)
        if reuse is not None:
            entry, reused = reuse
            seen = np.zeros((1, self.config.decoder.vocab_size), bool)
            seen[0, request.tokens[(request.tokens >= 0) & (request.tokens < seen.shape[1])]] = True
            prefilled, token, logprob, top = prefill_after(
                self.config, self.model.dtype, length, self.model.params, entry.cache, np.int32(entry.first),
                np.int32(reused), request.tokens[None, reused:], seen, one, top_n=top_n,
                shift=np.int32(position_shift(request.pixels, self.config)), sampling=bool(request.temperature > 0))
            self.prefix_cache.use(entry, reused)
        else:
            # on a mesh the batch is padded to the devices it is split over (copies of the row, then dropped)
            rows = 1 if self.shard is None else self.shard.batch_multiple
            put = lambda x: place(self.shard, pad_rows(x, rows))
            pixels, image_rows = (None, None) if request.pixels is None else \
                Images.of_rows([request.pixels] * rows).bucketed(self.config.vision)
            prefilled, token, logprob, top = prefill(  # (penalize: its `seen` row, the repetition penalty's)
                self.config, self.model.dtype, True, length, self.shard, self.model.params, put(tokens), put(valid),
                put(prefix), place(self.shard, pixels), place(self.shard, image_rows), put(np.zeros(1, bool)),
                np.full(rows, steps, np.int32),
                {k: v if k in ("eos_ids", "pad_id") else pad_rows(v, rows) for k, v in one.items()}, top_n=top_n,
                rings=self.prefix_cache is None, cache_dtype=self.model.cache_dtype,
                sampling=bool(request.temperature > 0))
        if self._cacheable(request):
            self.prefix_cache.add(request.tokens, images, prefilled.cache, length - len(request.tokens))
        check_finite_tokens(np.asarray(token)[:1, None], steps, names=[self._name(request_id)])
        for key, value in one.items():
            if key not in ("eos_ids", "pad_id"):  # the row's settings become the slot's
                self.rules[key][slot] = value[0]
        self.state = insert(self.state, prefilled, np.int32(slot))
        self.running[slot] = request_id
        if again is None:
            tokenizer = self.model.tokenizer
            self.live[request_id] = _Live(request, Output(),
                                          None if tokenizer is None else TextStream(tokenizer, request.stop),
                                          rerun_at(self.model.config, len(request.tokens), request.max_tokens))
        top = None if top is None else tuple(np.asarray(x)[:, None] for x in top)
        self._append(request_id, np.asarray(token)[:1], np.asarray(logprob)[:1], top and (top[0][0], top[1][0]))

    def _reusable(self, request: Request, images: str | None):
        """(the kept entry, how many of the prompt's first tokens to take from it) where one serves, else
        None. The prompt's end that is run is a bucket's length, so that few programs serve every reuse."""
        if not self._cacheable(request):
            return None
        tokens = request.tokens
        entry, shared = self.prefix_cache.longest(tokens, images)
        reused = len(tokens) - prompt_bucket(len(tokens) - shared)
        if entry is None or reused <= 0:
            return None
        if self.prefix_cache.image_token is not None and (tokens[reused:] == self.prefix_cache.image_token).any():
            return None  # an image in the end that is run: its pixels would be needed
        return entry, reused

    def _dispatch(self):
        # Only the first rows up to the highest running slot are decoded, rounded up to a power of two (requests
        # take the lowest free slot): few requests decode at the cost of few rows.
        rows = min(self.slots, 1 << max(self.running).bit_length())
        if self.shard is not None or not self.compact:  # on a mesh, a part of the rows would move between devices
            rows = self.slots
        rules = {k: v if k in ("eos_ids", "pad_id") else np.array(v[:rows]) for k, v in self.rules.items()}
        running = [self.live[r].request for r in self.running.values()]
        top_n = MAX_TOP_LOGPROBS if any(r.top_logprobs for r in running) else 0
        penalize = any(r.repetition_penalty != 1 for r in running)
        sampling = any(r.temperature > 0 for r in running)  # else the greedy program: no filters, no draw
        self.state, tokens, logprobs, top = decode_rows(self.config, self.model.dtype, penalize, self._most_steps,
                                                        rows, self.shard, self.model.params, self.state, rules, top_n,
                                                        sampling, run=np.int32(self.chunk))
        return tokens, logprobs, top

    def _read(self, chunk) -> None:
        tokens, logprobs, top, owners = chunk  # (the columns past the chunk's steps are not its tokens)
        tokens, logprobs = np.asarray(tokens)[:, :self.chunk], np.asarray(logprobs)[:, :self.chunk]
        top = None if top is None else tuple(np.asarray(x)[:, :self.chunk] for x in top)
        for slot, (request_id, phase) in owners.items():
            if request_id not in self.live or self.live[request_id].phase != phase:
                continue  # it ended (or was cancelled, or left to be run again) before this chunk was read
            try:
                check_finite_tokens(tokens[slot:slot + 1], len(self.live[request_id].output.tokens),
                                    names=[self._name(request_id)])
            except FloatingPointError as e:
                if not self.fail_alone:
                    raise
                self._end(request_id, "error", str(e))
                continue
            self._append(request_id, tokens[slot], logprobs[slot], top and (top[0][slot], top[1][slot]))

    def _append(self, request_id: int, tokens, logprobs, top) -> None:
        """Adds a chunk's tokens to a request, up to its end, as an event; a request that ends frees its slot."""
        live = self.live[request_id]
        request, out = live.request, live.output
        event = Event(request_id, [], [], [], [])
        for i, (token, logprob) in enumerate(zip(map(int, tokens), map(float, logprobs))):
            event.tokens.append(token)
            event.logprobs.append(logprob)
            if request.top_logprobs:
                n = request.top_logprobs
                event.top_logprobs.append(list(zip(map(int, top[1][i][:n]), map(float, top[0][i][:n]))))
            event.pieces.append("" if live.text is None else live.text.add([token]))
            if (live.text is not None and live.text.stopped) or token in self.eos_ids \
                    or token in request.stop_token_ids:
                event.finish_reason = "stop"
            elif len(out.tokens) + len(event.tokens) >= request.max_tokens:
                event.finish_reason = "length"
            if event.finish_reason is not None or len(out.tokens) + len(event.tokens) == live.rerun_at:
                break
        out.add(event)
        if event.finish_reason is not None:
            self._end(request_id, event.finish_reason, event=event)
            return
        self._events.append(event)
        if len(out.tokens) == live.rerun_at:
            self._run_again(request_id)

    def _run_again(self, request_id: int) -> None:
        """Leaves the slot of a request that crosses its LongRoPE model's original length, and queues it first
        to be prefilled again, whole (prompt and tokens so far), with the long factors, as transformers'
        Phi-3 does (`rerun_at`)."""
        live = self.live[request_id]
        live.rerun_at, live.phase = None, live.phase + 1
        slot = next((s for s, r in self.running.items() if r == request_id), None)
        if slot is not None:
            del self.running[slot]
        request, so_far = live.request, np.asarray(live.output.tokens, np.int32)
        prefix = None if request.prefix is None else np.concatenate([request.prefix, np.zeros(len(so_far), bool)])
        self.queue.appendleft((request_id, dataclasses.replace(
            request, tokens=np.concatenate([request.tokens, so_far]), prefix=prefix,
            max_tokens=request.max_tokens - len(so_far))))

    def _cacheable(self, request: Request) -> bool:
        """Whether the prefix cache may keep or serve `request`'s prompt (not a prefix-LM's, nor one whose
        LongRoPE factors are the long ones)."""
        return self.prefix_cache is not None and request.prefix is None and (
            self.short_factors_up_to is None or len(request.tokens) <= self.short_factors_up_to)

    def _name(self, request_id: int) -> str:
        """How an error names a request: generate's requests are its rows, in order."""
        return "the request" if self.fail_alone else f"row {request_id}"

    def _end(self, request_id: int, reason: str, error: str | None = None, event: Event | None = None) -> None:
        """Ends a running request: its slot is free; the event (or an empty one) says why."""
        live = self.live.pop(request_id)
        slot = next((s for s, r in self.running.items() if r == request_id), None)
        if slot is not None:  # (None: it gave up its slot to the next request, its last chunk in flight)
            del self.running[slot]
        event = event or Event(request_id, [], [], [], [])
        event.finish_reason, event.error = reason, error
        if live.text is not None and reason in ("stop", "length"):  # text held back for a stop string that never came
            rest = live.text.finish()
            if rest:
                event.pieces[-1:] = [(event.pieces[-1] if event.pieces else "") + rest]
                live.output.text += rest
        live.output.finish_reason, live.output.error = reason, error
        self.finished[request_id] = live.output
        self._events.append(event)
