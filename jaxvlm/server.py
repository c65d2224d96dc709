"""An OpenAI-compatible HTTP server over the engine (`jaxvlm serve`), with FastAPI and uvicorn.

Endpoints as OpenAI defines them: POST /v1/completions and /v1/chat/completions (answers whole, or streamed
as server-sent events ending with `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text).

The engine runs on a thread of its own (`EngineLoop`): a request handler checks and lays out its request
(tokenizing, decoding images) in a worker thread, hands it to the loop, and awaits its events, which the
loop passes back to the handler's event loop as they come. A client's mistake is answered with a 4xx and an
OpenAI-style JSON error naming the field (`{"error": {"message", "type", "param", "code"}}`); a full queue
with 503 and Retry-After; a client that goes away cancels its request. On SIGTERM uvicorn stops taking
connections and waits for the running requests to finish; then the loop stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Callable

import jax
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxvlm import checks
from jaxvlm.chat import ROLES
from jaxvlm.engine import DEFAULT_PREFIX_CACHE_BYTES, MAX_TOP_LOGPROBS, Engine, Event, Output, Request
from jaxvlm.images import ImageError, load_image

log = logging.getLogger("jaxvlm.server")

MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit


class APIError(Exception):
    """An answer other than 200: its status, message and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        import prometheus_client as p
        self.registry = p.CollectorRegistry()
        self.requests = p.Counter("jaxvlm_requests", "Requests answered, by how they ended", ["finish_reason"],
                                  registry=self.registry)
        self.prompt_tokens = p.Counter("jaxvlm_prompt_tokens", "Prompt tokens of the requests started",
                                       registry=self.registry)
        self.generation_tokens = p.Counter("jaxvlm_generation_tokens", "Tokens generated", registry=self.registry)
        self.queue = p.Gauge("jaxvlm_queue_length", "Requests waiting for a slot", registry=self.registry)
        self.running = p.Gauge("jaxvlm_running_slots", "Slots decoding a request", registry=self.registry)
        latency = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
        self.ttft = p.Histogram("jaxvlm_time_to_first_token_seconds", "From a request's arrival to its first token",
                                buckets=latency, registry=self.registry)
        self.itl = p.Histogram("jaxvlm_inter_token_latency_seconds", "Between a request's tokens",
                               buckets=latency, registry=self.registry)

    def text(self) -> bytes:
        import prometheus_client
        return prometheus_client.generate_latest(self.registry)


class EngineLoop:
    """The engine on a thread of its own. `submit` and `cancel` (from any thread) queue commands; the loop
    applies them between steps, steps while any request runs, and sleeps on the command queue otherwise. A
    request's events go to its `sink` on the loop's thread (the handler passes them to its event loop)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.waiting = 0  # accepted and not yet in a slot (the bounded queue)
        self.sinks: dict[int, Callable[[Event], None]] = {}  # engine request id -> its sink (loop thread only)
        self.ids: dict[str, int] = {}  # the handler's key -> engine request id (loop thread only)
        self.started: set[int] = set()
        self.thread = threading.Thread(target=self._run, name="jaxvlm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.commands.put(("stop",))
        self.thread.join()

    def submit(self, request: Request, sink: Callable[[Event], None]) -> str:
        """Queues a checked request; returns its key (for `cancel`). A full queue is a 503."""
        with self.lock:
            if self.waiting >= self.max_queue:
                raise APIError(503, f"the server is busy: {self.waiting} requests are waiting for a slot "
                                    "(--max-queue); retry later", kind="server_busy", headers={"Retry-After": "1"})
            self.waiting += 1
            self.metrics.queue.set(self.waiting)
        key = uuid.uuid4().hex
        self.commands.put(("submit", key, request, sink))
        return key

    def cancel(self, key: str) -> None:
        self.commands.put(("cancel", key))

    def _left_queue(self) -> None:
        with self.lock:
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)

    def _run(self) -> None:
        while True:
            try:  # wait only when nothing runs
                command = self.commands.get(block=self.engine.idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                self._apply(command)
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.idle:
                continue
            try:
                events = self.engine.step()
            except Exception:  # a fault of the server's, not a request's: every running request ends with it
                log.exception("the engine failed; ending the requests it held")
                events = self._restart()
            for event in events:
                self._deliver(event)
            self.metrics.running.set(len(self.engine.running))

    def _apply(self, command) -> None:
        if command[0] == "submit":
            _, key, request, sink = command
            try:
                request_id = self.engine.submit(request)
            except ValueError as e:  # checked by the handler already; a second check cannot differ
                self._left_queue()
                sink(Event(-1, [], [], [], [], "error", str(e)))
                return
            self.ids[key], self.sinks[request_id] = request_id, sink
        elif command[0] == "cancel":
            request_id = self.ids.pop(command[1], None)
            if request_id is not None and self.engine.cancel(request_id):
                self.metrics.requests.labels("cancelled").inc()
                self.sinks.pop(request_id, None)
                if request_id not in self.started:
                    self._left_queue()
                self.started.discard(request_id)

    def _deliver(self, event: Event) -> None:
        if event.request_id not in self.started:
            self.started.add(event.request_id)
            self._left_queue()
        sink = self.sinks.get(event.request_id)
        if event.finish_reason is not None:
            self.sinks.pop(event.request_id, None)
            self.started.discard(event.request_id)
            self.ids = {k: v for k, v in self.ids.items() if v != event.request_id}
        if sink is not None:
            sink(event)

    def _restart(self) -> list[Event]:
        old = self.engine
        self.engine = Engine(old.model, old.slots, old.cache_size, old.chunk, old.prefix_cache_bytes,
                             old.prefill_tokens)
        ended = [Event(request_id, [], [], [], [], "error", "the server failed while running this request")
                 for request_id in list(old.running.values()) + [r for r, _ in old.queue]]
        self.engine._ids = old._ids  # ids stay unique across the restart
        return ended


# --- requests -------------------------------------------------------------------------------------------------
def _field(body: dict, name: str, kinds: tuple, default=None, check: Callable[[Any], bool] | None = None,
           want: str = ""):
    """body[name], checked: a JSON value of `kinds` (bool is never a number) for which `check` holds."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok or (check is not None and not check(value)):
        raise APIError(400, f"{name} must be {want}, got {json.dumps(value)[:80]}", name)
    return value


