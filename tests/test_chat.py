"""Chat templates: rendered as transformers' apply_chat_template renders them, tokenized and answered as
transformers would; and what a bad conversation or a checkpoint without a template gets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jaxvlm
from jaxvlm import chat as chat_module
from convert import convert
from tests import hf_models

# Written after the published templates of each family (shortened): roles, special tokens as text,
# raise_exception, loop variables, namespace and a template variable (Qwen3's enable_thinking).
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
QWEN3 = """{%- set ns = namespace(last_user=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
        {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_user %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
        {{- message.content | trim + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

STYLES = {  # family -> (template, its control tokens, whether it takes a system message)
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], False),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], True),
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], True),
}
CONVERSATION = [{"role": "user", "content": "the quick brown fox"},
                {"role": "assistant", "content": "jumps over the lazy dog "},
                {"role": "user", "content": "hello jax, é ü"}]


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, gemma_tokenizer, qwen_tokenizer):
    """family -> (transformers model, its tokenizer with the chat template, the converted jaxvlm Model)."""
    out = {}
    for family, (template, controls, _) in STYLES.items():
        root = tmp_path_factory.mktemp(f"chat-{family}")
        hf_dir = str(root / "hf")
        # the byte-level tokenizer has 256 pieces and more; the control tokens come after them
        model = hf_models.build(family, seed=3, eos_token_id=1, bos_token_id=None if family == "qwen3" else 2,
                                vocab_size=320)
        hf_models.save(model, hf_dir)
        tok = qwen_tokenizer(hf_dir) if family == "qwen3" else gemma_tokenizer(hf_dir)
        tok.add_special_tokens({"additional_special_tokens": controls})
        tok.chat_template = template
        tok.save_pretrained(hf_dir)
        out[family] = (model, tok, jaxvlm.load(convert(hf_dir, str(root / "jax"), progress=False)))
    return out


@pytest.mark.parametrize("family", list(STYLES))
def test_chat_template_renders_tokenizes_and_answers_as_transformers(chat_models, family):
    model, tok, jx = chat_models[family]
    messages = ([{"role": "system", "content": "answer briefly"}] if STYLES[family][2] else []) + CONVERSATION
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert jx.apply_chat_template(messages) == want
    assert jx.apply_chat_template(messages, add_generation_prompt=False) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
    assert list(jx.processor.encode(want, None, False).input_ids[0]) == ids
    hf_ids = hf_models.hf_generate(model, [np.asarray(ids)], 10, do_sample=False, eos_token_id=1)[0]
    assert jx.chat(messages, max_new_tokens=10) == tok.decode(hf_ids[hf_ids != 0], skip_special_tokens=True)
    assert "".join(jx.chat(messages, max_new_tokens=10, stream=True)) == jx.chat(messages, max_new_tokens=10)


def test_template_variables_reach_the_template(chat_models):
    _, tok, jx = chat_models["qwen3"]
    assert jx.apply_chat_template(CONVERSATION, enable_thinking=False) == tok.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert jx.apply_chat_template(CONVERSATION, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


def test_template_from_tokenizer_config(chat_models, tmp_path):
    """Older checkpoints keep the template in tokenizer_config.json (a string, or named templates)."""
    _, tok, jx = chat_models["phi3"]
    folder = tmp_path / "m"
    jx.save(folder)
    os.remove(folder / "chat_template.jinja")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": PHI3}, {"name": "tool_use", "template": "x"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = jaxvlm.load(folder, verify=False)
    assert loaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION, tokenize=False,
                                                                               add_generation_prompt=True)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "narrator", "content": "hi"}], "message 0 has unknown role 'narrator'"),
    ([{"role": "user", "content": ["hi"]}], r"message 0 \(user\): content part 0 must be a dict with 'type'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], r"message 0 \(user\): content part 0 must be a dict"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"content part 0 \(text\) needs a string 'text'"),
    ([{"role": "user", "content": None}], r"message 0 \(user\): content must be a string or a list of parts, got None"),
    ([{"role": "user", "content": 3}], r"message 0 \(user\): content must be a string or a list of parts, got int"),
    ([{"role": "user", "content": "x", "when": object()}], r"message 0.when: a template reads plain data"),
    ([{"role": "user"}], "message 0 must be a dict with 'role' and 'content'"),
    ([], "messages is empty"),
    ("hello", "messages must be a list"),
])
def test_bad_messages_are_named(chat_models, messages, message):
    jx = chat_models["phi3"][2]
    with pytest.raises(ValueError, match=message):
        jx.apply_chat_template(messages)
    with pytest.raises(ValueError, match=message):
        jx.chat(messages)


