"""Every request field is honoured or refused by name, on a real server on 127.0.0.1 queried by real clients.

One tiny Llama checkpoint is trained once per module and served with ``--engine dygraph`` (no export step), so the
test process can load the same weights and compute the model's own logits to check logprobs against.
"""

import json

import httpx
import openai
import pytest

from tests.integration.server_process import ServerProcess
from tests.integration.tiny_checkpoint import make_checkpoint

MAX_TOKENS_LIMIT = 32
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_fields")
    return root, make_checkpoint("tiny-llama", str(root / "ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint):
    root, path = checkpoint
    process = ServerProcess(["--model", path, "--engine", "dygraph", "--max_tokens_limit", str(MAX_TOKENS_LIMIT),
                             "--num_threads", "1"], str(root / "server.log")).start()
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
    ("response_format", {"type": "json_object"}),
    ("suffix", " and then"),
    ("functions", [{"name": "f"}]),
    ("made_up_field", 1),
])
def test_unsupported_field_is_refused_by_name(server, path, base, field, value):
    response = post(server, path, {**base, "max_tokens": 2, field: value})
    assert_refused(response, field, words=(field,))


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
