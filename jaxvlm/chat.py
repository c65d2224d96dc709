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

import contextvars
import datetime
import functools
import json
import math
import os
import time
from typing import Any, Sequence

from jaxvlm import files

ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers' named special tokens, which every template sees as variables
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """A chat template and the variables it sees besides the messages; `source` is its file. It is compiled
    at its first use, as transformers compiles it: a checkpoint loads whatever its template holds."""

    def __init__(self, text: str, source: str, special_tokens: dict[str, str]):
        self.text, self.source, self.special_tokens = text, source, dict(special_tokens)
        self._template = None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None, **variables: Any) -> str:
        """The prompt text for `messages` (checked by `check_messages`); with `add_generation_prompt`, the
        text that opens the assistant's reply is appended. `tools` (JSON schemas of functions) and
        `documents` reach the template as transformers passes them; `variables` too (e.g.
        `enable_thinking=False` for Qwen3's). Rendering is bounded: past `RENDER_SECONDS` or
        `RENDER_CHARS` of output it stops with an error naming the template."""
        messages = check_messages(messages)
        tools = _plain_list("tools", tools)
        documents = _plain_list("documents", documents)
        template = self._compiled()
        budget = _Budget(self.source)
        token = _BUDGET.set(budget)
        try:
            pieces = []
            for piece in template.generate(messages=messages, tools=tools, documents=documents,
                                           add_generation_prompt=add_generation_prompt,
                                           **{**self.special_tokens, **variables}):
                budget.output(len(piece))
                pieces.append(piece)
            return "".join(pieces)
        except RenderLimit as e:
            raise ValueError(f"{self.source}: {e}") from None
        except RecursionError:
            raise ValueError(f"{self.source}: the chat template recursed too deeply") from None
        except MemoryError:
            raise ValueError(f"{self.source}: the chat template ran out of memory") from None
        except Exception as e:  # raise_exception(...), a template bug, an overflow, a type error: all its own
            import jinja2
            what = "refused the messages" if isinstance(e, jinja2.TemplateError) else "failed"
            raise ValueError(f"{self.source}: the chat template {what} ({files.error_line(e)})") from None
        finally:
            _BUDGET.reset(token)

    def _compiled(self):
        if self._template is None:
            import jinja2
            try:
                self._template = _environment().from_string(self.text)
            except (jinja2.TemplateError, RecursionError) as e:
                raise files.FileError(f"{self.source}: not a valid Jinja template ({files.error_line(e)})") \
                    from None
        return self._template


# --- bounded rendering ----------------------------------------------------------------------------------
# A template is code from the internet: a render stops past these. The environment never folds constants
# when it compiles (an enormous power in a branch never taken would hang the compile), and every call,
# attribute or item lookup, loop step over `range`, namespace assignment, filter, `*` and `**` checks the
# clock; `*` and `**` check the size of what they would make before making it.
RENDER_SECONDS = 10.0
RENDER_CHARS = 1 << 24  # 16M characters of output (or of one string or list a template builds)


class RenderLimit(Exception):
    pass


class _Budget:
    def __init__(self, source: str):
        self.deadline, self.written = time.monotonic() + RENDER_SECONDS, 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"rendering the chat template took more than {RENDER_SECONDS:g} s; stopped")

    def output(self, n: int) -> None:
        self.written += n
        self.size(self.written, "its output")
        self.tick()

    @staticmethod
    def size(n: int, what: str) -> None:
        if n > RENDER_CHARS:
            raise RenderLimit(f"the chat template made {what} longer than {RENDER_CHARS:,} characters; stopped")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _Budget.size(len(value), "a value")
    return value


def _plain_list(name: str, value) -> list | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{name} must be a list of dicts (JSON schemas for tools), got {type(value).__name__}")
    return [_plain(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _plain(value: Any, where: str) -> Any:
    """`value` as fresh plain data (str, numbers, bools, None, lists and str-keyed dicts of them), which is
    what a template can read; a ValueError naming `where` for anything else."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings, got {k!r:.40}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise ValueError(f"{where}: a template reads plain data (strings, numbers, lists, dicts), got "
                     f"{type(value).__name__}")


CONTENT_PART_TYPES = ("text", "image")


def check_messages(messages) -> list[dict[str, Any]]:
    """`messages` as a fresh list of plain dicts, every field kept (`tool_calls`, `name`, ...; a field set
    to None is dropped, as transformers drops it); a ValueError naming the first message that is not a
    dict, lacks its role, has an unknown role, or a content that is neither a string nor a list of
    {"type": "text" | "image", ...} parts (an assistant message calling tools may have no content)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"message {i} ({m['role']}): content must be a string or a list of parts, got None")
        if isinstance(content, (list, tuple)):
            for n, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in CONTENT_PART_TYPES:
                    raise ValueError(f"message {i} ({m['role']}): content part {n} must be a dict with 'type' "
                                     f"one of {CONTENT_PART_TYPES}, got {part!r:.80}")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} ({m['role']}): content part {n} (text) needs a string 'text'")
            content = [{k: v for k, v in part.items() if k in ("type", "text")} if part["type"] == "text"
                       else {"type": "image"} for part in content]  # images are the model's, not the template's
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string or a list of parts, got "
                             f"{type(content).__name__}")
        fields = {str(k): _plain(v, f"message {i}.{k}") for k, v in m.items() if v is not None and k != "content"}
        out.append({**fields, **({} if content is None else {"content": content})})
    return out


