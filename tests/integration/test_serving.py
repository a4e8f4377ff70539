"""The real server on 127.0.0.1: the official ``openai`` client, gRPC, bad input, disconnects, load, shutdown.

One tiny Llama checkpoint is trained, exported and served once per module; every test talks to that process.
"""

import concurrent.futures
import json
import time

import grpc
import httpx
import numpy as np
import openai
import pytest

from paddle_llm.export.command import main as export_main
from paddle_llm.serving import generation_pb2, generation_pb2_grpc
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_checkpoint import make_checkpoint

API_KEY = "test-key"
MAX_TOKENS_LIMIT = 64
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    checkpoint = make_checkpoint("tiny-llama", str(root / "ckpt"))
    export = str(root / "tiny-llama-export")
    assert export_main(["--model_name_or_path", checkpoint, "--output_path", export]) == 0
    return root, checkpoint, export


@pytest.fixture(scope="module")
def server(model_dirs):
    root, _, export = model_dirs
    process = ServerProcess(["--model", export, "--api_key", API_KEY, "--max_tokens_limit", str(MAX_TOKENS_LIMIT),
                             "--num_threads", "2"], str(root / "server.log")).start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body), headers=headers, timeout=60)


def assert_still_serving(client, model_name):
    reply = client.completions.create(model=model_name, prompt="Hello", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_models_list(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name] == ["tiny-llama-export"]


def test_chat_plain_and_streamed_text_are_equal(client, model_name):
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=24, temperature=0)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content and plain.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # really token by token


