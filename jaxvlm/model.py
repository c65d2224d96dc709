"""The user-facing model: a config, its params and its tokenizer, with logits and generation."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import checkpoint
from jaxvlm.config import ModelConfig
from jaxvlm.decoder import Decoder
from jaxvlm.generate import generate_tokens, prompt_bucket, right_align
from jaxvlm.masks import token_positions
from jaxvlm.sampling import check_sampling_args, make_sampler
from jaxvlm.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _forward(config, dtype, params, tokens, valid):
    return Decoder(config, dtype).apply({"params": params}, tokens, token_positions(valid), valid).logits


class Model:
    def __init__(self, config: ModelConfig, params, tokenizer: Tokenizer | None = None, dtype=jnp.float32):
        self.config, self.params, self.tokenizer, self.dtype = config, params, tokenizer, dtype

    def __repr__(self):
        d = self.config.decoder
        return (f"Model(width={d.width}, depth={d.depth}, heads={d.num_heads}/{d.num_kv_heads}, "
                f"vocab={d.vocab_size}, dtype={jnp.dtype(self.dtype).name})")

    # --- inputs -------------------------------------------------------------------------------------------
    def _inputs(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """Validated (ids int[B, T], mask bool[B, T]); a 1-D input is one row."""
        ids = np.asarray(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an int array [B, T], got {ids.dtype} {ids.shape}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        mask = mask.astype(bool)
        vocab = self.config.decoder.vocab_size
        for i, (row, keep) in enumerate(zip(ids, mask)):
            if not keep.any():
                raise ValueError(f"input_ids row {i} has no tokens under attention_mask")
            if row[keep].min() < 0 or row[keep].max() >= vocab:
                raise ValueError(f"input_ids row {i} holds token ids outside [0, {vocab})")
        return ids, mask

    def _rows(self, input_ids, attention_mask) -> list[np.ndarray]:
        """The real tokens of each row (padding on either side removed)."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return [row[keep] for row, keep in zip(ids, mask)]

    def _check_length(self, length: int, what: str) -> None:
        limit = self.config.decoder.max_position_embeddings
        if length > limit:
            raise ValueError(f"{what} is {length} tokens, longer than the model's context of {limit} tokens")

    # --- forward ------------------------------------------------------------------------------------------
    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Full forward without a cache: float32[B, T, V].

        Positions count real tokens only (as in generation), so a padded row matches the same prompt alone.
        """
        ids, valid = self._inputs(input_ids, attention_mask)
        B, T = ids.shape
        self._check_length(T, "input_ids")
        # Padding on the right up to a bucket keeps one compilation per bucket; causality hides it.
        length = prompt_bucket(T)
        tokens = np.zeros((B, length), np.int32)
        tokens[:, :T] = ids
        mask = np.zeros((B, length), bool)
        mask[:, :T] = valid
        out = _forward(self.config.decoder, self.dtype, self.params, jnp.asarray(tokens), jnp.asarray(mask))
        return np.asarray(out[:, :T], np.float32)

    def generate_ids(self, input_ids, attention_mask=None, max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
        """New tokens only, int32[B, max_new_tokens]; after a row's end-of-sequence token, the pad id."""
        _check_max_new_tokens(max_new_tokens)
        sampler = make_sampler(temperature, top_k, top_p)
        rows = self._rows(input_ids, attention_mask)
        longest = max(len(r) for r in rows)
        self._check_length(longest, "the prompt")
        self._check_length(longest + max_new_tokens, f"the prompt plus max_new_tokens={max_new_tokens}")
        tokens = self.config.tokens
        return generate_tokens(self.config.decoder, self.dtype, self.params, rows, max_new_tokens=int(max_new_tokens),
                               sampler=sampler, temperature=temperature, top_p=top_p, seed=seed,
                               eos_ids=tokens.eos_ids, pad_id=tokens.pad_id)

    def generate(self, prompt_or_prompts: str | Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str | list[str]:
        """Text in, text out; a list of prompts is generated as one batch."""
        _check_max_new_tokens(max_new_tokens)
        check_sampling_args(temperature, top_k, top_p)
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer files (tokenizer.json or tokenizer.model); "
                             "use generate_ids with token ids")
        single = isinstance(prompt_or_prompts, str)
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt_or_prompts must be a string or a non-empty list of strings")
        rows = [self.tokenizer.encode(p) for p in prompts]
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {i} is empty after tokenization")
        ids, mask = right_align(rows, max(len(r) for r in rows), self.config.tokens.pad_id)
        out = self.generate_ids(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed)
        texts = [self.tokenizer.decode(row) for row in out]
        return texts[0] if single else texts


def _check_max_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def load(path: str | os.PathLike, dtype: str | None = None) -> Model:
    """Loads a converted checkpoint folder. `dtype` ('float32' or 'bfloat16') defaults to the stored one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    config = ModelConfig.load(path)
    if dtype is None:
        jdtype = checkpoint.stored_dtype(path)
    elif str(dtype) in DTYPES:
        jdtype = DTYPES[str(dtype)]
    else:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params = checkpoint.load_params(path, config, jdtype)
    return Model(config, params, Tokenizer.from_dir(path, config.tokens), jdtype)
