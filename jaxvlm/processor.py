"""The processor: text and images in, the network's token ids and pixels out, and generated ids back to text.

It holds what only the host reads: the checkpoint's tokenizer, prompt format, image processing, chat
template and image framing (the host-side fields of `ModelConfig`), apart from the network and its weights,
as transformers' processors stand apart from its models. `Model` owns one (`model.processor`).
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from jaxvlm.chat import check_messages
from jaxvlm.config import ModelConfig
from jaxvlm.generate import right_align
from jaxvlm.images import preprocess_images
from jaxvlm.prompts import build_prompt
from jaxvlm.tokenizer import Tokenizer, check_text


def require_decoder(config: ModelConfig) -> None:
    if config.decoder is None:
        raise ValueError("this model is an image encoder alone; use encode_image or image_embeddings")


def require_vision(config: ModelConfig, argument: str) -> None:
    if config.vision is None:
        raise ValueError(f"{argument}: this model has no image encoder; it takes text only")


class Processor:
    """The tokenizer (None for a folder without one) and the host-side settings of `config`."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None):
        self.config, self.tokenizer = config, tokenizer

    # --- images -------------------------------------------------------------------------------------------
    def preprocess(self, images: Any | Sequence[Any]) -> np.ndarray:
        """Images (paths, PIL images or uint8 arrays; one or a list) -> pixel_values float32[N, H, W, 3]: one
        per image or, where the processor config asks for pan and scan (Gemma 3), each image followed by
        its crops."""
        return self.preprocess_images(images)[0]

    def preprocess_images(self, images: Any | Sequence[Any], offset: int = 0) -> tuple[np.ndarray, list[int]]:
        """(pixel_values, the pan-and-scan crops of each image); errors name images counting from `offset`."""
        require_vision(self.config, "image")
        if self.config.image_processing is None:
            raise ValueError("this checkpoint has no image processing config (preprocessor_config.json)")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        pixels, crops = preprocess_images(images, self.config.image_processing, offset)
        size = self.config.vision.image_size
        if size is not None and pixels.shape[1:3] != (size, size):
            raise ValueError(f"the image processing config makes {pixels.shape[1]}x{pixels.shape[2]} images; "
                             f"the encoder takes {size}x{size}")
        return pixels, crops

    # --- text ---------------------------------------------------------------------------------------------
    def encode(self, prompt_or_prompts: str | Sequence[str], image=None, add_bos: bool | None = None,
               offset: int = 0) -> "Encoded":
        """Plain-text prompts (and their images) as the network takes them, laid out as generation lays them
        out: `Encoded(input_ids int32[B, T], attention_mask bool[B, T], pixel_values float32[N, H, W, 3] or
        None)`, rows right-aligned. `add_bos=False` leaves out the BOS the tokenizer would put first (a chat
        template writes its own); errors name the prompts counting from `offset` (a batch of a longer list)."""
        rows, pixels, _ = self.prompt_rows(prompt_or_prompts, image, add_bos, offset)
        ids, mask = right_align(rows, max(len(r) for r in rows), self.config.tokens.pad_id)
        return Encoded(ids, mask, pixels)

    def prompt_rows(self, prompt_or_prompts: str | Sequence[str], image=None, add_bos: bool | None = None,
                    offset: int = 0) -> tuple[list[np.ndarray], np.ndarray | None, list[int]]:
        """`encode` without the padding: (each prompt's tokens int32[T_i], the images float32[N, H, W, 3] of
        all prompts in order or None, how many images each prompt holds)."""
        require_decoder(self.config)
        single = isinstance(prompt_or_prompts, str)
        if not single and not isinstance(prompt_or_prompts, (list, tuple)):
            raise ValueError(f"prompt_or_prompts must be a string or a list of strings, got "
                             f"{type(prompt_or_prompts).__name__}")
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        if not prompts:
            raise ValueError("prompt_or_prompts is an empty list")
        if image is not None:
            require_vision(self.config, "image")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer files (tokenizer.json or tokenizer.model); "
                             "use generate_ids with token ids")
        names = ["prompt"] if single else [f"prompt {i + offset}" for i in range(len(prompts))]
        for p, name in zip(prompts, names):
            check_text(p, name)
            # a text far past the context is refused before it is tokenized whole
            self.tokenizer.refuse_far_past(p, name, self.config.decoder.max_position_embeddings)
        pixels, per_prompt = None, [None] * len(prompts)  # each prompt's images' crop counts
        if image is not None:
            images = [image] if single or not isinstance(image, (list, tuple)) else list(image)
            if len(images) != len(prompts):
                raise ValueError(f"image: {len(images)} images for {len(prompts)} prompts; give one per prompt")
            if self.config.max_images > 1:  # each prompt's entry: an image or a list of them
                images = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
                pixels, crops = self.preprocess_images([x for row in images for x in row]) \
                    if any(images) else (None, [])  # (named by their place in this batch's images)
                starts = np.cumsum([0] + [len(row) for row in images])
                per_prompt = [crops[a:b] for a, b in zip(starts[:-1], starts[1:])]
                for i, c in enumerate(per_prompt):
                    if len(c) + sum(c) > self.config.max_images:
                        raise ValueError(f"image: prompt {i} has {len(c) + sum(c)} images (pan-and-scan crops "
                                         f"included); this model takes at most {self.config.max_images} per prompt "
                                         "(max_images)")
            else:
                if any(isinstance(x, (list, tuple)) for x in images):
                    raise ValueError("image: this model takes one image per prompt, not a list")
                pixels = self.preprocess_images(images, offset)[0]
        elif self.config.is_vlm and self.config.max_images == 1:
            raise ValueError("image: this vision-language model needs an image per prompt")
        # Gemma 3 and Qwen-VL prompts place images at their markers: a prompt without images is checked
        # for markers too
        marked = self.config.prompt_format in ("framed_images", "sized_images")
        if self.config.prompt_format == "sized_images":  # each image as many tokens as its size gives
            sizes = [] if pixels is None else list(pixels.tokens(self.config.vision.merge_size))
            starts = np.cumsum([0] + [0 if c is None else len(c) for c in per_prompt])
            per_prompt = [sizes[a:b] for a, b in zip(starts[:-1], starts[1:])]
            placed = [sum(s) for s in per_prompt]
            counts = [len(s) for s in per_prompt]
        else:  # P per image (one a prompt, or each image and its crops)
            counts = [0 if pixels is None else 1 if c is None else len(c) + sum(c) for c in per_prompt]
            placed = [n * (self.config.tokens_per_image or 0) for n in counts]
        rows = [build_prompt(self.config, self.tokenizer, p, pixels is not None or marked, add_bos,
                             per_image=[] if marked and c is None else c) for p, c in zip(prompts, per_prompt)]
        for name, r, want in zip(names, rows, placed):
            if not len(r):
                raise ValueError(f"{name} is empty after tokenization")
            if self.config.image_token_id is not None and (found := int((r == self.config.image_token_id).sum())) != want:
                text = self.tokenizer.single_token_text(self.config.image_token_id)
                raise ValueError(f"{name} holds the image token{f' {text!r}' if text else ''} as text "
                                 f"({found - want} extra); images are placed by the model, not typed into the prompt")
        return [np.asarray(r, np.int32) for r in rows], pixels, counts

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None,
                            **variables: Any) -> str:
        """The prompt text for a conversation, rendered with the checkpoint's chat template exactly as
        transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` renders
        it. `messages` are {"role": "system" | "user" | "assistant" | ..., "content": ...} dicts, every other
        field kept (`tool_calls`, `name`, ...); a content is a string or a list of {"type": "text", "text"}
        and {"type": "image", ...} parts, as transformers' templates take them. `tools` (JSON schemas) and
        `documents` reach the template as transformers passes them; `variables` too (e.g. Qwen3's
        `enable_thinking=False`)."""
        require_decoder(self.config)
        template = None if self.tokenizer is None else self.tokenizer.chat_template
        if template is None:
            where = "this model" if self.tokenizer is None else self.tokenizer.directory
            raise ValueError(f"{where} has no chat template (chat_template.jinja, or 'chat_template' in "
                             "tokenizer_config.json): it answers a chat of one user message as a plain prompt; for more, "
                             "build the prompt yourself and call generate")
        messages = check_messages(messages)
        for i, m in enumerate(messages):  # a message far past the context is refused before rendering
            content = m.get("content")
            texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or ()]
            self.tokenizer.refuse_far_past("".join(texts), f"message {i}", self.config.decoder.max_position_embeddings)
        return template.render(messages, add_generation_prompt, tools=tools, documents=documents, **variables)

    def answer(self, tokens: np.ndarray, stops: list[str]) -> tuple[str, int]:
        """(the text of generated `tokens`, ended before the first stop string; how many tokens it took:
        through the end-of-sequence token, or through the token that completed the stop string)."""
        ended = np.isin(tokens, list(self.config.tokens.eos_ids))
        n = int(np.argmax(ended)) + 1 if ended.any() else len(tokens)
        text = self.tokenizer.decode(tokens[:n])
        cut = stop_at(text, stops)
        if cut is None:
            return text, n
        n = next(k for k in range(1, n + 1) if stop_at(self.tokenizer.decode(tokens[:k]), stops) is not None)
        return text[:cut], n

    def text_pieces(self, chunks: Iterator[np.ndarray], stops: Sequence[str] = ()) -> Iterator[str]:
        """`text_pieces` with this processor's tokenizer."""
        return text_pieces(self.tokenizer, chunks, stops)


