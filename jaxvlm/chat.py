"""Chat templates: a checkpoint's own Jinja template renders a list of messages into the prompt text, as
transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` does.

The template comes from the checkpoint folder: `chat_template.jinja` (what transformers 5 saves), else the
`chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of which
"default" is used), else a processor's `chat_template.json`. Templates are code from the internet, so
they run in Jinja's immutable sandbox with the same globals and filters as transformers gives them
(`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, loop controls, trimmed blocks),
and see the special tokens' strings (`bos_token`, `eos_token`, ...) beside the messages.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

from jaxvlm import files

ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers' named special tokens, which every template sees as variables
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """A compiled chat template and the variables it sees besides the messages; `source` is its file."""

    def __init__(self, text: str, source: str, special_tokens: dict[str, str]):
        self.text, self.source, self.special_tokens = text, source, dict(special_tokens)
        self._template = _environment().from_string(text)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for `messages` (checked by `check_messages`); with `add_generation_prompt`, the
        text that opens the assistant's reply is appended. `variables` reach the template too (e.g.
        `enable_thinking=False` for Qwen3's)."""
        import jinja2
        messages = check_messages(messages)
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **variables})
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a template bug
            raise ValueError(f"{self.source}: the chat template refused the messages ({files.error_line(e)})") \
                from None


def check_messages(messages) -> list[dict[str, str]]:
    """`messages` as a fresh list of plain {"role", "content"} dicts; a ValueError naming the first that is
    not one, has an unknown role or a content that is not a string."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string, got "
                             f"{type(m['content']).__name__}")
        # As transformers does: keys set to None are dropped, everything else reaches the template as plain data
        out.append({str(k): v for k, v in m.items() if v is not None and isinstance(v, (str, int, float, bool))})
    return out


def load(directory: str | os.PathLike, special_tokens: dict[str, str]) -> ChatTemplate | None:
    """The chat template of the checkpoint folder `directory`, or None when it has none; a file or field
    that cannot be used is a FileError naming it."""
    path = files.optional_file(directory, TEMPLATE_FILE)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                return _compile(f.read(), path, special_tokens)
        except (OSError, UnicodeDecodeError) as e:
            raise files.FileError(f"{path}: unreadable ({e})") from None
    for name in (TOKENIZER_CONFIG, PROCESSOR_TEMPLATE_FILE):
        path = files.optional_file(directory, name)
        if path is None:
            continue
        value = files.read_json(path).get("chat_template")
        if value is None:
            continue
        if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            if "default" not in named:
                raise files.FileError(f"{path}: field 'chat_template' lists templates {sorted(map(str, named))} "
                                      "but none named 'default'")
            value = named["default"]
        if not isinstance(value, str):
            raise files.FileError(f"{path}: field 'chat_template' must be a string, got {type(value).__name__}")
        return _compile(value, f"{path} (chat_template)", special_tokens)
    return None


def special_tokens(directory: str | os.PathLike) -> dict[str, str]:
    """The named special tokens' strings (`bos_token`: '<bos>', ...) that `tokenizer_config.json` and
    `special_tokens_map.json` give (an entry may be a string or an {"content": ...} object)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", TOKENIZER_CONFIG):  # the tokenizer config wins
        path = files.optional_file(directory, name)
        if path is None:
            continue
        data = files.read_json(path)
        for key in SPECIAL_TOKEN_NAMES:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def _compile(text: str, source: str, special_tokens: dict[str, str]) -> ChatTemplate:
    import jinja2
    try:
        return ChatTemplate(text, source, special_tokens)
    except jinja2.TemplateError as e:
        raise files.FileError(f"{source}: not a valid Jinja template ({files.error_line(e)})") from None


_ENVIRONMENT = None


def _environment():
    """The sandboxed Jinja environment chat templates run in, made once (as transformers configures it)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson escapes HTML characters, which would change the prompt
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class Generation(jinja2.ext.Extension):
            """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
            rendering keeps its body as it is."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _ENVIRONMENT = env
    return _ENVIRONMENT
