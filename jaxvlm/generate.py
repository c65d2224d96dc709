"""Generation's programs: a jit-compiled prefill, then a jit-compiled `lax.scan` over a pure decode step.

The decode state (cache, last token, positions, done flags, step counter) is a pytree donated to each
scan call. The scan runs in chunks so the host can stop once every row has finished. Prompt lengths and
cache sizes are rounded up to a few buckets so that new prompt lengths rarely trigger a compilation.
`jaxvlm.engine` runs them: every generation, `Model.generate`'s included, goes through it.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvlm import matvec, splash
from jaxvlm.config import ModelConfig
from jaxvlm.kv_cache import KVCache
from jaxvlm.layout import is_stacked
from jaxvlm.inputs import Inputs
from jaxvlm.sampling import sample
from jaxvlm.sharding import MeshRules
from jaxvlm.vlm import VisionLanguageModel

MIN_PROMPT_BUCKET = 16
FINE_BUCKETS_FROM = 128  # past this length, four buckets per doubling rather than one
CACHE_ALIGN = 64
MAX_CHUNK = 32  # decode steps per scan call; the host checks for EOS between calls
EOS_SLOTS = 8


@struct.dataclass
class DecodeState:
    cache: KVCache
    token: jax.Array  # int32[B]: the last chosen token, fed to the next step
    position: jax.Array  # int32[B]: its position
    done: jax.Array  # bool[B]: the row has produced an end-of-sequence token
    step: jax.Array  # int32[B]: tokens each row has chosen so far; folded into its sampling key
    seen: jax.Array | None = None  # bool[B, V]: tokens of the prompt and output (for the repetition penalty)


def prompt_bucket(length: int) -> int:
    """Prompt lengths round up to a power of two (at least 16); past 128, to a quarter of the power of two
    below (320, 384, 448, 512, 640, ...), so padding stays under a quarter of the prompt while buckets
    grow only logarithmically. (A PaliGemma prompt of 256 image tokens and some text lands in 320.)"""
    if length <= FINE_BUCKETS_FROM:
        return max(MIN_PROMPT_BUCKET, 1 << math.ceil(math.log2(length)))
    step = (1 << (math.ceil(math.log2(length)) - 1)) // 4
    return -(-length // step) * step


def cache_bucket(length: int) -> int:
    return -(-length // CACHE_ALIGN) * CACHE_ALIGN


def batch_bucket(size: int, multiple: int = 1) -> int:
    """Batch sizes round up to a power of two up to 8, then to a multiple of 8 (so a new batch size rarely
    compiles again, and padding stays under half), then to a multiple of `multiple` (the devices a mesh
    splits the batch over)."""
    size = max(1, 1 << math.ceil(math.log2(size))) if size <= 8 else -(-size // 8) * 8
    return -(-size // multiple) * multiple


def pad_rows(items, size: int):
    """`items` (a list or an array, batch first) with its last row repeated up to `size` rows; a padded
    row's results are dropped again."""
    if items is None or len(items) == size:
        return items
    extra = size - len(items)
    if isinstance(items, np.ndarray):
        return np.concatenate([items, np.repeat(items[-1:], extra, axis=0)])
    return list(items) + [items[-1]] * extra


NOT_FINITE = -1  # the token a row gets when its logits hold inf or NaN: the host names the row and stops


class NonFiniteLogits(FloatingPointError):
    """The logits of a row became inf or NaN: its weights (or int8 scales) overflow the computation."""


