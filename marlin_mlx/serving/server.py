"""The OpenAI-compatible HTTP server: Starlette routes over the continuous-batching Engine.

The engine runs in its own thread and reports each request's progress through a callback;
`_Bridge` hands those events to the request's coroutine through a per-request
asyncio.Queue (`loop.call_soon_threadsafe`, once per batch of events). Each generation
response watches the ASGI receive channel while it waits, so a client that goes away has its
request aborted (and its KV blocks freed) at once, even before its first token.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (server-sent
events with `stream: true`), GET /health, GET /metrics (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import Counter, deque
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import protocol as P

log = logging.getLogger("marlin_mlx.serve")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _error(status: int, message: str, type: str = "invalid_request_error",
           param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(P.error_body(message, type, param, code), status_code=status)


class _Dispatcher:
    """Hands engine-thread events to the server's event loop.

    One `loop.call_soon_threadsafe` per batch of events rather than per event: a decode step
    of 32 requests then wakes the loop once, not 32 times (each wake-up is a syscall and
    takes the GIL from the engine thread).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending = deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, event) -> None:  # runs on the engine thread
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _drain(self) -> None:  # runs on the loop
        with self.lock:
            items = list(self.pending)
            self.pending.clear()
            self.scheduled = False
        for queue, event in items:
            queue.put_nowait(event)


class _Bridge:
    """The engine's on_event callback for one request: into its asyncio.Queue."""

    def __init__(self, dispatcher: _Dispatcher):
        self.dispatcher = dispatcher
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:  # runs on the engine thread
        self.dispatcher.post(self.queue, event)


_GONE = object()  # queued by the disconnect watcher to wake the response


class _GenerationResponse(Response):
    """Streams (SSE) or collects one engine request; aborts it if the client disconnects."""

    def __init__(self, state: "_State", req: P.GenerationRequest, rid, bridge: _Bridge):
        self.state, self.req, self.rid, self.bridge = state, req, rid, bridge
        self.id = P.new_id(req.kind)
        self.created = P.now()
        self.finished = False  # the engine has sent its last event, or was told to abort
        self.gone = False  # the client disconnected
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            if self.req.stream:
                await self._stream(send)
            else:
                await self._whole(send)
        except OSError:  # the connection broke while sending
            pass
        finally:
            watcher.cancel()
            if not self.finished:
                self.finished = True
                self.state.abort(self.rid)

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                if not self.finished:
                    self.finished = True
                    self.state.abort(self.rid)
                self.bridge.queue.put_nowait(_GONE)
                return

    async def _events(self):
        """Yield lists of engine events (everything queued at once), until the request ends."""
        queue = self.bridge.queue
        while True:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            if any(e is _GONE for e in events):
                return
            done = events[-1].finish_reason is not None
            if done:
                self.finished = True  # the engine is done with it: nothing to abort
            yield events
            if done:
                return

    async def _whole(self, send) -> None:
        parts, last = [], None
        async for events in self._events():
            parts += [e.text for e in events if e.text]
            last = events[-1]
        if last is None or self.gone:  # the client went away
            return
        if last.finish_reason not in ("stop", "length"):
            status, body = self._failure(last)
        else:
            build = P.completion_response if self.req.kind == "completion" else P.chat_response
            status, body = 200, build(self.id, self.req.model, self.created, "".join(parts),
                                      last.finish_reason, last.prompt_tokens,
                                      last.completion_tokens)
        await JSONResponse(body, status_code=status)({"type": "http"}, None, send)

    def _failure(self, event) -> tuple:
        msg = getattr(event, "error", None) or f"the request ended: {event.finish_reason}"
        return 500, P.error_body(str(msg), "server_error", None, event.finish_reason)

    async def _stream(self, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]
                    + [(k.encode(), v.encode()) for k, v in _SSE_HEADERS.items()]})
        req, chat = self.req, self.req.kind == "chat"
        args = (self.id, req.model, self.created)
        u = req.include_usage
        if chat:  # the first chunk names the role, as OpenAI's does
            await self._send(send, P.chat_chunk(*args, {"role": "assistant", "content": ""},
                                                None, u))
        last = None
        async for events in self._events():
            text = "".join(e.text for e in events if e.text)
            last = events[-1]
            if last.finish_reason not in (None, "stop", "length"):
                await self._send(send, self._failure(last)[1])
                break
            if text:
                chunk = (P.chat_chunk(*args, {"content": text}, None, u) if chat
                         else P.completion_chunk(*args, text, None, u))
                await self._send(send, chunk)
            if last.finish_reason is not None:
                chunk = (P.chat_chunk(*args, {}, last.finish_reason, u) if chat
                         else P.completion_chunk(*args, "", last.finish_reason, u))
                await self._send(send, chunk)
                if u:
                    await self._send(send, P.usage_chunk(req.kind, *args, last.prompt_tokens,
                                                         last.completion_tokens))
        if last is None or self.gone:  # the client went away
            return
        await send({"type": "http.response.body", "body": P.SSE_DONE, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _send(send, obj) -> None:
        await send({"type": "http.response.body", "body": P.sse(obj), "more_body": True})


MAX_BODY_BYTES = 32 * 2**20  # far above any prompt that fits a context


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise P.APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise P.APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _State:
    """What the routes share: the engine, the served model's name and tokenizer, counters."""

    def __init__(self, engine, model_name: str, api_key: Optional[str], tokenizer):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        model = getattr(engine, "model", None)
        self.vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)
        blocks, size = getattr(engine, "num_kv_blocks", None), getattr(engine, "block_size", None)
        self.pool_tokens = blocks * size if blocks and size else None
        self.created = P.now()
        self.started = time.time()
        self.http = Counter()  # (route, status) -> count
        self.aborted = 0
        self.dispatcher: Optional[_Dispatcher] = None

    def abort(self, rid) -> None:
        self.aborted += 1
        try:
            self.engine.abort(rid)
        except Exception:  # the request may have finished meanwhile
            log.debug("abort of %s failed", rid, exc_info=True)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode()):
            raise P.APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                             "invalid_request_error", None, "invalid_api_key")


