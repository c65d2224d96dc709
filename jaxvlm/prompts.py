"""Plain-text prompts to token ids with image placeholders, as the Hugging Face processors build them.

- images_first: P image tokens, BOS, the prompt, a newline (`PaliGemmaProcessor`); the whole is the prefix.
- image_marker: the prompt with its `<image>` expanded to P image tokens, after BOS (`LlavaProcessor`); a prompt
  without `<image>` gets one at its start, on a line of its own. As the processor does, the expanded
  text is tokenized as a whole when the tokenizer knows the image token's text, so tokenizers that mark
  word starts (Llama's, Phi-3's) see the text after the image as the processor's tokenizer does.
- framed_images: each begin-of-image marker in the prompt (Gemma 3's `<start_of_image>`) stands for one image,
  in order: it becomes a blank line, the marker, the image's P tokens, the end-of-image token and a blank
  line; an image cut by pan and scan into crops is announced as the original followed by its crops, each
  framed alike (`Gemma3Processor`). The whole text is tokenized at once, after BOS.
- sized_images: each image token in the prompt (Qwen-VL's `<|image_pad|>`) stands for one image, in order, and
  becomes as many image tokens as that image's size gives (`Qwen2_5_VLProcessor`).
- plain: the prompt, after BOS when the model expects one; no image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxvlm.config import ModelConfig
from jaxvlm.tokenizer import Tokenizer

IMAGE = "<image>"


def build_prompt(config: ModelConfig, tokenizer: Tokenizer, prompt: str, with_image: bool,
                 add_bos: bool | None = None, per_image: Sequence[int] | None = None) -> np.ndarray:
    """int32[T] ids for one prompt; `with_image` places the image's P placeholder tokens. `add_bos=False`
    leaves out the BOS the tokenizer would put first (a chat template writes its own). `per_image` gives,
    for each image of the prompt, its pan-and-scan crops (framed_images; default: one image, none) or its
    tokens (sized_images)."""
    if not with_image:
        return np.asarray(tokenizer.encode(prompt, add_bos), np.int32)
    if config.prompt_format == "framed_images":
        return _framed(config, tokenizer, prompt, add_bos, [0] if per_image is None else list(per_image))
    if config.prompt_format == "sized_images":
        return _sized(config, tokenizer, prompt, add_bos, list(per_image or []))
    images = prompt.count(IMAGE)
    if images > 1:
        raise ValueError(f"prompt {prompt[:40]!r} has {images} {IMAGE} placeholders; one image per prompt is supported")
    before, _, after = prompt.rpartition(IMAGE) if images else ("", "", prompt)
    placeholders = [config.image_token_id] * config.tokens_per_image
    if config.prompt_format == "images_first":
        ids = tokenizer.encode(before, add_bos=False) + placeholders + [config.tokens.bos_id] \
            + tokenizer.encode(after + "\n", add_bos=False)
    else:
        if not images:
            after = "\n" + after
        image_text = tokenizer.single_token_text(config.image_token_id)
        if image_text is not None:
            ids = tokenizer.encode(before + image_text * len(placeholders) + after, add_bos)
        else:
            ids = tokenizer.encode(before, add_bos) + placeholders + tokenizer.encode(after, add_bos=False)
    return np.asarray(ids, np.int32)


def _framed(config: ModelConfig, tokenizer: Tokenizer, prompt: str, add_bos: bool | None,
            crops: list[int]) -> np.ndarray:
    begin, end = (_token_text(tokenizer, i, what)
                  for i, what in zip(config.image_frame, ("begin-of-image", "end-of-image")))
    image = _token_text(tokenizer, config.image_token_id, "image")
    markers = prompt.count(begin)
    if markers != len(crops):
        raise ValueError(f"prompt {prompt[:40]!r} has {markers} image marker{'s' * (markers != 1)} {begin} for "
                         f"{len(crops)} image{'s' * (len(crops) != 1)}; write one marker where each image goes")
    framed = f"\n\n{begin}{image * config.tokens_per_image}{end}\n\n"
    pieces = prompt.split(begin)
    text = pieces[0]
    for n, after in zip(crops, pieces[1:]):
        if n:
            text += (f"Here is the original image {framed} and here are some crops to help you see better "
                     + " ".join([framed] * n))
        else:
            text += framed
        text += after
    return np.asarray(tokenizer.encode(text, add_bos), np.int32)


def _sized(config: ModelConfig, tokenizer: Tokenizer, prompt: str, add_bos: bool | None,
           sizes: list[int]) -> np.ndarray:
    """Each image token in the prompt (Qwen-VL's `<|image_pad|>`, between its start and end tokens) stands
    for one image, in order, and becomes as many image tokens as that image gives (`sizes`), as
    `Qwen2_5_VLProcessor` expands it; the whole text is tokenized at once."""
    image = _token_text(tokenizer, config.image_token_id, "image")
    markers = prompt.count(image)
    if markers != len(sizes):
        raise ValueError(f"prompt {prompt[:40]!r} has {markers} image marker{'s' * (markers != 1)} {image} for "
                         f"{len(sizes)} image{'s' * (len(sizes) != 1)}; write one marker where each image goes")
    pieces = prompt.split(image)
    text = pieces[0] + "".join(image * n + after for n, after in zip(sizes, pieces[1:]))
    return np.asarray(tokenizer.encode(text, add_bos), np.int32)


def _token_text(tokenizer: Tokenizer, token_id: int, what: str) -> str:
    text = tokenizer.single_token_text(token_id)
    if text is None:
        raise ValueError(f"the tokenizer has no text for the {what} token {token_id}; it cannot build "
                         "this model's image prompts")
    return text
