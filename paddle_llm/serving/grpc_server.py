"""The gRPC front end: ``TextGeneration.Generate`` / ``GenerateStream`` (see generation.proto) and grpc.health.v1.

Requests are turned into the same body dict the REST API takes, so validation, limits and error messages are
identical; a refused request ends with INVALID_ARGUMENT (or the code matching its HTTP status) and the JSON error
body as details. With an API key, calls need ``authorization: Bearer <key>`` metadata.
"""

from __future__ import annotations

import json
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from paddle_llm.serving import generation_pb2, generation_pb2_grpc
from paddle_llm.serving.metrics import CLIENT_GONE, ServingMetrics
from paddle_llm.serving.openai.protocol import RequestError, bearer_token_matches, check_finished

SERVICE_NAME = "paddle_llm.serving.v1.TextGeneration"
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}


def request_body(request: generation_pb2.GenerateRequest) -> tuple[str, dict]:
    """Map a ``GenerateRequest`` to ``(kind, OpenAI-style body)``.

    Raises:
        RequestError: both or neither of ``prompt`` and ``messages`` set.
    """
    if request.prompt and request.messages:
        raise RequestError("set either prompt or messages, not both", param="prompt")
    if not request.prompt and not request.messages:
        raise RequestError("set prompt (a completion) or messages (a chat)", param="prompt")
    body: dict = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "model"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        return "chat", body
    body["prompt"] = request.prompt
    return "completion", body


class TextGenerationService(generation_pb2_grpc.TextGenerationServicer):
    """Serves ``TextGeneration`` from any backend with ``stream(kind, body)`` (local engine or FastDeploy)."""

    def __init__(self, backend, metrics: ServingMetrics, api_key: str | None = None):
        self.backend = backend
        self.metrics = metrics
        self.api_key = api_key

    def _check_key(self, context) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata())
        if not bearer_token_matches(metadata.get("authorization", ""), self.api_key):
            raise RequestError("missing or wrong API key; send 'authorization: Bearer <key>' metadata", status=401,
                               error_type="authentication_error")

    def _open(self, request, context, method: str):
        """Validate and start a request; on refusal, abort the call with the matching status code."""
        try:
            self._check_key(context)
            kind, body = request_body(request)
            stream = self.backend.stream(kind, body)
        except RequestError as err:
            self.metrics.record_request("grpc", method, err.status)
            context.abort(STATUS_CODES.get(err.status, grpc.StatusCode.UNKNOWN), json.dumps(err.body()))
        # A client that hangs up (or a deadline) cancels generation instead of letting it run to max_tokens.
        context.add_callback(stream.cancel)
        return stream

    def _finish(self, method: str, event, started: float, first_token: float | None, context) -> None:
        try:
            check_finished(event)
        except RequestError as err:
            self.metrics.record_request("grpc", method, err.status)
            context.abort(grpc.StatusCode.INTERNAL, json.dumps(err.body()))
        self.metrics.record_request("grpc", method, 200)
        self.metrics.record_generation(event.prompt_tokens, event.completion_tokens, time.perf_counter() - started,
                                       None if first_token is None else first_token - started)

    @staticmethod
    def _usage(event) -> generation_pb2.Usage:
        return generation_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)

    def Generate(self, request, context):
        started, first_token = time.perf_counter(), None
        stream = self._open(request, context, "Generate")
        pieces, last = [], None
        for last in stream:
            if first_token is None and (last.text or last.token_ids):
                first_token = time.perf_counter()
            pieces.append(last.text)
        if last is None or last.finish_reason is None:  # the client cancelled; the engine dropped the request
            self.metrics.record_request("grpc", "Generate", CLIENT_GONE)
            context.abort(grpc.StatusCode.CANCELLED, "request cancelled")
        self._finish("Generate", last, started, first_token, context)
        return generation_pb2.GenerateResponse(text="".join(pieces), finish_reason=last.finish_reason,
                                               usage=self._usage(last))

    def GenerateStream(self, request, context):
        started, first_token = time.perf_counter(), None
        stream = self._open(request, context, "GenerateStream")
        finished = False
        try:
            for event in stream:
                if first_token is None and (event.text or event.token_ids):
                    first_token = time.perf_counter()
                if event.finish_reason is not None:
                    finished = True
                    self._finish("GenerateStream", event, started, first_token, context)
                    yield generation_pb2.GenerateResponse(text=event.text, finish_reason=event.finish_reason,
                                                          usage=self._usage(event))
                    return
                if event.text:
                    yield generation_pb2.GenerateResponse(text=event.text, usage=self._usage(event))
        finally:
            # The client cancelled (the stream ended without a finish, or gRPC closed this generator at a yield).
            if not finished:
                self.metrics.record_request("grpc", "GenerateStream", CLIENT_GONE)


def start_grpc_server(backend, metrics: ServingMetrics, host: str, port: int, api_key: str | None = None,
                      max_workers: int = 64) -> tuple[grpc.Server, health.HealthServicer]:
    """Start the gRPC server (generation + standard health service) and return it with its health servicer.

    Args:
        max_workers: concurrent calls; each streaming call holds one thread while it waits for tokens.

    Raises:
        RuntimeError: the port could not be bound.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="paddle-llm-grpc"))
    generation_pb2_grpc.add_TextGenerationServicer_to_server(TextGenerationService(backend, metrics, api_key), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio 1.62 raises "Failed to bind to address" where older releases returned 0
        bound = 0
    if bound == 0:
        raise RuntimeError(f"--grpc_port {port}: gRPC could not bind {host}:{port}; pick another --grpc_port")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer


def stop_grpc_server(server: grpc.Server, health_servicer: health.HealthServicer, grace_seconds: float) -> None:
    """Report NOT_SERVING, then let in-flight calls finish for up to ``grace_seconds``."""
    health_servicer.enter_graceful_shutdown()
    server.stop(grace_seconds).wait()
