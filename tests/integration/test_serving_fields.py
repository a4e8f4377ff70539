"""Every request field is honoured or refused by name, on a real server on 127.0.0.1 queried by real clients.

One tiny Llama checkpoint is trained once per module and served with ``--engine dygraph`` (no export step), so the
test process can load the same weights and compute the model's own logits to check logprobs against.
"""

import json
import os
import socket
import time

import httpx
import openai
import pytest

from tests.integration.server_process import ServerProcess
from tests.integration.tiny_checkpoint import make_checkpoint

MAX_TOKENS_LIMIT = 1500  # long enough that a dropped request left running would show
MAX_REQUEST_BYTES = 1_000_000
HEADER_TIMEOUT_SECONDS = 2
BODY_TIMEOUT_SECONDS = 2
LIMIT_CONCURRENCY = 24
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_fields")
    return root, make_checkpoint("tiny-llama", str(root / "ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint):
    root, path = checkpoint
    process = ServerProcess(["--model", path, "--engine", "dygraph", "--max_tokens_limit", str(MAX_TOKENS_LIMIT),
                             "--num_threads", "1", "--max_request_bytes", str(MAX_REQUEST_BYTES),
                             "--header_timeout_seconds", str(HEADER_TIMEOUT_SECONDS),
                             "--body_timeout_seconds", str(BODY_TIMEOUT_SECONDS),
                             "--limit_concurrency", str(LIMIT_CONCURRENCY)], str(root / "server.log")).start()
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path, body):
    return httpx.post(server.url + path, content=json.dumps(body), timeout=60)


def assert_refused(response, param, words=()):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    for word in words:
        assert word in error["message"], error["message"]


# ---- item 1: a field is honoured or refused by name ------------------------------------------------------------

@pytest.mark.parametrize("path, base", [("/v1/completions", {"prompt": "The"}),
                                        ("/v1/chat/completions", {"messages": MESSAGES})], ids=["completions", "chat"])
@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("suffix", " and then"),
    ("functions", [{"name": "f"}]),
    ("made_up_field", 1),
])
def test_unsupported_field_is_refused_by_name(server, path, base, field, value):
    response = post(server, path, {**base, "max_tokens": 2, field: value})
    assert_refused(response, field, words=(field,))


def test_response_format_is_refused_by_completions(server):
    response = post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2,
                                                "response_format": {"type": "json_object"}})
    assert_refused(response, "response_format", words=("/v1/chat/completions",))


def test_unknown_field_lists_what_the_endpoint_takes(server):
    response = post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2, "temprature": 0.5})
    assert_refused(response, "temprature", words=("temperature", "prompt"))


def test_null_field_counts_as_absent(server):
    response = post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2, "tools": None, "suffix": None})
    assert response.status_code == 200, response.text


def test_unknown_stream_option_is_refused(server):
    body = {"prompt": "The", "max_tokens": 2, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert_refused(post(server, "/v1/completions", body), "stream_options.continuous_usage_stats")


def test_openai_client_raises_for_a_refused_field(client):
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=2, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])


# ---- item 2: ranges ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("temperature", 2.5), ("temperature", 100), ("temperature", -0.1),
                                          ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("seed", -3),
                                          ("repetition_penalty", 0)])
def test_out_of_range_value_is_refused(server, field, value):
    assert_refused(post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2, field: value}), field)


def test_temperature_two_is_accepted(server):
    response = post(server, "/v1/completions", {"prompt": "The", "max_tokens": 2, "temperature": 2, "seed": 1})
    assert response.status_code == 200, response.text


# ---- item 3: logprobs, echo, token-id and batched prompts, n, penalties, chat content parts --------------------

@pytest.fixture(scope="module")
def reference(checkpoint):
    """The served weights loaded here, for log-probabilities computed directly from the model's logits."""
    import numpy as np
    import paddle

    from paddle_llm.inference.load import load_checkpoint_tokenizer
    from paddle_llm.models.registry import resolve_model
    from tests.integration.tiny_checkpoint import _load

    family, model = _load(checkpoint[1])
    model.eval()
    vocab = len(load_checkpoint_tokenizer(resolve_model(checkpoint[1])))

    def log_probs(ids: list[int]) -> np.ndarray:
        """``[len(ids), vocab]``: row i is the distribution of the token after ids[:i + 1]."""
        input_ids = np.asarray([ids], dtype="int64")
        extra = {k: paddle.to_tensor(v) for k, v in family.causal_lm_inputs(input_ids).items()}
        with paddle.no_grad():
            outputs = model(input_ids=paddle.to_tensor(input_ids), return_dict=False, **extra)
        logits = (outputs[0] if isinstance(outputs, (tuple, list)) else outputs)[0].astype("float64").numpy()[:, :vocab]
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    return log_probs


