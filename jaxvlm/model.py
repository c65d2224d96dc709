"""The user-facing model: a config, its params and its tokenizer, with logits, generation and image encoding."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import checkpoint, checks, compile_cache, files, lora, matvec, memory
from jaxvlm.chat import images_in, plain_prompt
from jaxvlm.config import QUANTIZE_MODES, ModelConfig
from jaxvlm.engine import Engine, Output, Request, cache_slots
from jaxvlm.generate import MAX_CHUNK, batch_bucket, cache_bucket, pad_rows, prompt_bucket
from jaxvlm.inputs import Images, Inputs
from jaxvlm.patches import PatchImages
from jaxvlm.kv_cache import KVCache
from jaxvlm.layout import STACKED, is_stacked
from jaxvlm.processor import Encoded, Processor, check_stop, require_decoder, require_vision
from jaxvlm.sampling import check_sampling_args
from jaxvlm.sharding import MeshRules, Rules, check_distributed, mesh_rules, place
from jaxvlm.tokenizer import Tokenizer
from jaxvlm.vlm import VisionLanguageModel

log = logging.getLogger("jaxvlm")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _everywhere(tree, shard: MeshRules | None):
    """Outputs copied to every device, so that every host reads them as plain numpy."""
    return tree if shard is None else jax.tree.map(lambda x: shard.constrain(x, ()), tree)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "shard", "inspect"))
def _forward(config, dtype, shard, params, tokens, valid, prefix, pixels, image_rows, inspect: bool = False):
    """Logits (or a head's); with `inspect`, also the decoder's hidden states [L + 1, B, T, D] (as transformers
    lists them: the embeddings, each layer's output, the last one after the final norm) and attention
    weights [L, B, N, T, T]."""
    inputs = Inputs.build(config, tokens, valid, prefix, pixels, image_rows)
    model = VisionLanguageModel(config, dtype, scan_layers=is_stacked(params))
    with matvec.allowed(shard is None):
        if config.head is not None:
            out = model.apply({"params": params}, inputs, method="classify")
        elif inspect:
            out, kept = model.apply({"params": params}, inputs, mutable=["intermediates"])
            out = (out.logits, *_inspected(kept["intermediates"]["decoder"], config.decoder.depth))
        else:
            out = model.apply({"params": params}, inputs).logits
    return _everywhere(out, shard)


def _inspected(kept: dict, depth: int) -> tuple[jax.Array, jax.Array]:
    """(hidden states [L + 1, B, T, D], attention weights [L, B, N, T, S]) from the decoder's sown values:
    unrolled layers `layer_i`, or one stack whose values carry the layer axis first."""
    if STACKED in kept:
        outputs, weights = kept[STACKED]["output"][0], kept[STACKED]["attn"]["attention"][0]
    else:
        outputs = jnp.stack([kept[f"layer_{i}"]["output"][0] for i in range(depth)])
        weights = jnp.stack([kept[f"layer_{i}"]["attn"]["attention"][0] for i in range(depth)])
    hidden = jnp.concatenate([kept["embeddings"][0][None], outputs[:-1], kept["final"][0][None]])
    L, B, K, G, T, S = weights.shape
    return hidden.astype(jnp.float32), weights.reshape(L, B, K * G, T, S).astype(jnp.float32)


_VISION_OUTPUTS = {
    "features": lambda m, x: m.encode_image(x),
    "output": lambda m, x: m.vision(x),
    "pooled": lambda m, x: m.vision.pooled(x),
    "hidden_states": lambda m, x: m.vision.hidden_states(x),
}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "output", "shard"))
def _vision(config, dtype, output, shard, params, pixels):
    model = VisionLanguageModel(config, dtype, scan_layers=is_stacked(params))
    with matvec.allowed(shard is None):
        out = model.apply({"params": params}, pixels, method=_VISION_OUTPUTS[output])
    return _everywhere(out, shard)


class Model:
    """A loaded model: its config, params (on one device, or laid out on a mesh by `shard`, a `MeshRules`;
    None on one device), its `processor` (tokenizer, prompt format, image processing, chat template), the
    compute dtype `dtype` (the params' own may differ: they are cast where used) and the KV cache's. It checks arguments and delegates: the network is `VisionLanguageModel`,
    generation `jaxvlm.generate`, text and images `jaxvlm.processor.Processor`."""

    def __init__(self, config: ModelConfig, params, tokenizer: Tokenizer | None = None, dtype=jnp.float32,
                 shard: MeshRules | None = None, cache_dtype=None):
        self.config, self.params, self.dtype, self.shard = config, params, dtype, shard
        self.cache_dtype = dtype if cache_dtype is None else cache_dtype  # the KV cache's
        self.processor = Processor(config, tokenizer)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.processor.tokenizer

    def _pad_batch(self, *arrays: np.ndarray | None) -> tuple[np.ndarray | None, ...]:
        """Rows repeated at the end up to a multiple of the devices the batch is split over. (Generation
        pads to the batch's bucket, `generate.batch_bucket`; a forward keeps its rows, so that a row's
        logits are computed as in a batch of the same size.)"""
        if self.shard is None:
            return arrays
        B = len(next(a for a in arrays if a is not None))
        return tuple(pad_rows(a, -(-B // self.shard.batch_multiple) * self.shard.batch_multiple) for a in arrays)

    def __repr__(self):
        parts = []
        if (v := self.config.vision) is not None:
            parts.append(f"vision=(image={v.image_size}, patch={v.patch_size}, width={v.width}, depth={v.depth})")
        if (d := self.config.decoder) is not None:
            parts.append(f"width={d.width}, depth={d.depth}, heads={d.num_heads}/{d.num_kv_heads}, "
                         f"vocab={d.vocab_size}")
        cache = "" if self.cache_dtype == self.dtype else f", cache_dtype={jnp.dtype(self.cache_dtype).name}"
        return f"Model({', '.join(parts)}, dtype={jnp.dtype(self.dtype).name}{cache})"

    # --- inputs -------------------------------------------------------------------------------------------
    def _require_decoder(self) -> None:
        require_decoder(self.config)

    def _require_lm_head(self) -> None:
        self._require_decoder()
        if self.config.head is not None:
            raise ValueError(f"this model has a {self.config.head.kind} head instead of a language-model head; "
                             "use classify")

    def _require_vision(self, argument: str) -> None:
        require_vision(self.config, argument)

    # --- the processor's (host-side: text and images) -----------------------------------------------------
    def preprocess(self, images: Any | Sequence[Any]) -> np.ndarray:
        """`Processor.preprocess`: images -> pixel_values float32[N, H, W, 3]."""
        return self.processor.preprocess(images)

    def encode(self, prompt_or_prompts: str | Sequence[str], image=None) -> Encoded:
        """`Processor.encode`: plain-text prompts (and images) -> `Encoded(input_ids, attention_mask,
        pixel_values)`, which go to `logits`, `generate_ids` and `classify` as they are:
        `model.logits(*model.encode("caption en", image="cat.jpg"))`."""
        return self.processor.encode(prompt_or_prompts, image)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None,
                            **variables: Any) -> str:
        """`Processor.apply_chat_template`: a conversation's prompt text, as transformers renders it."""
        return self.processor.apply_chat_template(messages, add_generation_prompt, tools, documents, **variables)

    def _inputs(self, input_ids, attention_mask, pixel_values=None, token_type_ids=None, image_grid_thw=None):
        """Validated (ids int[B, T], mask bool[B, T], prefix bool[B, T] or None, `Images` or None)."""
        self._require_decoder()
        ids = _array("input_ids", input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
        if ids.size == 0:
            raise ValueError(f"input_ids is empty (shape {list(ids.shape)})")
        mask = np.ones(ids.shape, bool) if attention_mask is None else _array("attention_mask", attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
            raise ValueError(f"attention_mask must hold booleans or 0/1 integers, got {mask.dtype}")
        mask = mask.astype(bool)
        vocab, image_id = self.config.decoder.vocab_size, self.config.image_token_id
        several = self.config.max_images > 1
        any_size = self.config.vision is not None and self.config.vision.image_size is None
        if any_size:
            pixels = None if pixel_values is None else self._patch_images(pixel_values, image_grid_thw)
        else:
            if image_grid_thw is not None:
                raise ValueError("image_grid_thw: this model takes images of one size (pixel_values [B, H, W, 3]), "
                                 "not patch grids")
            pixels = None if pixel_values is None else self._pixels(pixel_values, batch=None if several else len(ids))
        counts = []  # images per row
        for i, (row, keep) in enumerate(zip(ids, mask)):
            if not keep.any():
                raise ValueError(f"input_ids row {i} has no tokens under attention_mask")
            real = row[keep]
            images = int((real == image_id).sum()) if image_id is not None else 0
            text = real[real != image_id] if images else real
            if text.size and (text.min() < 0 or text.max() >= vocab):
                raise ValueError(f"input_ids row {i} holds token ids outside [0, {vocab})")
            if pixels is None and images:
                raise ValueError(f"input_ids row {i} holds {images} image tokens but no pixel_values were given")
            if pixels is not None and any_size:
                counts.append(self._sized_images_in_row(i, images, pixels, sum(counts)))
            elif pixels is not None:
                counts.append(self._images_in_row(i, images))
        if pixels is not None:
            if len(pixels) != sum(counts):
                raise ValueError(f"pixel_values hold {len(pixels)} images; the rows' image tokens ask for "
                                 f"{sum(counts)}")
            pixels = Images(pixels, np.repeat(np.arange(len(counts), dtype=np.int32), counts))
        if token_type_ids is not None and not (self.config.prefix_lm or self.config.image_blocks):
            raise ValueError("token_type_ids mark a prefix-LM's prefix; this model has none")
        types = None if token_type_ids is None else _token_types(token_type_ids, ids.shape)
        prefix = None
        if self.config.prefix_lm:
            prefix = mask.copy() if types is None else mask & (types == 0)
        elif types is not None and ((types == 1) != (ids == image_id))[mask].any():
            raise ValueError("token_type_ids must be 1 exactly at the image tokens (the processor's)")
        return ids, mask, prefix, pixels

    def _images_in_row(self, row: int, image_tokens: int) -> int:
        """The images whose tokens input_ids row `row` holds: one, or up to `max_images`, of P tokens each."""
        P, most = self.config.tokens_per_image, self.config.max_images
        if most == 1:
            if image_tokens != P:
                raise ValueError(f"input_ids row {row} holds {image_tokens} image tokens; its image needs exactly {P}")
            return 1
        if image_tokens % P:
            raise ValueError(f"input_ids row {row} holds {image_tokens} image tokens, not a whole number of "
                             f"images of {P}")
        if image_tokens // P > most:
            raise ValueError(f"input_ids row {row} holds {image_tokens // P} images; this model takes at most "
                             f"{most} per prompt (max_images)")
        return image_tokens // P

    def _sized_images_in_row(self, row: int, image_tokens: int, images: PatchImages, first: int) -> int:
        """The images (from the `first` not taken by earlier rows) whose tokens input_ids row `row` holds,
        each image as many as its merged squares of patches."""
        sizes = images.tokens(self.config.vision.merge_size)[first:]
        taken = np.cumsum(sizes)
        n = int(np.searchsorted(taken, image_tokens, side="right"))
        if image_tokens and (n == 0 or taken[n - 1] != image_tokens):
            raise ValueError(f"input_ids row {row} holds {image_tokens} image tokens; the next images of "
                             f"image_grid_thw fill {', '.join(map(str, taken[:n + 1]))} (one token a merged square "
                             "of patches)")
        return n

    def _patch_images(self, pixel_values, image_grid_thw) -> PatchImages:
        """Images of any size as Qwen-VL's processor gives them: patches float[n, patch_dim] and each image's
        grid of patches int[N, 3] (frames, rows, columns)."""
        v = self.config.vision
        if isinstance(pixel_values, PatchImages) and image_grid_thw is None:  # (as the processor gives them)
            pixel_values, image_grid_thw = pixel_values.values, pixel_values.grids
        values = _array("pixel_values", pixel_values)
        if image_grid_thw is None:
            raise ValueError("image_grid_thw: images of any size need each image's grid of patches (the "
                             "processor's image_grid_thw) beside their pixel_values")
        grids = _array("image_grid_thw", image_grid_thw)
        if values.ndim != 2 or values.shape[1] != v.patch_dim or not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"pixel_values must be float patches [n, {v.patch_dim}] (the processor's), got "
                             f"{values.dtype} {list(values.shape)}")
        if grids.ndim != 2 or grids.shape[1] != 3 or not np.issubdtype(grids.dtype, np.integer) or not len(grids):
            raise ValueError(f"image_grid_thw must be int [N, 3] (frames, rows, columns), got {grids.dtype} "
                             f"{list(grids.shape)}")
        m = v.merge_size
        for i, (t, h, w) in enumerate(grids.tolist()):
            if t != 1 or h <= 0 or w <= 0 or h % m or w % m:
                raise ValueError(f"image_grid_thw: image {i} has a grid of {t}x{h}x{w} patches; an image is one "
                                 f"frame of whole {m}x{m} squares")
        if grids.prod(axis=1).sum() != len(values):
            raise ValueError(f"pixel_values hold {len(values)} patches; image_grid_thw's grids hold "
                             f"{int(grids.prod(axis=1).sum())}")
        if not np.isfinite(values).all():
            raise ValueError("pixel_values hold NaN or infinite values")
        return PatchImages(values.astype(np.float32), grids.astype(np.int32))

    def _pixels(self, pixel_values, batch: int | None = None) -> np.ndarray:
        self._require_vision("pixel_values")
        pixels = _array("pixel_values", pixel_values)
        size = self.config.vision.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3) or not np.issubdtype(pixels.dtype, np.floating):
            raise ValueError(f"pixel_values must be float [B, {size}, {size}, 3], got {pixels.dtype} "
                             f"{list(pixels.shape)} (use model.preprocess for images)")
        if not len(pixels):
            raise ValueError("pixel_values hold no images")
        finite = np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
        if not finite.all():
            raise ValueError(f"pixel_values: image {int(np.argmin(finite))} holds NaN or infinite values")
        if batch is not None and len(pixels) != batch:
            raise ValueError(f"pixel_values hold {len(pixels)} images for {batch} rows of input_ids; "
                             "one image per row")
        return pixels.astype(np.float32)

    def _check_length(self, length: int, what: str) -> None:
        limit = self.config.decoder.max_position_embeddings
        if length > limit:
            raise ValueError(f"{what} is {length} tokens, longer than the model's context of {limit} tokens")

    # --- images -------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values) -> np.ndarray:
        """float32[B, P, D]: with a decoder, the projected features that replace the image tokens;
        for an encoder alone, its final output (transformers' `last_hidden_state`)."""
        output = "features" if self.config.is_vlm else "output"
        return self._run_vision(output, self._pixels(pixel_values))

    def _run_vision(self, output: str, pixels: np.ndarray):
        B = len(pixels)
        out = _vision(self.config.computation, self.dtype, output, self.shard, self.params,
                      place(self.shard, *self._pad_batch(pixels)))
        if isinstance(out, (list, tuple)):
            return [np.asarray(s, np.float32)[:B] for s in out]
        return np.asarray(out, np.float32)[:B]

    def image_embeddings(self, pixel_values) -> np.ndarray:
        """float32[B, E]: one vector per image (CLIP: projected class token; SigLIP: the attention pool)."""
        pixels = self._pixels(pixel_values)
        if not self.config.vision.can_pool:
            raise ValueError("this image encoder has no pooling head (neither a class token nor attention pooling)")
        return self._run_vision("pooled", pixels)

    def vision_hidden_states(self, pixel_values) -> list[np.ndarray]:
        """The encoder's hidden states as transformers lists them: embeddings, then each layer's output."""
        pixels = self._pixels(pixel_values)
        return self._run_vision("hidden_states", pixels)

    # --- forward ------------------------------------------------------------------------------------------
    def logits(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
               output_hidden_states: bool = False, output_attentions: bool = False, image_grid_thw=None):
        """Full forward without a cache: float32[B, T, V].

        `input_ids` hold the image placeholder tokens where `pixel_values` [B, H, W, 3] (one image per row;
        for models taking several, [N, H, W, 3]: the rows' images in order) go. Prefix-LM models (PaliGemma)
        attend bidirectionally over the tokens whose `token_type_ids` are 0; by default, all of them. Gemma 3's
        images attend to themselves both ways whatever the `token_type_ids` (the processor's are accepted).
        Positions count real tokens only (as in generation), so a padded row matches the same prompt alone.

        With `output_hidden_states` or `output_attentions`, a `LogitsOutput` (logits, hidden_states,
        attentions) as transformers names them: the decoder's L + 1 hidden states float32[B, T, D] (the
        embeddings, each layer's output, the last one after the final norm) and its L layers' attention
        weights float32[B, N, T, T] (computed by the spelled-out attention: slower, for inspection).
        """
        self._require_lm_head()
        checks.flag("output_hidden_states", output_hidden_states)
        checks.flag("output_attentions", output_attentions)
        if not (output_hidden_states or output_attentions):
            return self._run(input_ids, attention_mask, pixel_values, token_type_ids, image_grid_thw=image_grid_thw)
        logits, hidden, weights = self._run(input_ids, attention_mask, pixel_values, token_type_ids, inspect=True,
                                            image_grid_thw=image_grid_thw)
        return LogitsOutput(logits, list(hidden) if output_hidden_states else None,
                            list(weights) if output_attentions else None)

    def classify(self, input_ids, attention_mask=None, pixel_values=None) -> np.ndarray:
        """A classification head's logits: float32[B, labels] from each row's last real token (sequence
        classification), or float32[B, T, labels] (token classification). `config.head.labels` names them."""
        if self.config.head is None:
            raise ValueError("this model has no classification head (convert a ...ForSequenceClassification or "
                             "...ForTokenClassification checkpoint)")
        return self._run(input_ids, attention_mask, pixel_values)

    def _run(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None, inspect: bool = False,
             image_grid_thw=None):
        ids, valid, prefix, pixels = self._inputs(input_ids, attention_mask, pixel_values, token_type_ids,
                                                  image_grid_thw)
        B, T = ids.shape
        self._check_length(T, "input_ids")
        # Padding on the right up to a bucket keeps one compilation per bucket; causality hides it.
        length = prompt_bucket(T)
        outputs = self.config.head.num_labels if self.config.head is not None else self.config.decoder.vocab_size
        memory.check_fits(B * length * outputs * 4, f"the logits of {B} rows of {length} tokens")
        pad = lambda x, value: None if x is None else np.pad(x, ((0, 0), (0, length - T)), constant_values=value)
        ids, valid, prefix = self._pad_batch(pad(ids, 0).astype(np.int32), pad(valid, False), pad(prefix, False))
        if pixels is not None:  # the rows repeated at the end bring their images
            pixels = Images.of_rows([pixels.of_row(min(i, B - 1)) for i in range(len(ids))])
        put = functools.partial(place, self.shard)
        pixels, image_rows = (None, None) if pixels is None else pixels.bucketed(self.config.vision)
        out = _forward(self.config.computation, self.dtype, self.shard, self.params, put(ids), put(valid), put(prefix),
                       put(pixels), put(image_rows), inspect)
        if inspect:
            logits, hidden, weights = (np.asarray(x, np.float32) for x in out)
            return logits[:B, :T], hidden[:, :B, :T], weights[:, :B, :, :T, :T]
        out = np.asarray(out, np.float32)[:B]
        return out if out.ndim == 2 else out[:, :T]

    def generate_ids(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     seed: int = 0, token_type_ids=None, repetition_penalty: float | None = None,
                     min_new_tokens: int | None = None, logprobs: bool = False, image_grid_thw=None):
        """New tokens only, int32[B, max_new_tokens]; after a row's end-of-sequence token, the pad id. With
        `logprobs`, (those tokens, their log-probabilities float32[B, max_new_tokens]: the log-softmax of the
        model's logits at each chosen token, 0 after the end). Settings left None come from the checkpoint's
        generation_config.json (see `generate`).

        Each row is a request of an `Engine` whose slots hold the whole batch; its tokens are what it would
        get alone. The images in `pixel_values` are encoded once, at prefill.
        """
        checks.flag("logprobs", logprobs)
        settings = self._settings(max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty, min_new_tokens)
        inputs = self._inputs(input_ids, attention_mask, pixel_values, token_type_ids, image_grid_thw)
        outputs = self._answers(self._requests(self._rows(inputs), **self._fields(settings)))
        n = settings["max_new_tokens"]
        tokens = np.full((len(outputs), n), self.config.tokens.pad_id, np.int32)
        scores = np.zeros((len(outputs), n), np.float32)
        for row, out in enumerate(outputs):
            tokens[row, :len(out.tokens)], scores[row, :len(out.logprobs)] = out.tokens, out.logprobs
        return (tokens, scores) if logprobs else tokens

    def decode_program(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                       image_grid_thw=None, **settings) -> str:
        """The optimised program (XLA's HLO text) of the decode chunk that `generate_ids` runs on these inputs
        with these `settings` (its keyword arguments): where a sharded model's collectives, or a stacked
        model's copies, show. (The same program: whichever of the two runs first compiles it.)"""
        settings = self._settings(**settings)
        inputs = self._inputs(input_ids, attention_mask, pixel_values, token_type_ids, image_grid_thw)
        requests = self._requests(self._rows(inputs), **self._fields(settings))
        return self._engine(requests, chunk=1).decode_program(sampling=settings["temperature"] > 0,
                                                             penalize=settings["repetition_penalty"] != 1)

    def check_generation(self, stop=None, logprobs: bool = False, **settings) -> None:
        """Checks `generate`'s keyword arguments (a one-line error naming the first bad one), before any work."""
        self._settings(**settings)
        check_stop(stop)
        checks.flag("logprobs", logprobs)

    def _settings(self, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=0,
                  repetition_penalty=None, min_new_tokens=None) -> dict[str, Any]:
        """The generation settings, checked: each argument given, else the checkpoint's generation_config.json
        as transformers applies it (its temperature, top-k and top-p only where it says `do_sample`), else
        jaxvlm's defaults (greedy, no penalty, 32 new tokens)."""
        d = self.config.generation
        if temperature is None:
            temperature = d.temperature if d is not None and d.do_sample else 0.0
        sampling = checks.number("temperature", temperature) > 0
        if d is not None and sampling:
            top_k = d.top_k if top_k is None else top_k
            top_p = (d.top_p if d.top_p < 1 else None) if top_p is None else top_p
        if repetition_penalty is None:
            repetition_penalty = 1.0 if d is None else d.repetition_penalty
        if min_new_tokens is None:
            min_new_tokens = 0 if d is None else d.min_new_tokens
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS if d is None or d.max_new_tokens is None else d.max_new_tokens
        check_sampling_args(temperature, top_k, top_p, repetition_penalty)
        return dict(max_new_tokens=checks.integer("max_new_tokens", max_new_tokens, 1), temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=checks.seed(seed), repetition_penalty=float(repetition_penalty),
                    min_new_tokens=checks.integer("min_new_tokens", min_new_tokens, 0))

    def request(self, prompt: str, image=None, add_bos: bool | None = None, **settings: Any) -> Request:
        """The engine's `Request` for a plain-text prompt (and its images), laid out by the processor;
        `settings` are `Request`'s fields (max_tokens, temperature, stop, ...)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: a request takes one prompt (a string), got {type(prompt).__name__}")
        self._require_lm_head()
        tokens, prefix, pixels = self._prompts(prompt, image, add_bos)[0]
        return Request(tokens=tokens, prefix=prefix, pixels=pixels, **settings)  # (`Engine.check` checks it)

    def _prompts(self, prompt_or_prompts, image, add_bos: bool | None, offset: int = 0) -> list[tuple]:
        """Each plain-text prompt as a request takes it (tokens, prefix or None, images or None), laid out by
        the processor: a prompt is never padded on its way to prefill, where it is right-aligned once."""
        rows, pixels, counts = self.processor.prompt_rows(prompt_or_prompts, image, add_bos, offset)
        starts = np.cumsum([0] + counts)
        return [(row, np.ones(len(row), bool) if self.config.prefix_lm else None,
                 None if pixels is None else pixels[starts[i]:starts[i + 1]]) for i, row in enumerate(rows)]

    @staticmethod
    def _rows(inputs) -> list[tuple]:
        """`_inputs`' padded arrays as `_prompts` gives prompts: each row's tokens under its mask."""
        ids, mask, prefix, images = inputs
        return [(row[keep].astype(np.int32), None if prefix is None else prefix[i][keep],
                 None if images is None else images.of_row(i)) for i, (row, keep) in enumerate(zip(ids, mask))]

    def _requests(self, prompts: Sequence[tuple], **fields: Any) -> list[Request]:
        """A `Request` for each of `prompts` (`_prompts`' or `_rows`' tuples) with `fields`, the prompts'
        lengths checked against the model's context."""
        self._require_lm_head()
        longest, new = max(len(tokens) for tokens, _, _ in prompts), fields.get("max_tokens", Request.max_tokens)
        self._check_length(longest, "the prompt")
        self._check_length(longest + new, f"the prompt plus max_new_tokens={new}")
        return [Request(tokens=tokens, prefix=prefix, pixels=pixels, **fields) for tokens, prefix, pixels in prompts]

    @staticmethod
    def _fields(settings: dict, stops: Sequence[str] = ()) -> dict[str, Any]:
        """`_settings` as `Request`'s fields."""
        return dict(max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                    top_k=settings["top_k"], top_p=settings["top_p"], seed=settings["seed"],
                    repetition_penalty=settings["repetition_penalty"], min_new_tokens=settings["min_new_tokens"],
                    stop=stops)

    def _engine(self, requests: Sequence[Request], chunk: int, overlap: bool = False) -> Engine:
        """An engine with a slot for each of `requests` (the batch padded to its bucket, as a mesh splits it)
        and a cache that fits the longest, checked to fit in memory; every slot decodes (one program), and a
        failure raises. Each chunk is read as soon as it is done (none runs past the last row's end), or with
        `overlap` a chunk late (a stream's first token comes out while the first chunk runs). Every request is
        prefilled in the first step, before any chunk runs: the whole batch arrived at once, and a server's
        admission limit (prefill_tokens, which spreads a crowd's prefills over several chunks so that running
        requests keep decoding) would here run a chunk over every slot per handful of rows admitted."""
        slots = batch_bucket(len(requests), 1 if self.shard is None else self.shard.batch_multiple)
        size = cache_bucket(max(cache_slots(self.config, len(r.tokens), r.max_tokens) for r in requests))
        cache = jax.eval_shape(lambda: KVCache.init(self.config.decoder, slots, size, self.cache_dtype,
                                                    is_stacked(self.params)))
        memory.check_fits(memory.tree_bytes(cache), f"max_new_tokens={requests[0].max_tokens}: the KV cache for "
                                                    f"{len(requests)} rows of {size} tokens")
        return Engine(self, slots=slots, cache_size=size, chunk=chunk, prefix_cache_bytes=0, compact=False,
                      fail_alone=False, overlap=overlap,
                      prefill_tokens=sum(prompt_bucket(len(r.tokens)) for r in requests))

    def _answers(self, requests: Sequence[Request]) -> list[Output]:
        """The engine's outputs for `requests`, all decoding together, in order. Decode calls take up to
        `MAX_CHUNK` steps, as many as the longest answer needs (prefill gives the first token), so that nothing
        is computed past its end; the step count is no shape, so every count runs one program."""
        new = max(r.max_tokens for r in requests)
        engine = self._engine(requests, min(MAX_CHUNK, max(1, new - 1)))
        ids = [engine.submit(r) for r in requests]
        outputs = engine.run()
        return [outputs[i] for i in ids]

    # --- text in, text out --------------------------------------------------------------------------------
    def generate(self, prompt_or_prompts: str | Sequence[str], image=None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, repetition_penalty: float | None = None, min_new_tokens: int | None = None,
                 stop: str | Sequence[str] | None = None, logprobs: bool = False):
        """Text in, text out; a list of prompts is generated as one batch (a list longer than
        `GENERATE_BATCH`, 64, in batches of that many).

        `image` (a path, PIL image or uint8 array; a list with one per prompt) is what vision-language
        models answer about; the prompt is plain text, built into the model's format as its Hugging Face
        processor would. Models that take several images a prompt (Gemma 3, `config.max_images`) take a
        list of images for a prompt, each placed at one of the prompt's image markers (`<start_of_image>`).

        Settings with transformers' meanings: `temperature` (0: greedy), `top_k`, `top_p`, `seed`,
        `repetition_penalty` (a seen token's logit divided by it, or multiplied where negative; the prompt's
        tokens count), `min_new_tokens` (no end-of-sequence token before that many), `max_new_tokens`. A
        setting left None takes the checkpoint's generation_config.json value as transformers applies it
        (sampling only where it says `do_sample`), else greedy, no penalty, 32 new tokens. `stop`: a string
        or strings; a row stops once its text holds one, and its text ends before it. With `logprobs`, each
        answer is a `Generated` (text, token ids, their log-probabilities).
        """
        return self._generate_text(prompt_or_prompts, image, None, stop, logprobs, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                   repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)

    def _generate_text(self, prompt_or_prompts, image, add_bos, stop=None, logprobs=False, **settings):
        settings = self._settings(**settings)
        stops = check_stop(stop)
        checks.flag("logprobs", logprobs)
        self._require_lm_head()
        single = not isinstance(prompt_or_prompts, (list, tuple))  # (anything but a string is named by _encode)
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        if not single and image is not None and isinstance(image, (list, tuple)) and len(image) != len(prompts):
            raise ValueError(f"image: {len(image)} images for {len(prompts)} prompts; give one per prompt")
        answers = []
        # A long list runs a batch of GENERATE_BATCH prompts at a time: the images of one batch are in
        # memory at once, never those of the whole list.
        for start in range(0, max(1, len(prompts)), GENERATE_BATCH):
            part = slice(start, start + GENERATE_BATCH)
            batch_images = image if single or image is None or not isinstance(image, (list, tuple)) else image[part]
            batch = self._prompts(prompt_or_prompts if single else prompts[part], batch_images, add_bos, start)
            for out in self._answers(self._requests(batch, **self._fields(settings, stops))):
                answers.append(Generated(out.text, out.tokens, out.logprobs) if logprobs else out.text)
        return answers[0] if single else answers

    def stream(self, prompt: str, image=None, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               repetition_penalty: float | None = None, min_new_tokens: int | None = None,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """`generate` for one prompt, as an iterator of text pieces given as the tokens are chosen: a piece a
        token (the tokens of a `STREAM_CHUNK`-step decode call come together); their join is `generate`'s
        text. A character whose bytes span tokens is given whole, once all of them are out; text that may
        begin a stop string is held back until it is known not to. The arguments are checked before this
        returns."""
        return self._stream(prompt, image, None, stop, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
                            min_new_tokens=min_new_tokens)

    def _stream(self, prompt, image, add_bos, stop=None, **settings) -> Iterator[str]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: stream takes one prompt (a string), got {type(prompt).__name__}; "
                             "use generate for a batch")
        settings = self._settings(**settings)
        stops = check_stop(stop)
        self._require_lm_head()
        requests = self._requests(self._prompts(prompt, image, add_bos), **self._fields(settings, stops))
        engine = self._engine(requests, STREAM_CHUNK, overlap=True)
        engine.submit(requests[0])

        def pieces() -> Iterator[str]:  # a token's text as soon as its chunk is read
            while not engine.idle:
                for event in engine.step():
                    yield from filter(None, event.pieces)

        return pieces()

    # --- chat ---------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict[str, Any]], image=None, stream: bool = False,
             **generate_kwargs) -> str | Iterator[str]:
        """The assistant's reply to `messages` (see `apply_chat_template`): the rendered conversation is
        tokenized as it stands (its template writes BOS itself) and generated from with `generate_kwargs`
        (`max_new_tokens`, `temperature`, ...); with `stream=True`, as `stream`'s pieces. Images come from
        the messages' image parts ({"type": "image", "image": a path, PIL image or array}, or "path" /
        "url" for a local file), in order, or from `image` (not both). A model without a chat template (the
        built-in one) answers a conversation of one user message as its plain prompt, as `generate` does."""
        tools, documents = generate_kwargs.pop("tools", None), generate_kwargs.pop("documents", None)
        prompt, image, add_bos = self.chat_prompt(messages, image, tools=tools, documents=documents)
        if stream:
            return self._stream(prompt, image, add_bos, **generate_kwargs)
        return self._generate_text(prompt, image, add_bos, **generate_kwargs)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], image=None, tools=None, documents=None):
        """(the prompt `chat` generates from, its images, whether to add BOS: None for the tokenizer's
        default) for `messages`."""
        in_parts = images_in(messages)
        if in_parts and image is not None:
            raise ValueError("image: the messages hold image parts already; give the images one way")
        if in_parts:
            image = in_parts if self.config.max_images > 1 or len(in_parts) > 1 else in_parts[0]
        if self.tokenizer is not None and self.tokenizer.chat_template is None and tools is None \
                and documents is None and plain_prompt(messages) is not None:
            return plain_prompt(messages), image, None
        return self.apply_chat_template(messages, tools=tools, documents=documents), image, False

    # --- adapters -----------------------------------------------------------------------------------------
    def merge_lora(self) -> "Model":
        """This model with its LoRA adapters folded into their kernels (kernel + lora_a lora_b): a plain
        model of the same config less `lora`, computing what this one computes."""
        if self.config.lora is None:
            raise ValueError("this model holds no LoRA adapters")
        config = dataclasses.replace(self.config, lora=None)
        params = lora.merge(self.params, checkpoint.contracted_axes(config))
        return Model(config, params, self.tokenizer, self.dtype, self.shard, self.cache_dtype)

    # --- saving -------------------------------------------------------------------------------------------
    def export_hf(self, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> str:
        """Writes a Hugging Face checkpoint folder that transformers' `from_pretrained` loads, computing what
        this model computes: config.json, safetensors (sharded past `max_shard_bytes`, default 5 GiB, with
        their index), the tokenizer and processor files. LoRA adapters are merged into their kernels. All
        or nothing, like `convert`; an existing `directory` is refused. Returns its absolute path."""
        from convert.export import MAX_SHARD_BYTES, export
        return export(self, directory, MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes a folder `jaxvlm.load` reads: config, params (as held: float or int8, unrolled or stacked)
        and the tokenizer and processor files the model was loaded with. All or nothing, like `convert`;
        an existing `directory` is refused. Returns its absolute path."""
        directory = os.path.abspath(os.fspath(directory))
        if os.path.lexists(directory):
            raise ValueError(f"{directory}: already exists; save into a new folder")
        copies = {} if self.tokenizer is None else self.tokenizer.files
        return checkpoint.save_model(directory, self.config, self.params, copies)


STREAM_CHUNK = 8  # decode steps per call of `Model.stream` (its pieces are a token each, a call's at once)
DEFAULT_MAX_NEW_TOKENS = 32  # where neither the call nor the checkpoint's generation_config.json says
GENERATE_BATCH = 64  # prompts a `generate` call runs at once; a longer list runs in batches of this many


class LogitsOutput(NamedTuple):
    """`logits(..., output_hidden_states=True, output_attentions=True)`, named as transformers names them."""
    logits: np.ndarray  # float32[B, T, V]
    hidden_states: list[np.ndarray] | None  # L + 1 of float32[B, T, D]
    attentions: list[np.ndarray] | None  # L of float32[B, N, T, T]


class Generated(NamedTuple):
    """An answer of `generate(..., logprobs=True)`."""
    text: str
    token_ids: list[int]  # the generated tokens, through the end-of-sequence token or the one that completed a stop
    logprobs: list[float]  # each token's log-probability: the log-softmax of the model's logits (float32)


def _token_types(token_type_ids, shape: tuple[int, ...]) -> np.ndarray:
    """token_type_ids as an int array of input_ids' shape [B, T] (a single row may come as [T])."""
    types = _array("token_type_ids", token_type_ids)
    types = types[None] if types.ndim == 1 else types
    if types.shape != shape:
        raise ValueError(f"token_type_ids has shape {types.shape}, input_ids {shape}")
    return types


def _array(name: str, value) -> np.ndarray:
    """`value` as a numpy array; a ValueError naming the argument for what numpy cannot make one of
    (ragged lists, objects)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: not an array ({e})") from None
    if array.dtype == object:
        raise ValueError(f"{name}: not a numeric array (ragged rows or objects)")
    return array


BUILTIN_MODEL = os.path.join(os.path.dirname(__file__), "shapes", "model")


def load(path: str | os.PathLike | None = None, dtype: str | None = None, verify: bool = True,
         mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None, scan_layers: bool = False,
         quantize: str | None = None, group_size: int | None = None, compute_dtype: str | None = None,
         cache_dtype: str | None = None) -> Model:
    """Loads a checkpoint folder: a converted jaxvlm one, or a Hugging Face one (config.json and its weights),
    or a hub id ('org/name') already in the local Hugging Face cache (`resolve_checkpoint`),
    converted in memory with the same checks as `jaxvlm convert` (which saves the converted folder once,
    for faster loads). With no path, the built-in shapes model (see `jaxvlm.shapes`).
    `dtype` ('float32' or 'bfloat16'), the params', defaults to the stored one; `compute_dtype`, the
    computation's, to the params' (int8 weights: float32), and `cache_dtype`, the KV cache's, to the
    computation's (e.g. bfloat16 weights computed in float32, or a bfloat16 cache for a float32 model,
    halving its memory). With `verify`, every file of a converted
    folder is first checked against its `checksums.json`, so a missing, truncated or altered file is named.

    With `mesh` (axes named from `data`, `fsdp`, `model`), each param is read straight into its shards
    and the model runs over the whole mesh; `rules` (logical axis name -> mesh axes) change the defaults
    in `jaxvlm.sharding`. In a job of several hosts, every process calls `load` alike, after
    `jax.distributed.initialize`.

    `scan_layers` holds each stack of layers as [L, ...] arrays run by a scan (True) or as separate
    layers (False, the default on every backend: see "Stacked layers" in the README), whichever layout the
    folder stores.

    `quantize='int8'` holds every projection, the embedding and the output head as int8 with float32
    scales, one per output channel or, with `group_size`, per that many inputs (see `jaxvlm.quantize`).
    A folder written by `jaxvlm convert --quantize int8` holds them already and loads as it is (with
    `quantize` None too); a float folder is quantized after loading.

    Compiled programs are kept on disk for the next process (`jaxvlm.compile_cache`; off with
    `JAXVLM_COMPILATION_CACHE=0`).
    """
    compile_cache.enable()
    path = BUILTIN_MODEL if path is None else resolve_checkpoint(path)
    for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype), ("cache_dtype", cache_dtype)):
        if value is not None and str(value) not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
    dtypes = lambda model: _with_dtypes(model, compute_dtype, cache_dtype)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)} or None, got {quantize!r}")
    if group_size is not None:
        if quantize is None:
            raise ValueError("group_size is the int8 scales' group: give it with quantize='int8'")
        group_size = checks.integer("group_size", group_size, 1)
    checks.flag("verify", verify)
    checks.flag("scan_layers", scan_layers)
    check_distributed("load")
    shard = mesh_rules(mesh, rules)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    from convert.core import is_hf_folder
    if is_hf_folder(path):
        return dtypes(_load_hf(path, dtype, quantize, group_size, shard, scan_layers))
    if verify and not files.verify_checksums(path):
        log.warning("%s has no %s (written by an older jaxvlm): its files cannot be verified", path,
                    files.CHECKSUMS_FILE)
    config = ModelConfig.load(path)
    stored = config.quantization
    if quantize is not None and stored is not None and group_size not in (None, stored.group_size):
        raise ValueError(f"{path} holds int8 weights quantized with group_size={stored.group_size}; "
                         f"group_size={group_size} would need the float weights")
    jdtype = checkpoint.stored_dtype(path) if dtype is None else DTYPES[str(dtype)]
    params = checkpoint.load_params(path, config, jdtype, shard, scan_layers)
    if stored is not None and quantize is None:
        log.info("%s holds int8 weights (%s); loaded as they are", path, stored)
    if quantize is not None and stored is None:
        config, params = checkpoint.quantize_params(config, params, group_size, shard)
    return dtypes(Model(config, params, Tokenizer.from_dir(path, config.tokens), jdtype, shard))


def _with_dtypes(model: Model, compute_dtype: str | None, cache_dtype: str | None) -> Model:
    """`model` computing in `compute_dtype` with a cache of `cache_dtype` (each None: as it is)."""
    if compute_dtype is not None:
        model.dtype = model.cache_dtype = DTYPES[str(compute_dtype)]
    if cache_dtype is not None:
        model.cache_dtype = DTYPES[str(cache_dtype)]
    return model


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache() -> str:
    """The local Hugging Face hub cache, as huggingface_hub finds it ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A checkpoint folder, or a hub id ('google/paligemma-3b-pt-224') found in the local Hugging Face cache
    (through huggingface_hub, local files only: nothing is downloaded). An id not in the cache is one line
    saying how to download it."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path) or not HUB_ID.fullmatch(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(path, cache_dir=hub_cache(), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise FileNotFoundError(f"{path}: no such folder, and not in the local Hugging Face cache ({hub_cache()}); "
                                f"download it first: hf download {path}") from None


def _load_hf(path: str, dtype: str | None, quantize: str | None, group_size: int | None, shard: MeshRules | None,
             scan_layers: bool) -> Model:
    """An unconverted Hugging Face folder, converted in memory with `jaxvlm convert`'s reader and checks: each
    part of the params goes to the device (or its shards) as it is read."""
    from convert.core import HFCheckpoint
    with HFCheckpoint(path, None if dtype is None else str(dtype), quantize, group_size) as source:
        jdtype = jnp.dtype(source.target)
        params = checkpoint.place_params((part for _, part, _ in source.parts()), source.config, jdtype, shard,
                                         scan_layers)
    return Model(source.config, params, Tokenizer.from_dir(path, source.config.tokens), jdtype, shard)
