"""What the REST app's routers share: the app's serving state, the API-key check, reading a request body within its
limits, and ``RequestError`` as JSON.

The routers are module-level ``APIRouter``s, one per endpoint, so what they serve (backend, metrics, API key) is put
on ``app.state`` by ``rest.create_app`` / ``create_proxy_app`` rather than captured in closures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from paddle_llm.serving.local_backend import LocalBackend
from paddle_llm.serving.metrics import ServingMetrics
from paddle_llm.serving.openai.protocol import RequestError, bearer_token_matches, parse_json_body

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # far above any prompt a context of a few thousand tokens can hold
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ServingState:
    """What one app serves; ``app.state.serving``.

    Attributes:
        metrics: where requests, tokens and latencies are counted.
        api_key: the Bearer token ``/v1/*`` needs (None: open).
        backend: the local engine's endpoints (None in the FastDeploy proxy, where the upstream generates).
        max_request_bytes: a larger body gets a 413 before it is parsed (``serve --max_request_bytes``).
        body_timeout_seconds: a body not received within this gets a 408 (``serve --body_timeout_seconds``).
    """

    metrics: ServingMetrics
    api_key: str | None
    backend: LocalBackend | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS


def serving_state(request: Request) -> ServingState:
    return request.app.state.serving


def check_api_key(request: Request) -> None:
    """Raises: RequestError 401 unless the request carries ``Authorization: Bearer <api_key>`` (or no key is set)."""
    api_key = serving_state(request).api_key
    if api_key is None:
        return
    if not bearer_token_matches(request.headers.get("authorization", ""), api_key):
        raise RequestError("missing or wrong API key; send 'Authorization: Bearer <key>'", status=401,
                           error_type="authentication_error", code="invalid_api_key")


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_json_body(request: Request) -> dict:
    """The request's JSON object, read within the size and time limits and parsed off the event loop (a big body
    would otherwise stall every other request, ``/health`` included).

    Raises:
        RequestError: 413 over ``max_request_bytes`` (as soon as the count passes it), 408 too slow, 400 not JSON.
    """
    state = serving_state(request)
    limit = state.max_request_bytes
    too_large = RequestError(f"the request body is over this server's limit of {limit} bytes (serve "
                             "--max_request_bytes)", status=413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), state.body_timeout_seconds)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {state.body_timeout_seconds:g} s (serve "
                           "--body_timeout_seconds)", status=408, code="request_timeout") from None
    return await asyncio.to_thread(parse_json_body, raw)
