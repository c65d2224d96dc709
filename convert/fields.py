"""Typed reading of Hugging Face JSON files (config.json, generation, tokenizer and processor configs).

Every field is taken through a method that says what it must be: a wrong type or a missing required field
is a `ConfigError` naming the file and the field (`text_config.hidden_size`), never Python's own error
from deep inside a conversion. A field set to null counts as absent, as in transformers.
"""

from __future__ import annotations

import math
from typing import Any

_MISSING = object()


class ConfigError(ValueError):
    pass


INT32_MAX = 2**31 - 1

# Sizes a config gives are bounded before any table or buffer is built from them (a num_hidden_layers of
# 10**9 would otherwise build a table of 10**9 layers). Each bound is far above every published model.
SIZE_LIMITS = {
    "num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 1 << 22,
    "max_position_embeddings": INT32_MAX, "original_max_position_embeddings": INT32_MAX, "sliding_window": INT32_MAX,
    "num_experts": 1 << 12, "num_local_experts": 1 << 12, "num_experts_per_tok": 1 << 12, "image_size": 1 << 14,
    "patch_size": 1 << 10, "image_seq_length": 1 << 16, "mm_tokens_per_image": 1 << 16, "projection_dim": 1 << 17,
    "num_labels": 1 << 20, "sliding_window_pattern": 1024, "max_window_layers": 1024, "decoder_sparse_step": 1024,
}


class Fields:
    """A JSON object from `path`; `prefix` names where it sits in the file, `defaults` fill absent fields."""

    def __init__(self, data: dict[str, Any], path: str, prefix: str = "", defaults: dict[str, Any] | None = None):
        self.data, self.path, self.prefix, self.defaults = data, path, prefix, defaults or {}

    def name(self, key: str) -> str:
        return self.prefix + key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None or key in self.defaults

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as JSON gave it (a family default if the file has none), unchecked."""
        if self.data.get(key) is not None:
            return self.data[key]
        return self.defaults.get(key, default)

    def fail(self, key: str, expected: str, value: Any = _MISSING):
        got = "it is missing" if value is _MISSING else f"got {value!r}"
        raise ConfigError(f"{self.path}: field {self.name(key)!r} must be {expected}, {got}")

    def _take(self, key: str, default: Any, check, expected: str):
        value = self.raw(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.fail(key, expected)
            return default
        if not check(value):
            self.fail(key, expected, value)
        return value

    def integer(self, key: str, default: Any = _MISSING) -> int:
        """An integer; a size named in `SIZE_LIMITS` must also be in [1, its limit] (0 for a window or step
        means none)."""
        if key not in SIZE_LIMITS:
            return self._take(key, default, _is_int, "an integer")
        limit = SIZE_LIMITS[key]
        return self._take(key, default, lambda v: _is_int(v) and 0 <= v <= limit, f"an integer in [0, {limit:,}]")

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self._take(key, default, _is_number, "a finite number")
        return float(value) if value is not None else None

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        return self._take(key, default, lambda v: isinstance(v, bool), "true or false")

    def text(self, key: str, default: Any = _MISSING) -> str:
        return self._take(key, default, lambda v: isinstance(v, str), "a string")

    def numbers(self, key: str, default: Any = _MISSING) -> tuple[float, ...]:
        value = self._take(key, default, lambda v: isinstance(v, list) and all(map(_is_number, v)),
                           "a list of numbers")
        return tuple(map(float, value)) if value is not None else None

    def integers(self, key: str) -> tuple[int, ...]:
        value = self._take(key, [], lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers")
        return tuple(value)

    def texts(self, key: str) -> tuple[str, ...]:
        value = self._take(key, [], lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                           "a list of strings")
        return tuple(value)

    def token_id(self, key: str, default: Any = None) -> int | None:
        """A token id: a non-negative integer (a list or a string is refused)."""
        return self._take(key, default, lambda v: _is_token(v), "a token id (an integer in [0, 2**31 - 1])")

    def token_ids(self, key: str) -> tuple[int, ...]:
        """One token id or a list of them (end-of-sequence ids are either)."""
        value = self._take(key, [], lambda v: _is_token(v) or (isinstance(v, list) and all(map(_is_token, v))),
                           "a token id or a list of token ids (integers in [0, 2**31 - 1])")
        return tuple(value) if isinstance(value, list) else (value,)

    def sub(self, key: str, defaults: dict[str, Any] | None = None) -> "Fields":
        """The nested object `key` (empty when absent)."""
        value = self._take(key, {}, lambda v: isinstance(v, dict), "an object")
        return Fields(value, self.path, self.name(key) + ".", defaults)

    def with_defaults(self, defaults: dict[str, Any]) -> "Fields":
        return Fields(self.data, self.path, self.prefix, {**self.defaults, **defaults})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= INT32_MAX  # ids are int32 on the device


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