@pytest.fixture(scope="module")
def prompt_ids(server):
    """A prompt as token ids, sent as they are (lm-eval's default)."""
    return post(server, "/tokenize", {"prompt": "The quick brown fox jumps"}).json()["tokens"]


def test_completion_echo_logprobs_match_the_models_own_logits(server, reference, prompt_ids):
    PROMPT_IDS = prompt_ids
    body = {"prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 3}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    token_logprobs = logprobs["token_logprobs"]
    assert len(token_logprobs) == len(PROMPT_IDS) + 4 and token_logprobs[0] is None
    expected = reference(PROMPT_IDS)
    for position in range(1, len(PROMPT_IDS)):  # prompt tokens: P(ids[i] | ids[:i])
        assert token_logprobs[position] == pytest.approx(expected[position - 1, PROMPT_IDS[position]], abs=2e-3)
    # Greedy continuation: each generated token is the argmax, its logprob the max of the reference row.
    ids = list(PROMPT_IDS)
    for step in range(4):
        row = reference(ids)[-1]
        assert token_logprobs[len(PROMPT_IDS) + step] == pytest.approx(row.max(), abs=2e-3)
        ids.append(int(row.argmax()))
        top = logprobs["top_logprobs"][len(PROMPT_IDS) + step]
        assert len(top) == 3 and max(top.values()) == pytest.approx(row.max(), abs=2e-3)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert response.json()["choices"][0]["text"].endswith("".join(logprobs["tokens"][len(PROMPT_IDS):]))


def test_echo_that_samples_eos_still_lists_its_logprob(server, checkpoint, reference, prompt_ids):
    """lm-eval's loglikelihood sends echo + max_tokens 1 and takes all but the last entry as the prompt's logprobs:
    when the one sampled token is EOS, its entry must be there, or the prompt's last token would be dropped."""
    with open(os.path.join(checkpoint[1], "config.json"), encoding="utf-8") as f:
        eos = json.load(f)["eos_token_id"]
    body = {"prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1,
            "logit_bias": {str(eos): 100}}  # bias picks EOS; logprobs stay the model's own
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(prompt_ids) + 1
    assert token_logprobs[-1] == pytest.approx(reference(prompt_ids)[-1, eos], abs=2e-3)
    assert choice["logprobs"]["tokens"][-1] == ""  # EOS adds no text


def test_chat_logprobs_in_openai_shape(client, reference):
    reply = client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert bytes(entry.bytes).decode() == entry.token


def test_streamed_logprobs_equal_plain_ones(client):
    kwargs = dict(model="ckpt", prompt="The quick brown", max_tokens=6, temperature=0, logprobs=1)
    plain = client.completions.create(**kwargs).choices[0].logprobs.token_logprobs
    streamed = [lp for chunk in client.completions.create(stream=True, **kwargs) if chunk.choices[0].logprobs
                for lp in chunk.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(plain)


def test_batch_of_prompts_and_n_number_choices_prompt_by_prompt(client):
    prompts = ["The quick brown", "Paddle serves"]
    reply = client.completions.create(model="ckpt", prompt=prompts, max_tokens=5, temperature=0.8, seed=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model="ckpt", prompt=p, max_tokens=5, temperature=0.8, seed=3 + i)
              .choices[0].text for p in prompts for i in range(2)]
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == single
    assert reply.usage.completion_tokens == sum(
        client.completions.create(model="ckpt", prompt=p, max_tokens=5, temperature=0).usage.completion_tokens
        for p in prompts) * 2


def test_token_id_prompt_equals_its_text(client, server):
    ids = post(server, "/tokenize", {"prompt": "The quick brown"}).json()["tokens"]
    kwargs = dict(model="ckpt", max_tokens=5, temperature=0)
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == \
        client.completions.create(prompt="The quick brown", **kwargs).choices[0].text
    batch = client.completions.create(prompt=[ids, ids[:-1]], **kwargs)
    assert batch.choices[0].text == client.completions.create(prompt=ids, **kwargs).choices[0].text
    assert batch.usage.prompt_tokens == 2 * len(ids) - 1


def test_streamed_n_choices_each_finish(server):
    body = {"prompt": "The", "max_tokens": 3, "temperature": 1, "n": 3, "stream": True, "seed": 5}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2]


def test_logit_bias_forces_a_token(client, server):
    forced = post(server, "/tokenize", {"prompt": "The quick"}).json()["tokens"][-1]
    piece = post(server, "/detokenize", {"tokens": [forced]}).json()["prompt"]
    reply = client.completions.create(model="ckpt", prompt="Paddle", max_tokens=4, temperature=0,
                                      logit_bias={str(forced): 100}, logprobs=0)
    assert [token.strip() for token in reply.choices[0].logprobs.tokens] == [piece.strip()] * 4


