"""The OpenAI-compatible REST server (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (plain JSON, or SSE with ``"stream": true``:
``data: {chunk}`` lines ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.
With an API key, ``/v1/*`` needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open for probes.

Engine events arrive on the engine thread and are handed to the request's event loop with
``call_soon_threadsafe``, so no thread ever blocks per request, whatever the number of concurrent clients.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from paddle_llm.serving.engine import FINISH_ERROR, Completion, StreamEvent
from paddle_llm.serving.metrics import ServingMetrics
from paddle_llm.serving.openai_api import LocalBackend, RequestError, check_finished, parse_json_body

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def check_api_key(request: Request, api_key: str | None) -> None:
    """Raises: RequestError 401 unless the request carries ``Authorization: Bearer <api_key>``."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError("missing or wrong API key; send 'Authorization: Bearer <key>'", status=401,
                           error_type="authentication_error", code="invalid_api_key")


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def add_common_routes(app: FastAPI, metrics: ServingMetrics) -> None:
    """``/health`` and ``/metrics``, shared by the engine app and the FastDeploy proxy."""

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError):
        return error_response(err)


def create_app(backend: LocalBackend, metrics: ServingMetrics, api_key: str | None = None) -> FastAPI:
    """The REST app over a local engine.

    Args:
        backend: validation and the engine (see ``openai_api.LocalBackend``).
        metrics: where requests, tokens and latencies are counted.
        api_key: require this Bearer token on ``/v1/*`` (None: open).
    """
    app = FastAPI(title="paddle_llm", docs_url=None, redoc_url=None)
    protocol = backend.protocol
    add_common_routes(app, metrics)

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, api_key)
        return protocol.models()

    async def generate(request: Request, kind: str, endpoint: str) -> Response:
        try:
            check_api_key(request, api_key)
            prepared = backend.prepare(kind, parse_json_body(await request.body()))
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[StreamEvent] = asyncio.Queue()
            handle = backend.submit(prepared, listener=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except RequestError as err:
            metrics.record_request("http", endpoint, err.status)
            return error_response(err)
        request_id = protocol.new_id(kind)

        def record(last: StreamEvent, status: int) -> None:
            metrics.record_request("http", endpoint, status)
            first = None if handle.first_token_time is None else handle.first_token_time - handle.created
            metrics.record_generation(last.prompt_tokens, last.completion_tokens, time.perf_counter() - handle.created, first)

        if not prepared.stream:
            pieces, last = [], None
            try:
                while last is None or last.finish_reason is None:
                    try:
                        last = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            handle.cancel()
                            metrics.record_request("http", endpoint, 499)
                            return Response(status_code=499)
                        continue
                    pieces.append(last.text)
            except asyncio.CancelledError:
                handle.cancel()
                raise
            try:
                check_finished(last)
            except RequestError as err:
                metrics.record_request("http", endpoint, err.status)
                return error_response(err)
            record(last, 200)
            completion = Completion("".join(pieces), (), last.finish_reason, last.prompt_tokens,
                                    last.completion_tokens, None, 0.0)
            return JSONResponse(protocol.response(kind, request_id, completion))

        async def event_stream():
            finished = False
            try:
                if kind == "chat":
                    yield _sse(protocol.chunk(kind, request_id, "", None, first=True))
                while not finished:
                    event = await events.get()
                    finished = event.finish_reason is not None
                    if event.finish_reason == FINISH_ERROR:
                        metrics.record_request("http", endpoint, 500)
                        yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                              "param": None, "code": None}})
                        break
                    if event.text:
                        yield _sse(protocol.chunk(kind, request_id, event.text, None))
                    if finished:
                        yield _sse(protocol.chunk(kind, request_id, None, event.finish_reason))
                        if prepared.include_usage:
                            yield _sse(protocol.usage_chunk(kind, request_id, event))
                        record(event, 200)
                yield _sse("[DONE]")
            finally:
                if not finished:  # the client went away mid-stream: free the batch slot now
                    handle.cancel()
                    metrics.record_request("http", endpoint, 499)

        return StreamingResponse(event_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion", "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat", "/v1/chat/completions")

    return app


def create_proxy_app(upstream_url: str, metrics: ServingMetrics, api_key: str | None = None) -> FastAPI:
    """A REST front end that forwards ``/v1/*`` to another OpenAI-compatible server (FastDeploy), streaming through.

    Our API key check and metrics apply; request validation and generation are the upstream's.
    """
    app = FastAPI(title="paddle_llm (FastDeploy proxy)", docs_url=None, redoc_url=None)
    add_common_routes(app, metrics)
    client = httpx.AsyncClient(base_url=upstream_url, timeout=httpx.Timeout(None, connect=10.0))
    hop_by_hop = {"host", "content-length", "connection", "transfer-encoding", "authorization", "keep-alive"}

    @app.on_event("shutdown")
    async def close_client():
        await client.aclose()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str):
        endpoint = f"/v1/{path}"
        try:
            check_api_key(request, api_key)
        except RequestError as err:
            metrics.record_request("http", endpoint, err.status)
            return error_response(err)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop_by_hop}
        upstream_request = client.build_request(request.method, endpoint, content=await request.body(),
                                                headers=headers, params=request.query_params)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as err:
            metrics.record_request("http", endpoint, 502)
            return error_response(RequestError(f"FastDeploy server unreachable: {err}", status=502,
                                               error_type="server_error"))
        metrics.record_request("http", endpoint, upstream.status_code)
        response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in hop_by_hop | {"content-encoding"}}
        # aiter_bytes undoes any content-encoding, which is why that header is dropped above.
        return StreamingResponse(upstream.aiter_bytes(), status_code=upstream.status_code, headers=response_headers,
                                 background=BackgroundTask(upstream.aclose))

    return app