def _choose(penalize: bool, top_n: int, sampling: bool, logits, rules: dict, step, seen):
    """(the next token of each row, its log-probability under the model's logits) int32[B], float32[B]; and
    with `top_n`, the row's `top_n` likeliest tokens (log-probabilities float32[B, n], ids int32[B, n]), else None.

    As transformers' logits processors do, in their order, with each row's own `rules` (arrays [B]): tokens
    already `seen` get the repetition penalty (a logit divided by it, or multiplied where negative) when
    `penalize`; end-of-sequence tokens are barred while the row has chosen fewer than `min_new` (`step`
    int32[B] counts them); then `sample` (temperature, top-k, top-p, from the row's seed and step) where
    `sampling`, else the argmax: a program for greedy rows only leaves the filters and the draw out (a tiny
    Gemma 2's prefill then compiles in 2.1 s rather than 3.5, its decode chunk in 1.8 s rather than 3.8). A row
    whose logits are not all finite gets NOT_FINITE (finite weights can still overflow float32 or
    bfloat16; an argmax over NaN would quietly pick token 0)."""
    logits = logits.astype(jnp.float32)
    raw = logits
    if penalize:
        penalty = rules["penalty"][:, None]
        logits = jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)
    vocab = jnp.arange(logits.shape[-1])
    is_eos = (vocab[:, None] == rules["eos_ids"][None, :]).any(axis=-1)
    logits = jnp.where(is_eos[None] & (step < rules["min_new"])[:, None], -jnp.inf, logits)
    token = sample(logits, rules["seed"], step, rules["temperature"], rules["top_k"], rules["top_p"]) if sampling \
        else jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # log-softmax at the chosen token, by reductions over the vocabulary (a mesh splitting it all-reduces
    # [B] partial sums instead of gathering the logits)
    chosen = jnp.sum(jnp.where(vocab[None] == token[:, None], raw, 0.0), axis=-1)
    norm = jax.nn.logsumexp(raw, axis=-1)
    top = None
    if top_n:
        values, ids = jax.lax.top_k(raw, top_n)
        top = (values - norm[:, None], ids.astype(jnp.int32))
    return jnp.where(jnp.isfinite(raw).all(axis=-1), token, NOT_FINITE), chosen - norm, top


def _mark_seen(seen, token):
    """`seen` with each row's `token` marked (None stays None: no penalty asked)."""
    if seen is None:
        return None
    return seen.at[jnp.arange(seen.shape[0]), token].set(True)


def _finish(token, done, eos_ids, pad_id):
    """Rows already finished emit pad; a row finishes on any end-of-sequence id, or on logits that are
    not finite."""
    token = jnp.where(done, pad_id, token)
    return token, done | jnp.isin(token, eos_ids) | (token == NOT_FINITE)


def check_finite_tokens(tokens: np.ndarray, first_step: int, names: Sequence[str] | None = None) -> None:
    """Raises NonFiniteLogits naming the first row whose chosen tokens [B, n] hold NOT_FINITE (by `names`,
    else "row i")."""
    bad = np.argwhere(tokens == NOT_FINITE)
    if len(bad):
        row, step = map(int, bad[0])
        raise NonFiniteLogits(f"{names[row] if names else f'row {row}'}: the logits for generated token {first_step + step + 1} are not finite "
                              "(inf or NaN): the model's weights or int8 scales overflow the computation; check "
                              "the checkpoint (or try float32)")


def cache_axes(entry) -> tuple[str | None, ...]:
    """The logical names of a cache entry's axes ([..., B, S, K, H]; a stack's leading 'layers')."""
    return ("layers",) * (entry.ndim - 4) + ("batch", None, "kv_heads", "head_dim")


def place_cache(cache: KVCache, shard: MeshRules | None) -> KVCache:
    """The cache split on batch and kv heads over the mesh (a no-op on one device)."""
    if shard is None:
        return cache
    kv = lambda x: shard.constrain(x, cache_axes(x))
    return KVCache(k=jax.tree.map(kv, cache.k), v=jax.tree.map(kv, cache.v), end=cache.end,
                   valid=shard.constrain(cache.valid, ("batch", None)))


def place_state(state: DecodeState, shard: MeshRules | None) -> DecodeState:
    """The decode state laid out as every program that returns it lays it out: the cache as `place_cache`,
    each row's token, position, flags and seen tokens split over the batch (a no-op on one device). So the
    state any of them hands on is one program's input to the next (the partitioner, left to choose, lays
    out an empty state, an inserted one and a decoded one differently: one insert program each)."""
    if shard is None:
        return state
    rows = lambda x: shard.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    return DecodeState(cache=place_cache(state.cache, shard), token=rows(state.token),
                       position=rows(state.position), done=rows(state.done), step=rows(state.step),
                       seen=None if state.seen is None else rows(state.seen))


def _everywhere(x, shard: MeshRules | None):
    """Chosen tokens (a pytree of them), copied to every device so that every host can read them."""
    return x if shard is None else jax.tree.map(lambda a: shard.constrain(a, ()), x)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "penalize", "cache_size", "shard", "top_n", "rings",
                                             "cache_dtype", "sampling"))
