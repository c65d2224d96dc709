"""`jaxvlm serve` with a tiny text model that has a chat template (Qwen3's), through the official `openai`
client: a greedy completion is `Model.generate`'s, a chat `Model.chat`'s, with stop strings, seeds and
log-probabilities; past --max-queue, 503 with Retry-After; SIGTERM
finishes the running requests, then exits."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import urllib.request

import numpy as np
import openai
import pytest

import jaxvlm
from tests import hf_models
from tests.servers import Server, get, post
from tests.test_chat import CONVERSATION, QWEN3, STYLES

NAME = "tiny-qwen3"
PROMPTS = ["the quick brown fox", "hello jax", "a red circle above a blue square"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, qwen_tokenizer, convert_command):
    root = tmp_path_factory.mktemp("served")
    hf_dir = str(root / "hf")
    hf_models.save(hf_models.build("qwen3", seed=3, eos_token_id=1, bos_token_id=None, vocab_size=320), hf_dir)
    tok = qwen_tokenizer(hf_dir)
    tok.add_special_tokens({"additional_special_tokens": STYLES["qwen3"][1]})
    tok.chat_template = QWEN3
    tok.save_pretrained(hf_dir)
    return convert_command(hf_dir, str(root / NAME))


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server("--checkpoint", checkpoint, "--slots", "2", "--max-queue", "2", "--chunk", "4")
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def model(checkpoint):
    return jaxvlm.load(checkpoint)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_a_greedy_completion_is_generate(client, model):
    for prompt in PROMPTS:
        answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert answer.choices[0].text == model.generate(prompt, max_new_tokens=12)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.object == "text_completion"


def test_a_chat_is_model_chat(client, model):
    answer = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == model.chat(CONVERSATION, max_new_tokens=12)


def test_streaming_stop_strings_seeds_and_the_repetition_penalty(client, model):
    prompt = PROMPTS[0]
    plain = model.generate(prompt, max_new_tokens=16)
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == plain
    stop = plain[len(plain) // 2:len(plain) // 2 + 2]
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].text == model.generate(prompt, max_new_tokens=16, stop=stop)
    assert answer.choices[0].finish_reason == "stop"
    penalized = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"repetition_penalty": 1.4})
    assert penalized.choices[0].text == model.generate(prompt, max_new_tokens=12, repetition_penalty=1.4)
    sampled = [client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=7)


def test_log_probabilities(client, model):
    want = model.generate(PROMPTS[1], max_new_tokens=8, logprobs=True)
    answer = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3)
    scores = answer.choices[0].logprobs
    np.testing.assert_allclose(scores.token_logprobs, want.logprobs, atol=1e-5)
    assert all(len(top) <= 3 and max(top.values()) >= lp - 1e-5 for top, lp in zip(scores.top_logprobs,
                                                                                   scores.token_logprobs))
    chat = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and abs(c.top_logprobs[0].logprob - c.logprob) < 1e-5 for c in content)


def long_request(server, max_tokens=60) -> urllib.request.Request:
    body = {"prompt": PROMPTS[2], "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True}
    return urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def test_past_the_queue_a_503_with_retry_after(server):
    """2 slots and a queue of 2: of ten long requests at once, some are turned away, the rest answered."""
    body = {"prompt": PROMPTS[2], "max_tokens": 60, "min_tokens": 60}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(server.url + "/v1/completions", body), range(10)))
    busy = [a for a in answers if a[0] == 503]
    assert busy and all(a[2].get("retry-after") == "1" and a[1]["error"]["type"] == "server_busy" for a in busy)
    done = [a for a in answers if a[0] == 200]
    assert len(done) >= 2 and all(a[1]["usage"]["completion_tokens"] == 60 for a in done)


def test_sigterm_finishes_the_running_requests_then_exits(server):
    """The module's last: the server drains and stops."""
    lines = []
    response = urllib.request.urlopen(long_request(server, 100))
    lines.append(response.readline())
    stopper = threading.Timer(0.2, server.terminate)
    stopper.start()
    lines += response.read().decode().splitlines()
    stopper.join()
    lines = [line for line in (x.decode() if isinstance(x, bytes) else x for x in lines) if line.strip()]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert lines[-1] == "data: [DONE]"
    assert server.process.wait(60) == 0
    with pytest.raises(OSError):
        get(server.url + "/health")