def plain_prompt(messages: Sequence[dict[str, Any]]) -> str | None:
    """The text of a conversation of one user message (its text parts joined), which a model without a chat
    template answers as a plain prompt; None for any other conversation."""
    if not isinstance(messages, (list, tuple)) or len(messages) != 1 or not isinstance(messages[0], dict) \
            or messages[0].get("role") != "user":
        return None
    content = messages[0].get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)) or not all(isinstance(p, dict) for p in content):
        return None
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def images_in(messages: Sequence[dict[str, Any]]) -> list[Any]:
    """The images of `messages`' content parts, in order: each part's "image" (a path, PIL image or array),
    else its "path" or "url" (a local file; http(s) URLs are not fetched)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, (list, tuple)) else ():
            if not isinstance(part, dict) or part.get("type") != "image":
                continue
            image = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
            if image is None:
                raise ValueError(f"message {i}: an image part needs 'image', 'path' or 'url'")
            if isinstance(image, str) and image.startswith(("http://", "https://")):
                raise ValueError(f"message {i}: image {image[:60]!r}: jaxvlm does not download; give a local "
                                 "file, a PIL image or an array")
            out.append(image)
    return out


def load(directory: str | os.PathLike, found: dict[str, bytes], special_tokens: dict[str, str]) -> ChatTemplate | None:
    """The chat template among the checkpoint folder's files `found` (name -> contents, read at load), or
    None when it has none; a file or field that cannot be used is a FileError naming it."""
    path = lambda name: os.path.join(os.fspath(directory), name)
    if TEMPLATE_FILE in found:
        try:
            return ChatTemplate(found[TEMPLATE_FILE].decode("utf-8"), path(TEMPLATE_FILE), special_tokens)
        except UnicodeDecodeError as e:
            raise files.FileError(f"{path(TEMPLATE_FILE)}: unreadable ({e})") from None
    for name in (TOKENIZER_CONFIG, PROCESSOR_TEMPLATE_FILE):
        if name not in found:
            continue
        value = files.parse_json(found[name], path(name)).get("chat_template")
        if value is None:
            continue
        if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            if "default" not in named:
                raise files.FileError(f"{path(name)}: field 'chat_template' lists templates {sorted(map(str, named))} "
                                      "but none named 'default'")
            value = named["default"]
        if not isinstance(value, str):
            raise files.FileError(f"{path(name)}: field 'chat_template' must be a string, got {type(value).__name__}")
        return ChatTemplate(value, f"{path(name)} (chat_template)", special_tokens)
    return None


def special_tokens(directory: str | os.PathLike, found: dict[str, bytes]) -> dict[str, str]:
    """The named special tokens' strings (`bos_token`: '<bos>', ...) that `tokenizer_config.json` and
    `special_tokens_map.json` among `found` give (an entry may be a string or an {"content": ...} object)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", TOKENIZER_CONFIG):  # the tokenizer config wins
        if name not in found:
            continue
        data = files.parse_json(found[name], os.path.join(os.fspath(directory), name))
        for key in SPECIAL_TOKEN_NAMES:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


_ENVIRONMENT = None


def _environment():
    """The sandboxed Jinja environment chat templates run in, made once (as transformers configures it)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
        from jinja2.utils import Namespace

        class _BoundedEnvironment(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**"])

            def call_binop(self, context, operator, left, right):
                _tick()
                if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                        and right > 0 and right * math.log2(abs(left)) > RENDER_CHARS:
                    raise RenderLimit(f"the chat template computes {left} ** {right}, a number too large; stopped")
                if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                    _Budget.size(len(left) * right, "a value")
                if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                    _Budget.size(len(right) * left, "a value")
                return _check_size(super().call_binop(context, operator, left, right))

            def call(__self, __context, __obj, *args, **kwargs):
                _tick()
                return _check_size(super().call(__context, __obj, *args, **kwargs))

            def getattr(self, obj, attribute):
                _tick()
                return super().getattr(obj, attribute)

            def getitem(self, obj, argument):
                _tick()
                return super().getitem(obj, argument)

        def _bounded_range(*args):
            for i in safe_range(*args):
                _tick()
                yield i

        class _BoundedNamespace(Namespace):
            def __setitem__(self, name, value):
                _tick()
                super().__setitem__(name, _check_size(value))

        def _ticking(f):
            @functools.wraps(f)
            def wrapped(*args, **kwargs):
                _tick()
                return _check_size(f(*args, **kwargs))
            return wrapped

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

        env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, optimized=False,
                                  extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.filters = {name: _ticking(f) for name, f in env.filters.items()}
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.globals["range"] = _bounded_range
        env.globals["namespace"] = _BoundedNamespace
        _ENVIRONMENT = env
    return _ENVIRONMENT