def create_app(engine, model_name: str, api_key: Optional[str] = None, *,
               tokenizer=None) -> Starlette:
    """The ASGI app over a started (or soon started) `Engine`.

    model_name: the id clients must send as `model` (and that /v1/models lists).
    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    tokenizer: defaults to the engine's.
    """
    state = _State(engine, model_name, api_key, tokenizer)

    async def generation(request: Request, parse) -> Response:
        state.check_key(request)
        body = P.parse_json(await _read_body(request))
        # tokenizing or templating a long prompt takes a while: off the event loop
        req = await run_in_threadpool(parse, body, served_model=state.model_name,
                                      tokenizer=state.tokenizer,
                                      max_model_len=state.engine.max_model_len,
                                      vocab_size=state.vocab_size,
                                      pool_tokens=state.pool_tokens)
        from .engine import SamplingParams

        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, seed=req.seed, stop=list(req.stop))
        loop = asyncio.get_running_loop()
        if state.dispatcher is None or state.dispatcher.loop is not loop:
            state.dispatcher = _Dispatcher(loop)
        bridge = _Bridge(state.dispatcher)
        try:
            rid = state.engine.submit(req.prompt_ids, params, bridge)
        except ValueError as e:
            raise P.bad(" ".join(str(e).split()), "prompt", "invalid_value") from None
        return _GenerationResponse(state, req, rid, bridge)

    async def completions(request: Request) -> Response:
        return await generation(request, P.parse_completion)

    async def chat_completions(request: Request) -> Response:
        return await generation(request, P.parse_chat)

    async def models(request: Request) -> Response:
        state.check_key(request)
        return JSONResponse(P.models_list(state.model_name, state.created))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        state.check_key(request)
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: P.APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else None
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                      "invalid_request_error", None, kind)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}",
                      "server_error")

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        P.APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.marlin = state

    async def count(scope, receive, send):  # per-route status counters for /metrics
        status = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await app_inner(scope, receive, send_counted)
        finally:
            if scope["type"] == "http":  # unknown paths share one label: bounded cardinality
                path = scope["path"] if scope["path"] in paths else "other"
                state.http[(path, status.get("code", 0))] += 1

    paths = {r.path for r in routes}

    app_inner = app.build_middleware_stack()
    app.middleware_stack = count
    return app