def test_frequency_penalty_changes_greedy_text(client):
    kwargs = dict(model="ckpt", prompt="The quick brown fox jumps over the lazy dog.", max_tokens=32,
                  temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    penalised = client.completions.create(frequency_penalty=2, presence_penalty=2, **kwargs).choices[0].text
    assert penalised != plain
    assert len(set(penalised.split())) >= len(set(plain.split()))


def test_chat_text_parts_and_developer_role(client):
    plain = client.chat.completions.create(model="ckpt", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}])
    parts = client.chat.completions.create(model="ckpt", max_tokens=6, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "The quick "}, {"type": "text", "text": "brown fox"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "The", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "The", "n": 2, "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "The", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "The", "n": 65}, "n"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", ""]}, "prompt"),
    ("/v1/completions", {"prompt": "The", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "The", "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "The", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "The", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "The", "echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"messages": MESSAGES, "echo": True}, "echo"),
], ids=["image-part", "top-logprobs-without-logprobs", "top-logprobs-21", "logprobs-6", "best-of-not-n", "n-0",
        "n-65", "token-id-out-of-vocab", "empty-prompt-list", "empty-string-in-batch", "presence-out-of-range",
        "frequency-out-of-range", "logit-bias-key", "logit-bias-value", "echo-not-bool", "echo-on-chat"])
def test_bad_values_of_new_fields_are_refused(server, path, body, param):
    assert_refused(post(server, path, {**body, "max_tokens": 2}), param)


def test_tokenize_detokenize_and_model_by_id(server, client):
    tokens = post(server, "/tokenize", {"prompt": "The quick brown"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > tokens["count"]
    usage = client.completions.create(model="ckpt", prompt="The quick brown", max_tokens=1).usage
    assert usage.prompt_tokens == tokens["count"]  # the same encoding the generate endpoint bills
    chat = post(server, "/tokenize", {"messages": MESSAGES}).json()
    assert chat["count"] == client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    assert "quick brown" in post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert client.models.retrieve("ckpt").id == "ckpt"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenize_refuses_what_it_does_not_take(server, path, body, param):
    assert_refused(post(server, path, body), param)


# ---- item 4: faults ---------------------------------------------------------------------------------------------

def metric(server, name: str, labels: str = "") -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.2)


GONE = '{protocol="http",endpoint="/v1/completions",status="499"}'


def test_client_giving_up_on_a_plain_request_cancels_it(server, client):
    gone_before = metric(server, "paddle_llm_requests_total", GONE)
    for _ in range(4):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", timeout=0.5,
                       json={"prompt": "The", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0})
    # Left running, 4 x 1500 tokens would take far longer than the wait below, and end as 200s, not 499s.
    wait_for(lambda: metric(server, "paddle_llm_requests_total", GONE) == gone_before + 4)
    assert metric(server, "paddle_llm_requests_total", GONE) == gone_before + 4
    assert metric(server, "paddle_llm_running_requests") == 0


def test_body_over_the_limit_gets_413(server):
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          content=json.dumps({"prompt": "x" * (MAX_REQUEST_BYTES + 10)}))
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert "--max_request_bytes" in response.json()["error"]["message"]


def test_prompt_no_context_could_hold_is_refused_before_tokenizing(server):
    for path, body in (("/v1/completions", {"prompt": "fox " * 200_000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * 200_000}]})):
        response = post(server, path, body)
        assert response.status_code == 400 and "characters" in response.json()["error"]["message"], response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"


def test_slow_headers_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        assert sock.recv(1024) == b""  # the server closed it (a recv that timed out would raise)


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


def test_connections_over_the_limit_get_503(server):
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(LIMIT_CONCURRENCY)]
    try:
        time.sleep(0.5)  # let the server accept them all
        assert httpx.get(server.url + "/health", timeout=30).status_code == 503
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: httpx.get(server.url + "/health", timeout=30).status_code == 200)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_cancelled_grpc_stream_is_counted(server):
    import grpc

    from paddle_llm.serving import generation_pb2, generation_pb2_grpc

    label = '{protocol="grpc",endpoint="GenerateStream",status="499"}'
    before = metric(server, "paddle_llm_requests_total", label)
    stub = generation_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    call = stub.GenerateStream(generation_pb2.GenerateRequest(prompt="The", max_tokens=MAX_TOKENS_LIMIT, temperature=0),
                               timeout=60)
    next(call)
    call.cancel()
    wait_for(lambda: metric(server, "paddle_llm_requests_total", label) == before + 1)
    assert metric(server, "paddle_llm_requests_total", label) == before + 1
    wait_for(lambda: metric(server, "paddle_llm_running_requests") == 0)
    assert metric(server, "paddle_llm_running_requests") == 0


