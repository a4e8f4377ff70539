"""The OpenAI-compatible REST server (FastAPI + uvicorn): assembling the app from its routers.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (plain JSON, or SSE with ``"stream": true``),
``GET /v1/models`` and ``/v1/models/{id}``, ``POST /tokenize`` and ``/detokenize``, ``POST /v1/load_lora_adapter``
and ``/v1/unload_lora_adapter`` (each in ``openai/<endpoint>/router.py``), ``GET /health`` and ``GET /metrics`` (``health``).
With an API key, ``/v1/*`` needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open for probes.
"""

from __future__ import annotations

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from paddle_llm.serving import health
from paddle_llm.serving.local_backend import LocalBackend
from paddle_llm.serving.metrics import ServingMetrics
from paddle_llm.serving.openai.chat import router as chat
from paddle_llm.serving.openai.completions import router as completions
from paddle_llm.serving.openai.lora import router as lora
from paddle_llm.serving.openai.models import router as models
from paddle_llm.serving.openai.tokenize import router as tokenize
from paddle_llm.serving.openai.protocol import RequestError
from paddle_llm.serving.rest_common import (
    DEFAULT_BODY_TIMEOUT_SECONDS,
    DEFAULT_MAX_REQUEST_BYTES,
    ServingState,
    check_api_key,
    error_response,
)


async def _request_error(_request: Request, err: RequestError):
    return error_response(err)


def _base_app(title: str, state: ServingState) -> FastAPI:
    """An app with ``/health``, ``/metrics`` and RequestError answered as OpenAI's error JSON."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.state.serving = state
    app.include_router(health.router)
    app.add_exception_handler(RequestError, _request_error)
    return app


def create_app(backend: LocalBackend, metrics: ServingMetrics, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS) -> FastAPI:
    """The REST app over a local engine.

    Args:
        backend: validation and the engine (see ``local_backend.LocalBackend``).
        metrics: where requests, tokens and latencies are counted.
        api_key: require this Bearer token on ``/v1/*`` (None: open).
        max_request_bytes, body_timeout_seconds: see ``rest_common.ServingState``.
    """
    app = _base_app("paddle_llm", ServingState(metrics, api_key, backend, max_request_bytes, body_timeout_seconds))
    for endpoint in (models, completions, chat, tokenize, lora):
        app.include_router(endpoint.router)
    return app


def create_proxy_app(upstream_url: str, metrics: ServingMetrics, api_key: str | None = None) -> FastAPI:
    """A REST front end that forwards ``/v1/*`` to another OpenAI-compatible server (FastDeploy), streaming through.

    Our API key check and metrics apply; request validation and generation are the upstream's.
    """
    app = _base_app("paddle_llm (FastDeploy proxy)", ServingState(metrics, api_key))
    client = httpx.AsyncClient(base_url=upstream_url, timeout=httpx.Timeout(None, connect=10.0))
    hop_by_hop = {"host", "content-length", "connection", "transfer-encoding", "authorization", "keep-alive"}

    @app.on_event("shutdown")
    async def close_client():
        await client.aclose()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str):
        endpoint = f"/v1/{path}"
        try:
            check_api_key(request)
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
