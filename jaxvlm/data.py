"""Training rows to batches: a prompt (and an image) as the prefix, the answer as the suffix to learn.

A row is a dict {"prompt": str, "answer": str, "image": path | PIL image | uint8 array}; the image only for
vision-language models. The prompt is laid out as at inference (`prompts.build_prompt`), the answer
follows with an end-of-sequence token, and the loss covers the answer tokens only. Rows are right-padded
to a bucketed length, so a dataset compiles a handful of train steps.

`RowBatches` makes batch `step` as a pure function of the step (a seeded permutation per epoch): a resumed
run sees exactly the batches it would have seen. A row that cannot be used (no answer, an image that
does not load) is skipped with a warning naming it, once, and the next row of the permutation takes its
place.

A row longer than the model's context (or than the batch length, when one is fixed) is, by the
`too_long` choice, skipped as unusable ("skip", the default) or cut to fit with a warning naming it
("truncate": the answer loses its last tokens; a prompt that alone does not fit is skipped either way).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from jaxvlm import checks
from jaxvlm.config import ModelConfig
from jaxvlm.generate import prompt_bucket
from jaxvlm.images import ImageError, preprocess
from jaxvlm.prompts import build_prompt
from jaxvlm.tokenizer import Tokenizer

log = logging.getLogger("jaxvlm.data")


class RowError(ValueError):
    """A training row that cannot be used; the message names the row."""


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32[n]: prompt (with image placeholders), answer, end-of-sequence
    prefix_length: int  # the prompt's tokens; the rest is the answer
    pixels: np.ndarray | None  # float32[H, W, 3]


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # int32[B, T]
    valid: np.ndarray  # bool[B, T]: False at padding
    prefix: np.ndarray  # bool[B, T]: the prompt (full attention in a prefix-LM)
    loss_mask: np.ndarray  # bool[B, T]: the answer tokens, the ones the loss predicts
    pixels: np.ndarray | None  # float32[B, H, W, 3]


TOO_LONG = ("skip", "truncate")


def encode_row(config: ModelConfig, tokenizer: Tokenizer, row: Any, name: str = "row", too_long: str = "skip",
               length: int | None = None) -> Example:
    """One row as token ids; raises RowError naming `name` (e.g. 'row 17') when the row is unusable.
    Rows longer than the context (or `length`) are skipped or truncated as `too_long` says."""
    if not isinstance(row, dict):
        raise RowError(f"{name}: expected a dict with 'prompt' and 'answer', got {type(row).__name__}")
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str):
        raise RowError(f"{name}: 'prompt' must be a string, got {prompt!r}")
    if not isinstance(answer, str) or not answer.strip():
        raise RowError(f"{name}: no answer ('answer' is {answer!r}); there is nothing to learn from it")
    if not config.tokens.eos_ids:
        raise ValueError("the model config names no end-of-sequence token; answers could not end")
    pixels = None
    if config.is_vlm:
        if row.get("image") is None:
            raise RowError(f"{name}: no 'image' for this vision-language model")
        try:
            pixels = preprocess(row["image"], config.image_processing)
        except (ImageError, OSError, ValueError) as e:
            raise RowError(f"{name}: {e}") from None
    elif row.get("image") is not None:
        raise RowError(f"{name}: has an 'image' but this model takes text only")
    try:
        prompt_ids = build_prompt(config, tokenizer, prompt, with_image=pixels is not None)
        answer_ids = tokenizer.encode(answer, add_bos=False, what="'answer'") + [config.tokens.eos_ids[0]]
    except ValueError as e:
        raise RowError(f"{name}: {e}") from None
    ids = np.concatenate([prompt_ids, np.asarray(answer_ids, np.int32)])
    limit = min(config.decoder.max_position_embeddings, length or config.decoder.max_position_embeddings)
    if len(ids) > limit:
        what = f"{name}: {len(ids)} tokens, more than the {limit} that fit"
        if too_long == "skip" or len(prompt_ids) >= limit:
            raise RowError(f"{what} (the prompt alone has {len(prompt_ids)})" if len(prompt_ids) >= limit
                           else f"{what} (too_long='truncate' would cut the answer)")
        log.warning("%s; the answer is cut to %d tokens", what, limit - len(prompt_ids))
        ids = ids[:limit]
    return Example(ids, len(prompt_ids), pixels)


def collate(examples: Sequence[Example], pad_id: int, length: int | None = None) -> Batch:
    """Right-pads the examples to `length` (default: the bucket of the longest)."""
    longest = max(len(e.ids) for e in examples)
    length = prompt_bucket(longest) if length is None else length
    if longest > length:
        raise ValueError(f"an example has {longest} tokens, more than the batch length {length}")
    B = len(examples)
    tokens = np.full((B, length), pad_id, np.int32)
    valid, prefix, loss_mask = (np.zeros((B, length), bool) for _ in range(3))
    for i, e in enumerate(examples):
        n = len(e.ids)
        tokens[i, :n], valid[i, :n] = e.ids, True
        prefix[i, :e.prefix_length] = True
        loss_mask[i, e.prefix_length:n] = True
    pixels = None if examples[0].pixels is None else np.stack([e.pixels for e in examples])
    return Batch(tokens, valid, prefix, loss_mask, pixels)


class RowBatches:
    """Batch `step` of a list of rows, as a pure function of `step` (see the module docstring)."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, rows: Sequence[Any], batch_size: int,
                 seed: int = 0, length: int | None = None, too_long: str = "skip"):
        if tokenizer is None:
            raise ValueError("training on text rows needs the model's tokenizer")
        if not hasattr(rows, "__len__") or not hasattr(rows, "__getitem__"):
            raise ValueError(f"rows must be a sequence of dicts, got {type(rows).__name__}")
        if not len(rows):
            raise ValueError("rows: the dataset is empty")
        checks.integer("batch_size", batch_size, 1)
        checks.seed(seed)
        checks.optional_integer("length", length, 1)
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
        self.config, self.tokenizer, self.rows = config, tokenizer, rows
        self.batch_size, self.seed, self.length, self.too_long = batch_size, seed, length, too_long
        self._unusable: set[int] = set()
        self._epoch_order = (-1, None)

    def _example(self, index: int) -> Example | None:
        if index in self._unusable:
            return None
        try:
            return encode_row(self.config, self.tokenizer, self.rows[index], f"row {index}", self.too_long,
                              self.length)
        except RowError as e:
            log.warning("%s; skipped", e)
            self._unusable.add(index)
            return None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._epoch_order[1]

    def __call__(self, step: int) -> Batch:
        N, B = len(self.rows), self.batch_size
        examples = []
        for position in range(step * B, (step + 1) * B):
            epoch, offset = divmod(position, N)
            order = self._order(epoch)
            for tries in range(N):  # the next usable row of this epoch's order stands in for a bad one
                example = self._example(int(order[(offset + tries) % N]))
                if example is not None:
                    break
            else:
                raise ValueError(f"rows: none of the {N} rows is usable (see the warnings above)")
            examples.append(example)
        return collate(examples, self.config.tokens.pad_id, self.length)
