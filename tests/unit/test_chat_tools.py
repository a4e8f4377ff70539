"""Tools through a model's own chat template: rendering them (and tool turns) into the prompt, the grammar that
forces a call, and calls read back into OpenAI's ``tool_calls``, for both ways templates write calls (Qwen2.5's
``<tool_call>`` and Llama 3.1's bare JSON)."""

import json
import os

import jsonschema
import numpy as np
import pytest

from paddle_llm.models.chat_template import render_jinja_tool_chat, renders_tools
from paddle_llm.serving.openai.chat.tools import HERMES, LLAMA3_JSON, parse_tool_calls, read_tool_request
from paddle_llm.serving.openai.protocol import RequestError

TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "assets", "chat_templates")
HF_QWEN2 = os.path.join(os.path.dirname(__file__), "..", "assets", "hf", "qwen2")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def template(name):
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name, call_text, result_text", [
    ("qwen2_5_tools.jinja", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
                            '</tool_call>', "<tool_response>\n21 degrees\n</tool_response>"),
    ("llama3_1_tools.jinja", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
     "ipython<|end_header_id|>\n\n21 degrees"),
])
def test_tools_tool_calls_and_results_are_rendered_by_the_template(name, call_text, result_text):
    text = render_jinja_tool_chat(template(name), HISTORY, TOOLS, SPECIAL)
    assert renders_tools(template(name))
    assert '"name": "get_weather"' in text and '"maxLength": 10' in text  # the tools, as JSON
    assert call_text in text and result_text in text


def test_builtin_style_template_without_tools_is_refused_naming_tools():
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert not renders_tools(plain)
    with pytest.raises(RequestError) as refused:
        read_tool_request({"tools": TOOLS}, None)
    assert refused.value.param == "tools"


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such"}}}]}, "tools"),
])
def test_malformed_tools_are_refused_naming_the_field(body, param):
    with pytest.raises(RequestError) as refused:
        read_tool_request(body, template("qwen2_5_tools.jinja"))
    assert refused.value.param == param


@pytest.mark.parametrize("syntax, text, content", [
    (HERMES, 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me look."),
    (LLAMA3_JSON, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}', None),
])
def test_calls_are_read_back_in_openai_shape(syntax, text, content):
    request = read_tool_request({"tools": TOOLS}, "{{ tools }}" + ("<tool_call>" if syntax is HERMES else ""))
    assert request.syntax is syntax
    found_content, calls = parse_tool_calls(text, request)
    assert found_content == content
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "F"}
    assert calls[0]["type"] == "function"


@pytest.mark.parametrize("text", ["Sunny today.", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
                                  '<tool_call>\n{"name": "get_time", "argu'])
def test_a_reply_that_is_no_valid_call_stays_text(text):
    request = read_tool_request({"tools": TOOLS}, "{{ tools }}<tool_call>")
    assert parse_tool_calls(text, request) == (text, [])


@pytest.mark.parametrize("text, held", [("Hello", 5), ("Hello <tool", 6), ("Hi<tool_call>\n{", 2), ("<", 0)])
def test_a_stream_holds_back_what_may_become_a_call(text, held):
    assert HERMES.held_from(text) == held
    assert LLAMA3_JSON.held_from(' {"na') == 0 and LLAMA3_JSON.held_from("Sure") == 4


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice, names", [("required", {"get_weather", "get_time"}), (NAMED, {"get_weather"})])
@pytest.mark.parametrize("name", ["qwen2_5_tools.jinja", "llama3_1_tools.jinja"])
def test_forced_call_grammar_gives_a_valid_call_from_random_logits(choice, names, name):
    from paddle_llm.models.registry import load_tokenizer
    from paddle_llm.serving.grammar import GrammarVocabulary

    tokenizer = load_tokenizer(HF_QWEN2)
    request = read_tool_request({"tools": TOOLS, "tool_choice": choice}, template(name))
    constraint = GrammarVocabulary(tokenizer, [tokenizer.eos_token_id]).constraint(request.grammar())
    rng, ids = np.random.default_rng(0), []
    while True:
        logits = constraint.process(rng.normal(size=len(tokenizer)).astype(np.float32))
        token = int(np.argmax(logits))
        constraint.accept_token(token)
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        assert len(ids) < 300
    _, calls = parse_tool_calls(tokenizer.decode(ids), request)
    assert calls and {call["function"]["name"] for call in calls} <= names
    for call in calls:
        if call["function"]["name"] == "get_weather":
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