def settings_of(body: dict, model, chat: bool) -> dict:
    """The engine's settings of a request body (OpenAI's fields; top_k, min_tokens and repetition_penalty as
    vLLM takes them), the checkpoint's generation defaults where the body says nothing."""
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise APIError(400, f"n must be 1 (one choice a request), got {json.dumps(n)[:40]}; send the request again "
                            "with another seed for more", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0, want="a number") != 0:
            raise APIError(400, f"{name} is not supported; leave it out or 0", name)
    limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, limit, (int,), None, lambda v: v >= 1, "an integer >= 1")
    temperature = _field(body, "temperature", (int, float), None, lambda v: 0 <= v <= 100, "a number >= 0")
    top_p = _field(body, "top_p", (int, float), None, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", (int,), None, lambda v: v >= -1, "an integer (-1 or 0: all tokens)")
    seed = _field(body, "seed", (int,), None, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")
    min_tokens = _field(body, "min_tokens", (int,), None, lambda v: v >= 0, "an integer >= 0")
    penalty = _field(body, "repetition_penalty", (int, float), None, lambda v: v > 0, "a number > 0")
    stop = _field(body, "stop", (str, list), [], lambda v: v != "" if isinstance(v, str) else all(
        isinstance(s, str) and s for s in v), "a non-empty string or a list of them")
    if chat:
        logprobs = _field(body, "logprobs", (bool,), False, want="true or false")
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                     f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if top and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    else:
        top = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_COMPLETION_LOGPROBS,
                     f"an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
        logprobs, top = top is not None, top or 0
    defaults = model._settings(max_new_tokens=max_tokens, temperature=temperature,
                               top_k=top_k if top_k and top_k > 0 else None, top_p=top_p, min_new_tokens=min_tokens,
                               repetition_penalty=penalty)
    return dict(max_tokens=defaults["max_new_tokens"], temperature=defaults["temperature"], top_k=defaults["top_k"],
                top_p=defaults["top_p"], seed=secrets.randbelow(2 ** 31) if seed is None else seed,
                min_new_tokens=defaults["min_new_tokens"], repetition_penalty=defaults["repetition_penalty"],
                stop=[stop] if isinstance(stop, str) else stop,
                top_logprobs=top, logprobs=logprobs)


def _image(url: Any, where: str, allowed_media: str | None):
    """The PIL image an image_url part's url names: a data: URL, or a local file under `allowed_media`."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where} must be a non-empty string (a data: URL)", where)
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: the server does not download images ({url[:60]}); send the image as a "
                            "data: URL (data:image/png;base64,...)", where)
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data URL must be data:<type>;base64,<data>", where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{where}: the data URL's base64 is broken ({e})", where) from None
        try:
            return load_image(raw, where)
        except ImageError as e:
            raise APIError(400, str(e), where) from None
    path = url[len("file://"):] if url.startswith("file://") else url
    if allowed_media is None:
        raise APIError(400, f"{where}: local files are refused; start the server with --allowed-local-media DIR "
                            "to allow the files under DIR, or send a data: URL", where)
    real = os.path.realpath(path)
    if not os.path.isabs(path) or os.path.commonpath([real, allowed_media]) != allowed_media:
        raise APIError(400, f"{where}: {path[:80]} is not under --allowed-local-media ({allowed_media})", where)
    try:
        return load_image(real, where)
    except ImageError as e:
        raise APIError(400, str(e), where) from None


def parse_messages(messages: Any, allowed_media: str | None) -> list[dict]:
    """OpenAI's chat messages as `Model.chat` takes them: text parts kept, each image_url part a loaded image."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", where)
        if m.get("role") not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))[:40]}",
                           f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "text":
                    raise APIError(400, f"{at}.text must be a string", f"{at}.text")
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    parts.append({"type": "image", "image": _image(url, f"{at}.image_url.url", allowed_media)})
                else:
                    raise APIError(400, f"{at}.type must be text or image_url, got {json.dumps(kind)[:40]}",
                                   f"{at}.type")
            content = parts
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out


