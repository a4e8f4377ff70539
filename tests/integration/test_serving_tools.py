"""Tools on a real server on 127.0.0.1, queried by the official ``openai`` client: the Qwen2 fixture (random
weights, byte-level BPE) served with Qwen2.5's tool-calling chat_template. Its replies are noise, so a call only
comes out where ``tool_choice`` forces one by constrained decoding; that call must parse, name an allowed function
and carry arguments matching its schema, streamed or not."""

import json
import os
import shutil

import jsonschema
import openai
import pytest

from tests.integration.server_process import ServerProcess

pytestmark = pytest.mark.slow  # a server of its own (~20 s with its requests)

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                               "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = tmp_path_factory.mktemp("tools") / "qwen2-tools"
    shutil.copytree(os.path.join(ASSETS, "hf", "qwen2"), model)
    with open(os.path.join(ASSETS, "chat_templates", "qwen2_5_tools.jinja"), encoding="utf-8") as f:
        template = f.read()
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "chat_template": template}), encoding="utf-8")
    # The tools' JSON spelled in a 320-token vocabulary is ~700 tokens: room for it (the weights are random anyway).
    model_config = model / "config.json"
    model_config.write_text(json.dumps({**json.loads(model_config.read_text()), "max_position_embeddings": 2048}))
    process = ServerProcess(["--model", str(model), "--engine", "dygraph", "--num_threads", "1"],
                            str(model.parent / "server.log")).start()
    yield openai.OpenAI(base_url=process.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert process.stop() == 0, process.log_tail()


def model_id(client):
    return client.models.list().data[0].id


def assert_weather_call(name, arguments):
    assert name in ("get_weather", "get_time")
    if name == "get_weather":
        jsonschema.validate(json.loads(arguments), WEATHER)
    else:
        assert json.loads(arguments) == {}


def test_required_gives_calls_in_openai_shape(client):
    reply = client.chat.completions.create(model=model_id(client), messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0.8, seed=1, n=2)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert_weather_call(call.function.name, call.function.arguments)


def test_named_function_streams_its_call_as_openai_does(client):
    kwargs = dict(model=model_id(client), messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
                  parallel_tool_calls=False, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    plain = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in plain]
    assert all(c["name"] == "get_weather" and c["id"] for c in calls.values())
    assert_weather_call("get_weather", calls[0]["arguments"])


def test_auto_renders_the_tools_and_the_history_of_calls(client):
    model = model_id(client)
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=1, temperature=0)
    auto = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools' JSON is in the prompt
    assert auto.choices[0].finish_reason in ("stop", "length")  # noise, not a call
    streamed = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == auto.choices[0].message.content
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    answered = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=1,
                                              temperature=0)
    assert answered.usage.prompt_tokens > auto.usage.prompt_tokens + 10


def test_none_and_bad_tool_fields(client):
    model = model_id(client)
    reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].message.tool_calls is None
    for kwargs, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"logprobs": True}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=4, **kwargs)
        assert refused.value.body["param"] == param
