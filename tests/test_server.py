"""`jaxvlm serve` with the built-in vision-language model, through the official `openai` client: a chat of
one user message is its plain prompt, images come as data: URLs or allowed local files, answers equal
`Model.chat`'s, sixteen clients at once, a client that goes away frees its slot; and every kind of bad request gets a 4xx naming its field while
the server keeps serving."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import time

import openai
import pytest

import jaxvlm
from tests.servers import Server, get, post

IMAGE = os.path.abspath("examples/shapes.png")
NAME = "jaxvlm-shapes"
with open(IMAGE, "rb") as f:
    DATA_URL = "data:image/png;base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def server():
    s = Server("--slots", "4", "--allowed-local-media", os.path.dirname(IMAGE))
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()  # no client's mistake shows up as one


@pytest.fixture(scope="module")
def model():
    return jaxvlm.load()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def ask(text: str, url: str = DATA_URL) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_a_chat_with_an_image_as_a_data_url_is_model_chat(client, model):
    answer = client.chat.completions.create(model=NAME, messages=ask("caption en"), max_tokens=20, temperature=0)
    want = model.chat([{"role": "user", "content": [{"type": "image", "path": IMAGE},
                                                    {"type": "text", "text": "caption en"}]}], max_new_tokens=20)
    assert answer.choices[0].message.content == want == model.generate("caption en", image=IMAGE, max_new_tokens=20)
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == len(model.generate("caption en", image=IMAGE, max_new_tokens=20,
                                                                logprobs=True).token_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model == NAME and answer.object == "chat.completion"


def test_a_streamed_chat_ends_with_done(client, model, server):
    chunks = list(client.chat.completions.create(model=NAME, messages=ask("caption en"), max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == model.generate("caption en", image=IMAGE, max_new_tokens=20)
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["stop"] and chunks[-1].usage.completion_tokens > 3
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # a piece a token
    import urllib.request
    body = json.dumps({"messages": ask("caption en"), "max_tokens": 5, "stream": True}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.read().decode().rstrip().endswith("data: [DONE]")


def test_a_local_file_under_the_allowed_folder(client, model):
    answer = client.chat.completions.create(model=NAME, messages=ask("count shapes", "file://" + IMAGE),
                                            max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == model.generate("count shapes", image=IMAGE, max_new_tokens=10)


def test_sixteen_clients_at_once_get_their_own_answers(client, model):
    questions = ["caption en", "count shapes", "what color is the circle?", "where is the square?"] * 4

    def one(i):
        return client.chat.completions.create(model=NAME, messages=ask(questions[i]), max_tokens=16,
                                              temperature=0).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    want = {q: model.generate(q, image=IMAGE, max_new_tokens=16) for q in set(questions)}
    assert got == [want[q] for q in questions]


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert get(server.url + "/health") == (200, b'{"status":"ok"}')
    status, text = get(server.url + "/metrics")
    text = text.decode()
    assert status == 200
    for name in ("jaxvlm_requests_total{finish_reason=\"stop\"}", "jaxvlm_generation_tokens_total",
                 "jaxvlm_prompt_tokens_total", "jaxvlm_queue_length", "jaxvlm_running_slots",
                 "jaxvlm_time_to_first_token_seconds_bucket", "jaxvlm_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_a_client_that_goes_away_frees_its_slot(server, client):
    before = metric(server, 'jaxvlm_requests_total{finish_reason="cancelled"}')
    ran_out = metric(server, 'jaxvlm_requests_total{finish_reason="length"}')
    """Two long answers (their end-of-sequence barred), each left after its first token."""
    body = json.dumps({"messages": ask("caption en"), "max_tokens": 180, "min_tokens": 180, "stream": True})
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            seen = b""
            while b"data: " not in seen:  # the first token came; then the client goes away
                seen += s.recv(4096)
            s.shutdown(socket.SHUT_RDWR)
    deadline = time.time() + 30
    while metric(server, 'jaxvlm_requests_total{finish_reason="cancelled"}') < before + 2:
        assert time.time() < deadline, get(server.url + "/metrics")[1].decode()
        time.sleep(0.1)
    assert metric(server, "jaxvlm_running_slots") == 0
    assert metric(server, 'jaxvlm_requests_total{finish_reason="length"}') == ran_out  # none ran to its end


def metric(server, name: str) -> float:
    text = get(server.url + "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()


@pytest.mark.parametrize("body, status, param, message", [
    (dict(messages=ask("caption en"), max_tokens=-3), 400, "max_tokens", "max_tokens must be an integer >= 1"),
    (dict(messages=ask("caption en"), max_tokens=10 ** 6), 400, "max_tokens", "longer than the model's context"),
    (dict(messages=[]), 400, "messages", "messages must be a non-empty list"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "must be one of"),
    (dict(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400,
     "messages[0].content[0].type", "must be text or image_url"),
    (dict(messages=ask("caption en", "data:image/png;base64,@@@")), 400, "messages[0].content[0].image_url.url",
     "base64 is broken"),
    (dict(messages=ask("caption en", NOT_AN_IMAGE)), 400, "messages[0].content[0].image_url.url",
     "cannot read the image"),
    (dict(messages=ask("caption en", "file:///etc/hostname")), 400, "messages[0].content[0].image_url.url",
     "not under --allowed-local-media"),
    (dict(messages=ask("caption en", "https://example.com/cat.png")), 400, "messages[0].content[0].image_url.url",
     "does not download images"),
    (dict(messages=ask("caption en"), model="gpt-4o"), 404, "model", "is not served here"),
    (dict(messages=ask("caption en"), n=3), 400, "n", "n must be 1"),
    (dict(messages=ask("caption en"), temperature="hot"), 400, "temperature", "temperature must be a number"),
    (dict(messages=ask("caption en"), top_logprobs=50, logprobs=True), 400, "top_logprobs", "in [0, 20]"),
    (b'{"messages": [', 400, None, "not valid JSON"),
])
def test_a_bad_request_is_named_and_the_server_goes_on(server, body, status, param, message):
    got, answer, _ = post(server.url + "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["param"] == param and message in error["message"], error
    assert set(error) >= {"message", "type", "param"}
    got, answer, _ = post(server.url + "/v1/chat/completions", dict(messages=ask("count shapes"), max_tokens=4))
    assert got == 200 and answer["choices"][0]["message"]["content"]


def test_an_unknown_route_is_a_json_404(server):
    status, body = get(server.url + "/v1/engines")
    assert status == 404 and "error" in json.loads(body)


def readme_blocks(language: str) -> list[str]:
    text = open("README.md").read()
    section = text[text.index("## Serving: `jaxvlm serve`"):]
    section = section[:section.index("\n## ", 5)]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_the_readme_snippets_run_as_written(server, model):
    start, curl = readme_blocks("bash")
    assert start.split("#")[0].split() == ["jaxvlm", "serve", "--port", "8000"]
    out = subprocess.run(["bash", "-c", curl.replace("localhost:8000", f"127.0.0.1:{server.port}")],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == model.generate(
        "caption en", image=IMAGE, max_new_tokens=20)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(readme_blocks("python")[0].replace("http://localhost:8000", server.url), {})
    assert printed.getvalue() == (model.generate("count shapes", image=IMAGE, max_new_tokens=20) + "\n" +
                                  model.generate("where is the square?", image=IMAGE, max_new_tokens=20))


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "wizard=2"], "give each axis once as name=size"),
    (["--mesh", "data=3"], "3 devices, but there are 1"),
    (["--prefix-cache-mib", "-1"], "--prefix-cache-mib must be >= 0"),
    (["--allowed-local-media", "no/such/folder"], "not a folder"),
])
def test_bad_serve_flags_are_named(flags, message):
    from jaxvlm.cli import main
    with pytest.raises(SystemExit, match=message):
        main(["serve", *flags])