@pytest.mark.slow
def test_drain_cut_short_answers_and_exits_3(checkpoint):
    import concurrent.futures

    root, path = checkpoint
    process = ServerProcess(["--model", path, "--engine", "dygraph", "--max_tokens_limit", "2000",
                             "--graceful_shutdown_seconds", "1", "--num_threads", "1"], str(root / "drain.log")).start()
    long = {"prompt": "The", "max_tokens": 2000, "temperature": 0}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, process.url + "/v1/completions", json=long, timeout=120)
            with httpx.stream("POST", process.url + "/v1/completions", json={**long, "stream": True},
                              timeout=120) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                wait_for(lambda: metric(process, "paddle_llm_running_requests") == 2)
                process.terminate()  # SIGTERM with both requests far from done
                rest = [line for line in lines if line]
            answer = plain.result()
        assert answer.status_code == 500 and answer.headers["content-type"] == "application/json", answer.text
        assert "--graceful_shutdown_seconds" in answer.json()["error"]["message"]
        assert any("--graceful_shutdown_seconds" in line for line in rest if line.startswith('data: {"error"'))
    finally:
        code = process.stop()
    assert code == 3, process.log_tail()


def test_streamed_chat_n_and_streamed_echo_match_plain(client):
    kwargs = dict(model="ckpt", messages=MESSAGES, max_tokens=5, temperature=0.9, seed=7, n=2)
    plain = client.chat.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in plain.choices}
    echo = dict(model="ckpt", prompt="The quick", max_tokens=4, temperature=0, echo=True)
    whole = client.completions.create(**echo).choices[0].text
    assert whole.startswith("The quick")
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **echo)) == whole


# ---- response_format: constrained decoding -----------------------------------------------------------------------

REPLY_SCHEMA = {"type": "object",
                "properties": {"animal": {"type": "string", "maxLength": 12}, "speed": {"enum": ["slow", "quick"]},
                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                "required": ["animal", "speed", "legs"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "fox", "schema": REPLY_SCHEMA, "strict": True}}


def test_json_schema_reply_validates_where_the_free_reply_is_not_json(client):
    import jsonschema

    free = client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)
    reply = client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=60, temperature=0,
                                           response_format=JSON_SCHEMA_FORMAT)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), REPLY_SCHEMA)


def test_json_schema_with_sampling_n_logprobs_streamed_and_plain(client):
    import jsonschema

    kwargs = dict(model="ckpt", messages=MESSAGES, max_tokens=60, temperature=1.0, seed=11, n=2, logprobs=True,
                  response_format=JSON_SCHEMA_FORMAT)
    plain = client.chat.completions.create(**kwargs)
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    for choice in plain.choices:
        jsonschema.validate(json.loads(choice.message.content), REPLY_SCHEMA)
        assert streamed[choice.index] == choice.message.content
        assert "".join(entry.token for entry in choice.logprobs.content) == choice.message.content
    assert plain.choices[0].message.content != plain.choices[1].message.content  # each choice has its own matcher


def test_json_object_reply_is_an_object(client):
    # Greedy: sampled, this model often opens a key it never closes (any object is allowed), and the reply runs to
    # max_tokens as cut JSON; the schema tests above bound their strings instead.
    reply = client.chat.completions.create(model="ckpt", messages=MESSAGES, max_tokens=100, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}, ("schema",)),
    ({"type": "json_schema", "json_schema": {"schema": REPLY_SCHEMA}}, ("name",)),
    ({"type": "xml"}, ("json_object",)),
    ({"type": "json_object", "schema": {}}, ("schema",)),
])
def test_bad_response_format_is_refused(server, response_format, words):
    response = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                      "response_format": response_format})
    assert_refused(response, "response_format", words=words)


# ---- max_tokens 0 with echo: the prompt scored, nothing generated (lm-eval, vLLM) ---------------------------------

def test_max_tokens_zero_with_echo_returns_the_prompt_and_its_logprobs(server, client, reference, prompt_ids):
    body = {"prompt": prompt_ids, "max_tokens": 0, "echo": True, "logprobs": 2}
    reply = post(server, "/v1/completions", body).json()
    choice = reply["choices"][0]
    assert reply["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == post(server, "/detokenize", {"tokens": prompt_ids}).json()["prompt"]
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(prompt_ids) and token_logprobs[0] is None
    expected = reference(prompt_ids)
    assert token_logprobs[1:] == pytest.approx([expected[i - 1, prompt_ids[i]] for i in range(1, len(prompt_ids))],
                                               abs=2e-3)
    streamed = list(client.completions.create(model="ckpt", prompt="The quick brown", max_tokens=0, echo=True,
                                              stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == "The quick brown"
    assert streamed[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "The", "max_tokens": 0}),
                                        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0})],
                         ids=["completions-without-echo", "chat"])
def test_max_tokens_zero_without_echo_is_refused(server, path, body):
    assert_refused(post(server, path, body), "max_tokens", words=("echo",))