def text_pieces(tokenizer: Tokenizer, chunks: Iterator[np.ndarray], stops: Sequence[str] = ()) -> Iterator[str]:
    """The text of growing token sequences as the pieces it adds (see `TextStream`); the text ends before
    the first stop string (the generation is then left), the rest comes at the end."""
    stream = TextStream(tokenizer, stops)
    for chunk in chunks:
        piece = stream.add(chunk)
        if piece:
            yield piece
        if stream.stopped:
            return
    piece = stream.finish()
    if piece:
        yield piece


class TextStream:
    """The text of a growing token sequence, handed out as the pieces it adds: each new piece once the text
    no longer ends in the middle of a character (U+FFFD, bytes still missing), less any end that may begin a
    stop string; once a stop string appears, the text ends before it and `stopped` is set."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.ids: list[int] = []
        self.shown = ""  # the text handed out so far
        self.stopped = False

    def add(self, ids) -> str:
        """The piece that `ids`, appended, add to the text (often "")."""
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        cut = stop_at(text, self.stops)
        if cut is not None:
            self.stopped = True
            return text[len(self.shown):cut] if cut > len(self.shown) else ""
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        return self._show(text[:len(text) - stop_prefix(text, self.stops)])

    def finish(self) -> str:
        """The text held back until the end (a possible start of a stop string, or an unfinished character)."""
        return "" if self.stopped else self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> str:
        if len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def check_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else \
        [] if stop is None else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
    return stops


def stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins some stop string (held back while streaming)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])),
               default=0)


class Encoded(NamedTuple):
    """Prompts as `Model.encode` lays them out, named as transformers' processors name them (the network's
    own inputs, positions and blocks derived, are `jaxvlm.inputs.Inputs`)."""
    input_ids: np.ndarray  # int32[B, T], right-aligned (padding first)
    attention_mask: np.ndarray  # bool[B, T]
    # float32[N, H, W, 3]: the rows' images in order, one a row (several, and pan-and-scan crops, where the model
    # takes them: Gemma 3); None for text
    pixel_values: np.ndarray | None