def prefill(config: ModelConfig, dtype, penalize: bool, cache_size: int, shard: MeshRules | None, params, tokens,
            valid, prefix, pixels, image_rows, done, step, rules, top_n: int = 0, rings: bool = True, cache_dtype=None,
            sampling: bool = True):
    """Runs right-aligned prompts tokens[B, T] (valid: bool[B, T]) and chooses each row's next token; returns
    the decode state, the tokens int32[B], their log-probabilities float32[B], and with `top_n` the `top_n`
    likeliest tokens of each row (log-probabilities float32[B, n], ids int32[B, n]; else None).

    `pixels` [N, H, W, C] (or None), in the rows `image_rows` int32[N] (see `Inputs`), are encoded here, once;
    `prefix` bool[B, T] (or None) marks the
    tokens that attend to each other in both directions. `shard` places the cache on a mesh. `step` int32[B]
    counts the tokens each row has chosen before (0, or more when a cache is rebuilt). `rules`, arrays so
    that no value compiles anew: per row temperature, top_k (0: none), top_p, penalty, min_new and seed;
    eos_ids and pad_id. `penalize` keeps the [B, V] mask of seen tokens the repetition penalty needs;
    `sampling=False` compiles the choice for greedy rows only (temperature 0 in every row). `rings=False`
    keeps sliding-window layers' caches full length (see `KVCache.init`). `dtype` is the computation's;
    `cache_dtype` the cache's (default: `dtype`).
    """
    B, T = tokens.shape
    inputs = Inputs.build(config, tokens, valid, prefix, pixels, image_rows)
    stacked = is_stacked(params)
    cache = place_cache(KVCache.init(config.decoder, B, cache_size, cache_dtype or dtype, stacked, rings), shard)
    seen = None
    if penalize:  # the prompt's tokens (never its padding)
        seen = jnp.zeros((B, config.decoder.vocab_size), bool).at[jnp.arange(B)[:, None], tokens].max(valid)
    with splash.use(shard):  # the cache is fresh: the prompt's attention may take TPU's splash kernel
        return _start(config, dtype, penalize, shard, params, inputs, cache, done, step, rules, top_n, sampling, seen)


def _start(config: ModelConfig, dtype, penalize: bool, shard, params, inputs: Inputs, cache: KVCache, done, step,
           rules, top_n: int, sampling: bool, seen):
    """Runs `inputs` over `cache` and chooses each row's first token: `prefill`'s results."""
    with matvec.allowed(shard is None):  # the fused CPU kernel has no sharding rule
        out = VisionLanguageModel(config, dtype, scan_layers=is_stacked(params)).apply(
            {"params": params}, inputs, cache, last_only=True)
    token, logprob, top = _choose(penalize, top_n, sampling, out.logits[:, -1], rules, step, seen)
    token, done = _finish(token, done, rules["eos_ids"], rules["pad_id"])
    last = inputs.positions[:, -1]  # (M-RoPE's streams: decoding goes on past the furthest, in all three)
    state = place_state(DecodeState(cache=out.cache, token=token,
                                    position=(last if last.ndim == 1 else last.max(axis=-1)) + 1,
                                    done=done, step=step + 1, seen=_mark_seen(seen, token)), shard)
    return state, *_everywhere((token, logprob, top), shard)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "cache_size", "top_n", "sampling"))
def prefill_after(config: ModelConfig, dtype, cache_size: int, params, held: KVCache, held_first, reused, tokens,
                  seen, rules, top_n: int = 0, shift=0, sampling: bool = True):
    """`prefill` (one row, one device) of a prompt whose first `reused` tokens were run before: their keys
    and values are copied from `held`, a one-row cache of full-length layers in which that earlier prompt's
    token i sits at sequence slot `held_first + i`, and only the prompt's last tokens, `tokens` int32[1, T]
    (no padding), are run. `seen` bool[1, V] marks the whole prompt's tokens (the repetition penalty's). The
    state is laid out as `prefill`'s, in `cache_size` slots with the prompt ending at the last (so
    `reused + T <= cache_size`), every layer full length. `shift`: how far the first position run lies past
    `reused` (M-RoPE: `prefix_cache.position_shift` of the reused images)."""
    T = tokens.shape[1]
    end = cache_size - T
    token_at = jnp.arange(cache_size) - (end - reused)  # the prompt's token each slot holds
    kept = (token_at >= 0) & (token_at < reused)

    def copy(held_kv):  # [..., 1, S_held, K, H] -> [..., 1, cache_size, K, H]
        taken = jnp.take(held_kv, jnp.mod(held_first + jnp.maximum(token_at, 0), held_kv.shape[-3]), axis=-3)
        return jnp.where(kept[:, None, None], taken, 0).astype(held_kv.dtype)

    cache = KVCache(k=jax.tree.map(copy, held.k), v=jax.tree.map(copy, held.v), end=jnp.int32(end), valid=kept[None])
    valid = jnp.ones(tokens.shape, bool)
    inputs = Inputs.build(config, tokens, valid, start=reused + shift)
    return _start(config, dtype, True, None, params, inputs, cache, jnp.zeros(1, bool), jnp.zeros(1, jnp.int32),
                  rules, top_n, sampling, seen)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "penalize", "steps", "shard", "top_n", "sampling"),
                   donate_argnames=("state",))