# (metric name, engine key, type, help)
_ENGINE_METRICS = [
    ("marlin_mlx_requests_waiting", "queue_length", "gauge", "Requests waiting to be scheduled."),
    ("marlin_mlx_requests_running", "running", "gauge", "Requests in the running batch."),
    ("marlin_mlx_kv_blocks_used", "kv_blocks_used", "gauge", "KV cache blocks in use."),
    ("marlin_mlx_kv_blocks_total", "kv_blocks_total", "gauge", "KV cache blocks in the pool."),
    ("marlin_mlx_tokens_per_second", "tokens_per_second", "gauge",
     "Generated tokens per second (recent)."),
    ("marlin_mlx_prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens", "counter",
     "Prompt tokens served from the prefix cache."),
    ("marlin_mlx_preemptions_total", "preemptions_total", "counter",
     "Running requests preempted for lack of KV blocks."),
    ("marlin_mlx_requests_finished_total", "requests_finished_total", "counter",
     "Requests finished by the engine."),
    ("marlin_mlx_generation_tokens_total", "generated_tokens_total", "counter",
     "Tokens generated."),
    ("marlin_mlx_decode_steps_total", "decode_steps_total", "counter", "Batched decode steps."),
    ("marlin_mlx_decode_rows_total", "decode_rows_total", "counter",
     "Sequences summed over decode steps (divided by the steps: the mean batch)."),
]
# engine-thread time by phase, as one labelled counter
_PHASES = ("prefill", "build", "wait", "emit")


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render_metrics(state: _State) -> str:
    """Prometheus text exposition of the engine's metrics and the server's counters."""
    m = dict(state.engine.metrics())
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    known = set()
    for name, key, kind, help_ in _ENGINE_METRICS:
        if key in m and m[key] is not None:
            known.add(key)
            metric(name, kind, help_, [f"{name} {_fmt(m[key])}"])
    phases = [(p, m[f"{p}_seconds_total"]) for p in _PHASES if f"{p}_seconds_total" in m]
    if phases:
        known.update(f"{p}_seconds_total" for p, _ in phases)
        metric("marlin_mlx_engine_seconds_total", "counter",
               "Engine-thread seconds by phase: prefill chunks, building and launching decode "
               "steps, waiting for a step's tokens, emitting them.",
               [f'marlin_mlx_engine_seconds_total{{phase="{p}"}} {_fmt(v)}' for p, v in phases])
    used, total = m.get("kv_blocks_used"), m.get("kv_blocks_total")
    if used is not None and total:
        metric("marlin_mlx_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use.",
               [f"marlin_mlx_kv_cache_usage_ratio {_fmt(used / total)}"])
    for key in sorted(set(m) - known):  # whatever else the engine reports, as gauges
        if isinstance(m[key], (int, float)) and not isinstance(m[key], bool):
            name = "marlin_mlx_engine_" + "".join(c if c.isalnum() else "_" for c in key)
            metric(name, "gauge", f"Engine metric {key}.", [f"{name} {_fmt(m[key])}"])
    metric("marlin_mlx_client_aborts_total", "counter",
           "Requests aborted because the client disconnected.",
           [f"marlin_mlx_client_aborts_total {state.aborted}"])
    samples = [f'marlin_mlx_http_requests_total{{path="{path}",status="{code}"}} {n}'
               for (path, code), n in sorted(state.http.items())]
    metric("marlin_mlx_http_requests_total", "counter", "HTTP requests by path and status.",
           samples)
    metric("marlin_mlx_uptime_seconds", "gauge", "Seconds since the server started.",
           [f"marlin_mlx_uptime_seconds {_fmt(time.time() - state.started)}"])
    return "\n".join(lines) + "\n"


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          max_batch_size: int = 32, num_kv_blocks: Optional[int] = None, block_size: int = 16,
          max_waiting_time: float = 0.05, scheduler: str = "fifo", api_key: Optional[str] = None,
          max_model_len: Optional[int] = None, prefill_chunk: int = 512,
          enable_prefix_cache: bool = True, log_level: str = "info",
          distributed: bool = False) -> None:
    """Load `model`, start the engine and serve the API with uvicorn until interrupted.

    With `distributed`, every rank of the `mx.distributed` group (started by `mlx.launch`)
    loads its shard; rank 0 serves and sends each engine step to the other ranks, which run
    the same step on their shards until rank 0 stops."""
    import uvicorn

    from marlin_mlx.loader import load

    from .engine import Engine

    group = factory = None
    if distributed:
        from marlin_mlx import distributed as dist

        group = dist.init()
        mdl, tokenizer = load(model, group=group)
        if group.rank() > 0:
            dist.follow(mdl, group)
            return
        factory = dist.runner_factory(group)
    else:
        mdl, tokenizer = load(model)
    engine = Engine(mdl, tokenizer, max_batch_size=max_batch_size, num_kv_blocks=num_kv_blocks,
                    block_size=block_size, max_waiting_time=max_waiting_time,
                    scheduler=scheduler, max_model_len=max_model_len,
                    prefill_chunk=prefill_chunk, enable_prefix_cache=enable_prefix_cache,
                    runner_factory=factory)
    app = create_app(engine, model_name or model, api_key, tokenizer=tokenizer)
    engine.start()
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run()
    finally:
        engine.stop()
        if group is not None:
            engine.runner.close()  # releases the followers


def metrics_snapshot(text: str) -> dict:
    """Parse Prometheus text into {name: value} ('name{label="x"}' for labelled samples);
    for tests and tools."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


__all__ = ["create_app", "serve", "render_metrics", "metrics_snapshot"]