def test_the_template_refusing_a_conversation_is_one_line(chat_models):
    jx = chat_models["gemma"][2]
    with pytest.raises(ValueError, match="chat_template.jinja: the chat template refused the messages "
                                         r"\(TemplateError: System role not supported\)"):
        jx.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_a_checkpoint_without_a_chat_template():
    """One user message is its plain prompt (the built-in model's); a longer conversation is refused."""
    model = jaxvlm.load()
    image = "examples/shapes.png"
    message = {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": "count shapes"}]}
    assert model.chat([message], max_new_tokens=8) == model.generate("count shapes", image=image, max_new_tokens=8)
    with pytest.raises(ValueError, match="has no chat template"):
        model.chat([message, {"role": "assistant", "content": "3"}, {"role": "user", "content": "and?"}])


TOOLS_TEMPLATE = """{%- if tools %}<|tools|>{{ tools | tojson }}{% endif %}
{%- if documents %}{% for d in documents %}<|doc|>{{ d.title }}: {{ d.text }}{% endfor %}{% endif %}
{%- for message in messages %}<|{{ message.role }}|>
{%- if message.content is string %}{{ message.content }}
{%- elif message.content %}{% for part in message.content %}{% if part.type == 'text' %}{{ part.text }}
{%- else %}<|image|>{% endif %}{% endfor %}{% endif %}
{%- for call in message.tool_calls or [] %}<|call|>{{ call.function.name }}({{ call.function.arguments | tojson }})
{%- endfor %}{% if message.name %} [{{ message.name }}]{% endif %}<|end|>{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

TOOL_CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "tool_calls": [{"type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "get_weather", "content": "sunny, 21 C"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
DOCUMENTS = [{"title": "Paris", "text": "the capital of France"}]


def test_tool_calls_tools_and_documents_reach_the_template_as_transformers_passes_them(chat_models):
    _, tok, _ = chat_models["phi3"]
    template = chat_module.ChatTemplate(TOOLS_TEMPLATE, "tools.jinja", {})
    want = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, documents=DOCUMENTS, tokenize=False,
                                   add_generation_prompt=True, chat_template=TOOLS_TEMPLATE)
    assert template.render(TOOL_CONVERSATION, tools=TOOLS, documents=DOCUMENTS) == want
    assert "<|call|>get_weather" in want and "[get_weather]" in want and "<|doc|>Paris" in want


def _folder_with_template(chat_models, tmp_path, template: str):
    folder = tmp_path / "m"
    chat_models["phi3"][2].save(folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def test_a_template_is_compiled_at_first_use_and_never_folds_constants(chat_models, tmp_path):
    """jinja2 folds constants when it compiles: an enormous power in a branch never taken would hang the
    load of the folder."""
    folder = _folder_with_template(chat_models, tmp_path, "{% if false %}{{ 'x' * 10 ** 10 ** 10 }}{% endif %}"
                                                          "{% for m in messages %}{{ m.content }}{% endfor %}")
    model = jaxvlm.load(folder, verify=False)
    assert model.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    bad = _folder_with_template(chat_models, tmp_path / "b", "{% for %}")
    loaded = jaxvlm.load(bad, verify=False)  # as transformers: a broken template fails where it is used
    with pytest.raises(ValueError, match=r"chat_template.jinja: not a valid Jinja template"):
        loaded.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template, message", [
    ("{{ 10 ** 100000000 }}", r"computes 10 \*\* 100000000, a number too large; stopped"),
    ("{{ 'x' * 10 ** 9 }}", r"made a value longer than 16,777,216 characters; stopped"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
     r"made a value longer than 16,777,216 characters"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"rendering the chat template took more than 0.5 s; stopped"),
    ("{% for i in range(100000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
     r"(its output longer than|took more than)"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"recursed too deeply"),
    ("{{ 1 + 'a' }}", r"the chat template failed \(TypeError: unsupported operand"),
    ("{{ 1 / 0 }}", r"the chat template failed \(ZeroDivisionError: division by zero\)"),
])
def test_rendering_is_bounded_and_any_error_names_the_template(monkeypatch, template, message):
    if "took more than" in message:  # the time bound shortened where it is what stops the rendering (elsewhere
        monkeypatch.setattr(chat_module, "RENDER_SECONDS", 0.5)  # a loaded machine would meet it first)
    with pytest.raises(ValueError, match=rf"^bounded.jinja: (the chat template )?.*{message}"):
        chat_module.ChatTemplate(template, "bounded.jinja", {}).render([{"role": "user", "content": "7"}])