def decode(config: ModelConfig, dtype, penalize: bool, steps: int, shard: MeshRules | None, params,
           state: DecodeState, rules, top_n: int = 0, sampling: bool = True, run=None):
    """Decode steps in one loop: `run` of them (an int32 scalar, traced: one program serves every count up to
    `steps`; None: `steps`). Returns the new state, the chosen tokens int32[B, steps], their log-probabilities
    float32[B, steps], and with `top_n` the likeliest tokens of each step (float32[B, steps, n], int32[B,
    steps, n]; else None); the entries past `run` are zeros. See `prefill` for `rules`."""
    model = VisionLanguageModel(config, dtype, scan_layers=is_stacked(params))
    B = state.token.shape[0]

    def step(i, carry):
        state, chosen = carry
        with matvec.allowed(shard is None):  # the fused CPU kernel has no sharding rule
            out = model.apply({"params": params}, Inputs.next_tokens(state.token, state.position), state.cache)
        token, logprob, top = _choose(penalize, top_n, sampling, out.logits[:, 0], rules, state.step, state.seen)
        token, done = _finish(token, state.done, rules["eos_ids"], rules["pad_id"])
        state = place_state(DecodeState(cache=out.cache, token=token, position=state.position + 1, done=done,
                                        step=state.step + 1, seen=_mark_seen(state.seen, token)), shard)
        # each step's choices written at its column of the [B, steps, ...] outputs
        chosen = jax.tree.map(lambda all_, x: jax.lax.dynamic_update_index_in_dim(all_, x, i, 1), chosen,
                              (token, logprob, top))
        return state, chosen

    top = None if not top_n else (jnp.zeros((B, steps, top_n), jnp.float32), jnp.zeros((B, steps, top_n), jnp.int32))
    chosen = (jnp.zeros((B, steps), jnp.int32), jnp.zeros((B, steps), jnp.float32), top)
    state, chosen = jax.lax.fori_loop(0, steps if run is None else run, step, (state, chosen))
    return state, *_everywhere(chosen, shard)


def right_align(rows: Sequence[np.ndarray], length: int, pad_id, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads each row to `length`: (tokens [B, length], valid bool[B, length])."""
    tokens = np.full((len(rows), length), pad_id, dtype)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        valid[i, length - len(row):] = True
    return tokens, valid


def sampling_rules(batch: int, eos_ids: Sequence[int], pad_id: int, temperature=0.0, top_k=None, top_p=None,
                   seed=0, repetition_penalty=1.0, min_new_tokens=0) -> dict[str, np.ndarray]:
    """The `rules` of `prefill` and `decode` for `batch` rows: each setting one value for every row or a
    sequence with one per row (None: none, i.e. greedy, no limit); the end-of-sequence ids padded with -1
    (no token) to a multiple of 8, so their count rarely changes a shape. Host values only (numpy), the same
    on every process: jit places them on the mesh."""
    per_row = lambda value, none, dtype: np.asarray(
        [none if v is None else v for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value] * batch)],
        dtype)
    slots = max(1, -(-len(eos_ids) // EOS_SLOTS)) * EOS_SLOTS
    return dict(temperature=per_row(temperature, 0.0, np.float32), top_k=per_row(top_k, 0, np.int32),
                top_p=per_row(top_p, 1.0, np.float32), penalty=per_row(repetition_penalty, 1.0, np.float32),
                min_new=per_row(min_new_tokens, 0, np.int32), seed=per_row(seed, 0, np.uint32),
                eos_ids=np.asarray(list(eos_ids) + [-1] * (slots - len(eos_ids)), np.int32), pad_id=np.int32(pad_id))