# --- answers --------------------------------------------------------------------------------------------------
def _token_text(tokenizer, token: int) -> str:
    return "" if tokenizer is None else tokenizer.decode([token])


def chat_logprobs(tokenizer, tokens, logprobs, tops) -> dict:
    entry = lambda t, lp: {"token": (s := _token_text(tokenizer, t)), "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, lp, top in zip(tokens, logprobs, tops or [[]] * len(tokens))]}


def completion_logprobs(tokenizer, tokens, logprobs, tops, offset: int) -> dict:
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets = [offset + sum(map(len, texts[:i])) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in top} for top in tops] if tops else None}


def create_app(model, name: str, slots: int = 8, cache_size: int | None = None, chunk: int = 8, max_queue: int = 64,
               allowed_local_media: str | None = None, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
    """The FastAPI app serving `model` as `name`; its engine loop starts and stops with the app."""
    if jax.process_count() > 1:  # requests reach one process; every host would have to submit them alike
        raise ValueError("the server runs on one host (its devices may form a mesh, --mesh); it cannot serve a "
                         "model spread over several hosts")
    engine = Engine(model, slots=slots, cache_size=cache_size, chunk=chunk, prefix_cache_bytes=prefix_cache_bytes)
    metrics = Metrics()
    runner = EngineLoop(engine, metrics, checks.integer("max_queue", max_queue, 0))
    allowed = None if allowed_local_media is None else os.path.realpath(allowed_local_media)
    tokenizer = model.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="jaxvlm", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     kind=kind).body(), status_code=e.status_code)

    async def read_body(request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        served = body.get("model")
        if served is not None and served != name:
            raise APIError(404, f"the model {json.dumps(served)[:80]} is not served here; this server serves "
                                f"{name!r} (GET /v1/models)", "model", kind="not_found_error",
                           code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "stream must be true or false", "stream")
        return body

    async def prepared(build: Callable[[], Request], param: str) -> Request:
        """The request `build` lays out (in a worker thread: tokenizing and images take a while), checked."""
        try:
            return await asyncio.to_thread(lambda: engine.check(build()))
        except ValueError as e:
            message = str(e)
            raise APIError(400, message, "max_tokens" if "max_tokens" in message else param) from None

    async def answer(request: HTTPRequest, build: Callable[[], Request], param: str, settings: dict, chat: bool,
                     stream: bool, include_usage: bool):
        engine_settings = {k: v for k, v in settings.items() if k != "logprobs"}
        checked = await prepared(lambda: build(**engine_settings), param)
        arrival = time.perf_counter()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        key = runner.submit(checked, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        clock = {"last": None}

        def timed(event: Event) -> None:
            now = time.perf_counter()
            if event.tokens:
                if clock["last"] is None:
                    metrics.ttft.observe(now - arrival)
                    metrics.prompt_tokens.inc(len(checked.tokens))
                else:
                    for _ in event.tokens:
                        metrics.itl.observe((now - clock["last"]) / len(event.tokens))
                clock["last"] = now
                metrics.generation_tokens.inc(len(event.tokens))
            if event.finish_reason is not None:
                metrics.requests.labels(event.finish_reason).inc()

        def usage(out: Output) -> dict:
            return {"prompt_tokens": len(checked.tokens), "completion_tokens": len(out.tokens),
                    "total_tokens": len(checked.tokens) + len(out.tokens)}

        def failed(event: Event) -> APIError:
            return APIError(500, f"the request failed: {event.error}", kind="server_error")

        if stream:
            async def chunks():
                out, done = Output(), False
                try:
                    if chat:
                        yield _sse(_chunk(ident, created, name, chat, {"role": "assistant", "content": ""}, None))
                    while not done:
                        event = await events.get()
                        timed(event)
                        if event.finish_reason == "error":
                            done = True
                            yield _sse(failed(event).body())
                            break
                        for i, piece in enumerate(event.pieces):
                            scores = None
                            if settings["logprobs"]:
                                top = event.top_logprobs[i:i + 1] or None
                                one = ([event.tokens[i]], [event.logprobs[i]], top)
                                scores = chat_logprobs(tokenizer, *one) if chat else completion_logprobs(
                                    tokenizer, *one, len(out.text))
                            last = i == len(event.pieces) - 1 and event.finish_reason is not None
                            if piece or scores is not None or last:
                                yield _sse(_chunk(ident, created, name, chat, {"content": piece} if chat else piece,
                                                  scores, event.finish_reason if last else None))
                            out.text += piece
                        out.tokens += event.tokens
                        if event.finish_reason is not None:
                            done = True
                            if not event.pieces:  # ended with no token of its own (a stop string's tail)
                                yield _sse(_chunk(ident, created, name, chat, {} if chat else "", None,
                                                  event.finish_reason))
                    if include_usage:
                        yield _sse({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "created": created, "model": name, "choices": [], "usage": usage(out)})
                    yield "data: [DONE]\n\n"
                finally:
                    if not done:  # the client went away: its slot is freed
                        runner.cancel(key)

            return StreamingResponse(chunks(), media_type="text/event-stream")

        out = Output()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        runner.cancel(key)
                        return Response(status_code=499)
                    continue
                timed(event)
                if event.finish_reason == "error":
                    raise failed(event)
                out.add(event)
                if event.finish_reason is not None:
                    out.finish_reason = event.finish_reason
                    break
        except asyncio.CancelledError:
            runner.cancel(key)
            raise
        scores = None
        if settings["logprobs"]:
            tops = out.top_logprobs if checked.top_logprobs else None
            scores = chat_logprobs(tokenizer, out.tokens, out.logprobs, tops) if chat else completion_logprobs(
                tokenizer, out.tokens, out.logprobs, tops, 0)
        choice = {"index": 0, "logprobs": scores, "finish_reason": out.finish_reason}
        choice.update({"message": {"role": "assistant", "content": out.text}} if chat else {"text": out.text})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": [choice], "usage": usage(out)}

    def include_usage(body: dict) -> bool:
        options = _field(body, "stream_options", (dict,), {}, want="an object")
        return bool(body.get("stream")) and _field(options, "include_usage", (bool,), False, want="true or false")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string (one prompt a request)", "prompt")
        settings = settings_of(body, model, chat=False)
        return await answer(request, lambda **s: engine.request(prompt, **s), "prompt", settings, False,
                            body.get("stream", False), include_usage(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request)
        settings = settings_of(body, model, chat=True)
        messages = await asyncio.to_thread(parse_messages, body.get("messages"), allowed)

        def build(**s):
            prompt, image, add_bos = model.chat_prompt(messages)
            return engine.request(prompt, image, add_bos, **s)

        return await answer(request, build, "messages", settings, True, body.get("stream", False),
                            include_usage(body))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "jaxvlm",
                                            "max_model_len": engine.context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    app.state.engine_loop = runner
    return app


def _chunk(ident: str, created: int, name: str, chat: bool, delta, logprobs, finish_reason=None) -> dict:
    choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
    choice.update({"delta": delta} if chat else {"text": delta})
    return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": name, "choices": [choice]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(model, name: str, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    """Serves until SIGTERM or Ctrl-C, which stop taking requests, finish the running ones, then return."""
    import signal
    import sys
    import uvicorn
    app = create_app(model, name, **settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
    # uvicorn handles the signal (the drain), then raises it again once done: the process then exits 0
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: sys.exit(0))
    uvicorn.Server(config).run()