def test_completions_plain_and_streamed_text_are_equal(client, model_name):
    plain = client.completions.create(model=model_name, prompt="The quick brown", max_tokens=20, temperature=0)
    pieces = list(client.completions.create(model=model_name, prompt="The quick brown", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == plain.choices[0].text
    assert pieces[-1].usage.completion_tokens == plain.usage.completion_tokens == 20


def test_sse_ends_with_done(server, model_name):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_reproduces(client, model_name):
    kwargs = dict(model=model_name, prompt="Paddle", max_tokens=16, temperature=0.9, top_p=0.95, seed=123,
                  extra_body={"top_k": 40, "repetition_penalty": 1.1})
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_stop_string_cuts_output(client, model_name):
    full = client.completions.create(model=model_name, prompt="The quick", max_tokens=30, temperature=0).choices[0].text
    stop = full.strip().split()[1] if len(full.split()) > 2 else full[3:5]
    cut = client.completions.create(model=model_name, prompt="The quick", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]


def test_grpc_unary_streaming_and_health(server, client, model_name):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = generation_pb2_grpc.TextGenerationStub(channel)
    metadata = [("authorization", f"Bearer {API_KEY}")]
    request = generation_pb2.GenerateRequest(prompt="The quick brown", max_tokens=20, temperature=0)
    unary = stub.Generate(request, metadata=metadata, timeout=60)
    streamed = list(stub.GenerateStream(request, metadata=metadata, timeout=60))
    assert "".join(m.text for m in streamed) == unary.text
    assert streamed[-1].finish_reason == unary.finish_reason == "length" and unary.usage.completion_tokens == 20
    rest = client.completions.create(model=model_name, prompt="The quick brown", max_tokens=20, temperature=0)
    assert unary.text == rest.choices[0].text  # one engine, one answer, whatever the protocol
    chat = stub.Generate(generation_pb2.GenerateRequest(
        messages=[generation_pb2.ChatMessage(role="user", content="The quick brown fox")], max_tokens=8, temperature=0),
        metadata=metadata, timeout=60)
    assert chat.usage.completion_tokens > 0
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "paddle_llm.serving.v1.TextGeneration"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "request_kwargs, code",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_grpc_rejects_bad_requests(server, request_kwargs, code):
    stub = generation_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    messages = [generation_pb2.ChatMessage(**m) for m in request_kwargs.pop("messages", [])]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(generation_pb2.GenerateRequest(messages=messages, **request_kwargs),
                      metadata=[("authorization", f"Bearer {API_KEY}")], timeout=30)
    assert raised.value.code() == code
    assert "error" in json.loads(raised.value.details())


def test_grpc_wrong_key(server):
    stub = generation_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(generation_pb2.GenerateRequest(prompt="x"), metadata=[("authorization", "Bearer nope")], timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def context_length(model_dirs):
    from paddle_llm.inference.manifest import load_manifest

    return load_manifest(model_dirs[2]).max_context_length


@pytest.mark.parametrize(
    "path, body, raw, key, status, param",
    [
        ("/v1/chat/completions", None, b'{"messages": [', API_KEY, 400, None),
        ("/v1/chat/completions", None, b'[1, 2]', API_KEY, 400, None),
        ("/v1/chat/completions", {"messages": []}, None, API_KEY, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None, API_KEY, 400, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": MAX_TOKENS_LIMIT + 1}, None, API_KEY, 400, "max_tokens"),
        # "fox " is one token: {over} and {near} become prompts longer than the context / just short of it.
        ("/v1/completions", {"prompt": "{over}"}, None, API_KEY, 400, "prompt"),
        ("/v1/completions", {"prompt": "{near}", "max_tokens": 64}, None, API_KEY, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, None, API_KEY, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, None, API_KEY, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, None, API_KEY, 404, "model"),
        ("/v1/completions", {"prompt": "hi"}, None, "wrong-key", 401, None),
        ("/v1/completions", {"prompt": "hi"}, None, None, 401, None),
    ],
    ids=["malformed-json", "json-not-object", "empty-messages", "unknown-role", "max-tokens-over-limit",
         "prompt-over-context", "prompt-plus-max-tokens-over-context", "bad-type", "n-zero", "unknown-model",
         "wrong-api-key", "missing-api-key"],
)
def test_bad_input_gets_4xx_json_and_server_keeps_serving(server, client, model_name, context_length, path, body, raw,
                                                          key, status, param):
    if body and body.get("prompt") in ("{over}", "{near}"):
        repeats = context_length + 50 if body["prompt"] == "{over}" else context_length - 30
        body = dict(body, prompt="fox " * repeats)
    response = post(server, path, body, key=key, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert_still_serving(client, model_name)


def test_openai_client_raises_typed_errors(server, model_name):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        right.chat.completions.create(model=model_name, messages=[])


def metric(server, name):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return text, float(line.rsplit(" ", 1)[1])
    return text, None


def test_client_disconnecting_mid_stream_frees_its_slot(server, client, model_name):
    body = {"model": model_name, "prompt": "The", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The server notices, cancels the request and its batch row; nothing keeps running.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(server, "paddle_llm_running_requests")[1] != 0:
        time.sleep(0.2)
    assert metric(server, "paddle_llm_running_requests")[1] == 0
    assert_still_serving(client, model_name)


def test_metrics_report_requests_tokens_latency(server, client, model_name):
    client.completions.create(model=model_name, prompt="Hello", max_tokens=3, temperature=0)
    text, tokens = metric(server, "paddle_llm_generation_tokens_total")
    assert tokens and tokens >= 3
    assert 'paddle_llm_requests_total{protocol="http",endpoint="/v1/completions",status="200"}' in text
    assert metric(server, "paddle_llm_request_latency_seconds_count")[1] >= 1
    assert "# TYPE paddle_llm_time_to_first_token_seconds histogram" in text


def test_load_32_clients_x_4_requests_all_succeed(server, client, model_name):
    def one_client(index):
        latencies = []
        for turn in range(4):
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": f"Question {index}.{turn}: the fox"}],
                max_tokens=16, temperature=0.7, seed=index * 10 + turn)
            assert reply.choices[0].finish_reason in ("length", "stop")
            latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        latencies = [lat for result in pool.map(one_client, range(32)) for lat in result]
    elapsed = time.perf_counter() - started
    assert len(latencies) == 128
    p50, p95 = np.percentile(latencies, [50, 95])
    print(f"\nload test: 32 clients x 4 requests in {elapsed:.1f}s, latency p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, {128 / elapsed:.1f} requests/s")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_concurrent_greedy_requests_equal_each_alone_and_the_models_own_decode(server, client, model_name, model_dirs,
                                                                               context_length):
    """Batched decoding, a prompt longer than one prefill chunk (256 tokens) and rows joining mid-way change no
    token: each equals the request served alone and the model's own cache-less greedy decode."""
    from paddle_llm.export.parity import reference_logits
    from paddle_llm.inference.load import load_model
    from paddle_llm.models.registry import load_tokenizer, resolve_model

    lengths = [3, 17, min(300, context_length - 20), 40, 9, 60]
    prompts = [[300 + (7 * row + 13 * i) % 600 for i in range(length)] for row, length in enumerate(lengths)]
    kwargs = dict(model=model_name, max_tokens=6, temperature=0)
    alone = [client.completions.create(prompt=prompt, **kwargs).choices[0].text for prompt in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: client.completions.create(prompt=p, **kwargs).choices[0].text, prompts))
    assert together == alone

    source = resolve_model(model_dirs[1])
    model, tokenizer = load_model(source), load_tokenizer(model_dirs[1], source.family)
    eos = model.config.eos_token_id
    for prompt, text in zip(prompts[:3], alone):
        sequence = list(prompt)
        for _ in range(6):
            token = int(np.argmax(reference_logits(model, source.family, sequence)[: len(tokenizer)]))
            if token == eos:
                break
            sequence.append(token)
        # The server streams the text the new ids add to the prompt's (a word's leading space included).
        assert text == tokenizer.decode(sequence)[len(tokenizer.decode(prompt)):]
    assert "batch: max_batch_size " in (model_dirs[0] / "server.log").read_text()


def test_shared_prompt_prefix_is_reused_and_its_hit_rate_is_in_metrics(server, client, model_name):
    system = [400 + (11 * i) % 500 for i in range(48)]  # three full blocks of the prefix cache
    replies = [client.completions.create(model=model_name, prompt=system + [300 + turn], max_tokens=4, temperature=0)
               for turn in range(2)]
    assert all(reply.choices[0].finish_reason in ("length", "stop") for reply in replies)
    _, hit_rate = metric(server, "paddle_llm_prefix_cache_hit_rate")
    assert hit_rate is not None and hit_rate > 0


@pytest.mark.slow
def test_graceful_shutdown_finishes_in_flight_stream(model_dirs):
    root, _, export = model_dirs
    process = ServerProcess(["--model", export, "--max_tokens_limit", "256"], str(root / "shutdown.log")).start()
    body = {"prompt": "The", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", process.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        process.terminate()  # SIGTERM while the stream is mid-way
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] in ("length", "stop")
    assert process.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(process.url + "/health", timeout=2)


@pytest.mark.slow
def test_dygraph_engine_serves_checkpoint_with_same_greedy_text(model_dirs, client, model_name):
    root, checkpoint, _ = model_dirs
    process = ServerProcess(["--model", checkpoint, "--engine", "dygraph"], str(root / "dygraph.log")).start()
    try:
        dygraph = openai.OpenAI(base_url=process.url + "/v1", api_key="unused", max_retries=0)
        kwargs = dict(prompt="The quick brown", max_tokens=16, temperature=0)
        expected = client.completions.create(model=model_name, **kwargs).choices[0].text
        assert dygraph.completions.create(model=dygraph.models.list().data[0].id, **kwargs).choices[0].text == expected
    finally:
        assert process.stop() == 0
