"""The HTTP face of an ``Engine``: OpenAI's chat and completions endpoints, models, health and metrics.

``create_app(engine, model_name=...)`` builds the FastAPI app; it imports FastAPI when called, so the
rest of offload_moe (the engine included) runs without the ``serve`` extra. Request bodies are checked
by ``protocol.py``; this file maps the engine's events and errors to HTTP:

- 400 (404 for an unknown model) with OpenAI's error body naming the field at fault;
- 401 for a missing or wrong bearer token when the server has an API key (``/v1/...`` only);
- 429 with ``Retry-After`` when the engine's queue is full; 503 while shutting down;
- 500 for a request whose step failed (an expert read that failed); the server serves on.

A streamed answer starts only when its first text (or error) is ready, so a request that fails in its
prefill still gets a 500; an error after that ends the stream with an error event and ``[DONE]``. A
client that disconnects cancels its request, which leaves the batch at the next step.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at runtime, and
# ``Request`` is imported inside ``create_app`` (the serve extra is optional).
import asyncio
import hmac
import json
import time

from ..errors import ConfigError
from .engine import Engine, EngineClosedError, Event, QueueFullError
from .metrics import ServeMetrics
from .protocol import BadRequest, chunk, error_body, new_id, parse_chat, parse_completion, response

INSTALL = 'offload-moe serve needs FastAPI, uvicorn and prometheus_client: pip install "offload_moe[serve]"'
DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting for a whole answer is still there
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def require_serve_extra() -> None:
    """Raise ConfigError with the install command when the ``serve`` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{INSTALL} ({e.name} is missing)") from None


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None):
    """The FastAPI app serving ``engine`` under ``model_name``; with ``api_key``, ``/v1/...`` needs
    ``Authorization: Bearer <api_key>``."""
    require_serve_extra()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="offload_moe", docs_url=None, redoc_url=None)
    metrics = ServeMetrics(engine)
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
              code: str | None = None, headers: dict | None = None):
        return JSONResponse(error_body(message, param, kind, code), status_code=status, headers=headers)

    class Guard:
        """Checks the bearer token of ``/v1/...`` requests and counts responses; plain ASGI, so a stream's
        disconnect reaches the stream unchanged."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope["path"] if scope["path"] in PATHS else "other"
            if api_key and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                    metrics.responses.labels(path, "401").inc()
                    answer = error(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                    return await answer(scope, receive, send)

            async def counted(message):
                if message["type"] == "http.response.start":
                    metrics.responses.labels(path, str(message["status"])).inc()
                await send(message)

            await self.inner(scope, receive, counted)

    app.add_middleware(Guard)

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "offload_moe"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    async def answer(http, *, chat: bool):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the request body is not valid JSON ({e})")
        try:
            req = parse_chat(body, model_name, engine.tokenizer) if chat else parse_completion(body, model_name)
        except BadRequest as e:
            return error(e.status, str(e), e.param, code=e.code)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop closed (the server stopped): nobody is listening
                pass

        try:
            job = engine.submit(req.prompt, req.params, on_event=on_event)
        except ConfigError as e:
            return error(400, str(e), "messages" if chat else "prompt")
        except QueueFullError as e:
            return error(429, str(e), kind="rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(e.retry_after)})
        except EngineClosedError as e:
            return error(503, str(e), kind="server_error", code="shutting_down")
        request_id = new_id(chat)
        try:
            first = await next_event(events, http)
        except BaseException:
            job.cancel()
            raise
        if first is None:  # the client went away while it waited
            job.cancel()
            return Response(status_code=499)
        if first.finish in ("error", "cancelled"):
            return failure(first)
        if not req.stream:
            event = first
            while event.finish is None:
                event = await next_event(events, http)
                if event is None:
                    job.cancel()
                    return Response(status_code=499)
            if event.finish in ("error", "cancelled"):
                return failure(event)
            return response(request_id, model_name, job.result(0), chat)
        return StreamingResponse(stream(job, first, events, req, request_id, chat), media_type="text/event-stream")

    def failure(event: Event):
        if event.finish == "cancelled":
            return error(503, failure_text(event), kind="server_error", code="shutting_down")
        return error(500, failure_text(event), kind="server_error", code="generation_failed")

    async def stream(job, first: Event, events: asyncio.Queue, req, request_id: str, chat: bool):
        try:
            if chat:
                yield sse(chunk(request_id, model_name, chat, role=True))
            event = first
            while True:
                if event.text:
                    yield sse(chunk(request_id, model_name, chat, text=event.text))
                if event.finish in ("error", "cancelled"):
                    yield sse(error_body(failure_text(event), kind="server_error"))
                    break
                if event.finish is not None:
                    yield sse(chunk(request_id, model_name, chat, finish=event.finish))
                    if req.include_usage:
                        yield sse(chunk(request_id, model_name, chat, usage_of=(job.prompt_tokens, len(job.tokens))))
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away: the request leaves the batch at the next step

    return app


def failure_text(event: Event) -> str:
    """What a client is told of a request that ended with an error or was cancelled by the shutdown."""
    if event.finish == "cancelled":
        return "the server shut down before this request finished"
    return f"generation failed: {event.error}"


async def next_event(events: asyncio.Queue, http) -> Event | None:
    """The job's next event, or None once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL)
        except TimeoutError:
            if await http.is_disconnected():
                return None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
