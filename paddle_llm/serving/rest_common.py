"""What the REST app's routers share: the app's serving state, the API-key check, and ``RequestError`` as JSON.

The routers are module-level ``APIRouter``s, one per endpoint, so what they serve (backend, metrics, API key) is put
on ``app.state`` by ``rest.create_app`` / ``create_proxy_app`` rather than captured in closures.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from paddle_llm.serving.local_backend import LocalBackend
from paddle_llm.serving.metrics import ServingMetrics
from paddle_llm.serving.openai.protocol import RequestError, bearer_token_matches


@dataclass(frozen=True)
class ServingState:
    """What one app serves; ``app.state.serving``.

    Attributes:
        metrics: where requests, tokens and latencies are counted.
        api_key: the Bearer token ``/v1/*`` needs (None: open).
        backend: the local engine's endpoints (None in the FastDeploy proxy, where the upstream generates).
    """

    metrics: ServingMetrics
    api_key: str | None
    backend: LocalBackend | None = None


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
