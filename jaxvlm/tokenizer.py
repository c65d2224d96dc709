"""Text to token ids and back, with the checkpoint's own tokenizer files.

`tokenizer.json` is read with `tokenizers`, otherwise `tokenizer.model` with `sentencepiece`. Special
tokens are never inserted by the tokenizer itself: BOS is prepended here when the family expects it
(`TokensConfig.add_bos`), so the two file formats behave the same.
"""

from __future__ import annotations

import os
import re

from jaxvlm import chat
from jaxvlm.config import TokensConfig
from jaxvlm.files import FileError, error_line, snapshot
from jaxvlm.images import PROCESSOR_FILES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   chat.TEMPLATE_FILE, chat.PROCESSOR_TEMPLATE_FILE)


class Tokenizer:
    """`source` is the tokenizer file read; `chat_template` the folder's chat template (or None); `files` the
    tokenizer, template and processor files of its folder, read once at load (what `save` writes)."""

    def __init__(self, encode_fn, decode_fn, tokens: TokensConfig, source: str, piece_fn=lambda i: None,
                 longest_piece: int | None = None):
        self._encode, self._decode, self.tokens, self.source = encode_fn, decode_fn, tokens, source
        self._piece = piece_fn
        self.longest_piece = longest_piece  # characters of the longest piece text; None: unknown
        self.chat_template: chat.ChatTemplate | None = None
        self.files: dict[str, bytes] = {}

    @property
    def directory(self) -> str:
        return os.path.dirname(self.source)

    def single_token_text(self, token_id: int) -> str | None:
        """The text that encodes to exactly `token_id`, if the tokenizer has one (special pieces such as
        `<image>` usually do; SentencePiece control tokens such as `<bos>` do not)."""
        text = self._call(self._piece, token_id)
        return text if text is not None and list(self._call(self._encode, text)) == [token_id] else None

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, tokens: TokensConfig) -> "Tokenizer | None":
        """The tokenizer found in `directory`, or None if it holds no tokenizer file. A file that cannot be
        read, or that resolves outside `directory`, is a FileError naming it. Its files are read once, here:
        the tokenizer, its chat template and what `save` writes all come from that one reading."""
        found = snapshot(directory, TOKENIZER_FILES + PROCESSOR_FILES)
        tokenizer = cls._read(os.fspath(directory), found, tokens)
        if tokenizer is not None:
            tokenizer.files = found
            tokenizer.chat_template = chat.load(directory, found, tokenizer._special_tokens(directory, found))
        return tokenizer

    @classmethod
    def _read(cls, directory: str, found: dict[str, bytes], tokens: TokensConfig) -> "Tokenizer | None":
        if "tokenizer.json" in found:
            import tokenizers
            json_path = os.path.join(directory, "tokenizer.json")
            try:
                tok = _unpanicked(lambda: tokenizers.Tokenizer.from_str(found["tokenizer.json"].decode("utf-8")),
                                  json_path)
            except FileError:
                raise
            except Exception as e:  # the Rust library raises its own exception type
                raise FileError(f"{json_path}: not a readable tokenizer ({error_line(e)})") from None
            longest = max(map(len, tok.get_vocab(with_added_tokens=True)), default=1)
            return cls(lambda text: tok.encode(text, add_special_tokens=False).ids,
                       lambda ids: tok.decode(ids, skip_special_tokens=True), tokens, json_path, tok.id_to_token,
                       longest)
        if "tokenizer.model" in found:
            import sentencepiece as spm
            spm_path = os.path.join(directory, "tokenizer.model")
            try:
                sp = spm.SentencePieceProcessor(model_proto=found["tokenizer.model"])
            except Exception as e:
                raise FileError(f"{spm_path}: not a readable SentencePiece model ({error_line(e)})") from None
            size, unk = sp.get_piece_size(), sp.unk_id()
            # Model vocabularies are often padded past the tokenizer's (Gemma, Phi-3): ids without a piece
            # decode to nothing, as they do with `tokenizers`; <unk> is dropped like the other specials.
            # SentencePiece never reads its control pieces (<bos>, <eos>, ...) from text, but chat templates
            # write them as text; like `tokenizers`' special tokens, they are matched first.
            controls = {sp.id_to_piece(i): i for i in range(size) if sp.is_control(i) and sp.id_to_piece(i)}
            pattern = re.compile("(" + "|".join(map(re.escape, sorted(controls, key=len, reverse=True))) + ")")

            def encode(text: str) -> list[int]:
                if not controls:
                    return sp.encode(text)
                parts = pattern.split(text)  # text, control, text, control, ..., text
                return [i for n, part in enumerate(parts) if part
                        for i in ([controls[part]] if n % 2 else sp.encode(part))]
            # SentencePiece may drop or merge whitespace before it splits: no bound from its pieces' lengths
            return cls(encode, lambda ids: sp.decode([i for i in ids if i < size and i != unk]), tokens,
                       spm_path, lambda i: sp.id_to_piece(i) if 0 <= i < size else None)
        return None

    def _special_tokens(self, directory, found: dict[str, bytes]) -> dict[str, str]:
        """The special tokens' strings a chat template sees: as the tokenizer config names them, else the
        pieces of the config's BOS, EOS and pad ids."""
        named = chat.special_tokens(directory, found)
        ids = {"bos_token": self.tokens.bos_id, "eos_token": (self.tokens.eos_ids or (None,))[0],
               "pad_token": self.tokens.pad_id}
        for name, token_id in ids.items():
            if name not in named and token_id is not None and (piece := self._piece(token_id)) is not None:
                named[name] = piece
        return named

    def _call(self, fn, *args):
        return _unpanicked(lambda: fn(*args), self.source)

    def encode(self, text: str, add_bos: bool | None = None, what: str = "text") -> list[int]:
        """Token ids of `text`, after BOS when the model expects one (or when `add_bos` says so); `what`
        names the text in errors (e.g. 'prompt 3')."""
        ids = list(self._call(self._encode, check_text(text, what)))
        add_bos = self.tokens.add_bos if add_bos is None else add_bos
        return [self.tokens.bos_id] + ids if add_bos else ids

    def refuse_far_past(self, text: str, what: str, max_tokens: int) -> None:
        """Refuses (`TooLong`) a text that needs more than `max_tokens` tokens, tokenizing a bounded head of
        it: a head of max_tokens x `longest_piece` characters that already takes more than max_tokens + 1
        tokens settles it (the whole text keeps all but the head's last, which may merge with what
        follows). Shorter texts, and texts a normalizer shrinks, are left to the exact count later."""
        head = max_tokens * (self.longest_piece or 64) + 1
        if len(text) <= head:
            return
        count = len(self._call(self._encode, text[:head]))
        if count > max_tokens + 1:
            raise TooLong(f"{what} is {len(text):,} characters, far longer than the model's context of "
                          f"{max_tokens} tokens (its first {head:,} characters alone take {count:,})")

    def decode(self, ids) -> str:
        """Decodes up to the first end-of-sequence token, dropping special tokens."""
        ids = [int(i) for i in ids]
        for n, i in enumerate(ids):
            if i in self.tokens.eos_ids:
                ids = ids[:n]
                break
        return self._call(self._decode, ids)


class TooLong(ValueError):
    """A text longer than the model's context; the message names it."""


def _unpanicked(fn, source: str):
    """`fn()`; a panic inside the Rust tokenizer (`PanicException`, a BaseException) becomes a ValueError
    naming the tokenizer file."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise FileError(f"{source}: the tokenizer failed ({error_line(e)})") from None


def check_text(text, what: str) -> str:
    """`text`, checked to be a string that UTF-8 can encode (tokenizers fail deep inside on lone surrogates)."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what}: cannot be encoded as UTF-8 ({e.reason} at character {e.start}: "
                         f"{text[e.start:e.end]!r})") from None
    return text
