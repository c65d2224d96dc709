"""Plain-text prompts to token ids with image placeholders, as the Hugging Face processors build them.

- images_first: P image tokens, BOS, the prompt, a newline (`PaliGemmaProcessor`); the whole is the prefix.
- image_marker: the prompt with its `<image>` expanded to P image tokens, after BOS (`LlavaProcessor`); a prompt
  without `<image>` gets one at its start, on a line of its own. As the processor does, the expanded
  text is tokenized as a whole when the tokenizer knows the image token's text, so tokenizers that mark
  word starts (Llama's, Phi-3's) see the text after the image as the processor's tokenizer does.
- plain: the prompt, after BOS when the model expects one; no image.
"""

from __future__ import annotations

import numpy as np

from jaxvlm.config import ModelConfig
from jaxvlm.tokenizer import Tokenizer

IMAGE = "<image>"


def build_prompt(config: ModelConfig, tokenizer: Tokenizer, prompt: str, with_image: bool,
                 add_bos: bool | None = None) -> np.ndarray:
    """int32[T] ids for one prompt; `with_image` places the image's P placeholder tokens. `add_bos=False`
    leaves out the BOS the tokenizer would put first (a chat template writes its own)."""
    if not with_image:
        return np.asarray(tokenizer.encode(prompt, add_bos), np.int32)
    images = prompt.count(IMAGE)
    if images > 1:
        raise ValueError(f"prompt {prompt[:40]!r} has {images} {IMAGE} placeholders; one image per prompt is supported")
    before, _, after = prompt.rpartition(IMAGE) if images else ("", "", prompt)
    placeholders = [config.image_token_id] * config.vision.num_features
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
