"""Chat's ``tools``, ``tool_choice`` and ``parallel_tool_calls``: reading them, the grammar that makes a reply a
call (``required`` or a named function), and reading calls back out of a reply into OpenAI's ``tool_calls``.

Tools reach the model through its own Jinja chat_template (``models.chat_template.render_jinja_tool_chat``); a
model whose template does not read ``tools`` is refused. Two ways of writing a call are read back, picked by the
template: Hermes / Qwen2's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (a template that mentions
``<tool_call>``), and Llama 3.1's bare ``{"name": ..., "parameters": {...}}`` (any other).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from paddle_llm.serving.grammar import GrammarError, json_schema_grammar, lark_grammar
from paddle_llm.serving.openai.protocol import RequestError

TOOL_CHOICES = ("none", "auto", "required")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
FUNCTION_KEYS = ("name", "description", "parameters", "strict")
NO_PARAMETERS = {"type": "object", "properties": {}}
LLAMA_PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class CallSyntax:
    """How a family's template writes one tool call: ``opening + {"name", arguments_key} + closing``."""

    name: str
    opening: str
    closing: str
    arguments_key: str

    def held_from(self, text: str) -> int:
        """Where the part of a reply so far that may still turn out to be a call starts (``len(text)``: nowhere):
        a stream sends the text before it and holds the rest back until the reply ends."""
        if not self.opening:  # a bare JSON call is the whole reply
            start = text.lstrip()
            return 0 if any(a.startswith(b) for a, b in ((start, "{"), ("{", start), (start, LLAMA_PYTHON_TAG),
                                                          (LLAMA_PYTHON_TAG, start))) else len(text)
        marker = self.opening.strip()
        found = text.find(marker)
        if found >= 0:
            return found
        return next((i for i in range(max(0, len(text) - len(marker) + 1), len(text)) if marker.startswith(text[i:])),
                    len(text))


HERMES = CallSyntax("hermes", "<tool_call>\n", "\n</tool_call>", "arguments")
LLAMA3_JSON = CallSyntax("llama3_json", "", "", "parameters")


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, validated.

    Attributes:
        tools: OpenAI's ``tools`` list, as the template renders it.
        choice: ``none``, ``auto``, ``required`` or ``function`` (one named function).
        allowed: the functions a forced call may name (``required``: all; ``function``: the named one).
        parallel: more than one call per reply (``parallel_tool_calls``, true by default).
        syntax: how the template writes a call.
    """

    tools: list[dict]
    choice: str
    allowed: tuple[str, ...]
    parallel: bool
    syntax: CallSyntax

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    def grammar(self) -> str | None:
        """The grammar that makes the reply one call (or several, with ``parallel``) of an allowed function with
        arguments matching its parameters; None for ``auto`` and ``none``, which decode freely."""
        if self.choice in ("auto", "none"):
            return None
        schemas = {tool["function"]["name"]: tool["function"].get("parameters") or NO_PARAMETERS for tool in self.tools}
        key = self.syntax.arguments_key
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, key: schemas[name]},
                           "required": ["name", key], "additionalProperties": False} for name in self.allowed],
                "x-guidance": {"whitespace_flexible": False}}
        pieces = [json.dumps(self.syntax.opening)] if self.syntax.opening else []
        pieces.append("%json " + json.dumps(call))
        pieces += [json.dumps(self.syntax.closing)] if self.syntax.closing else []
        more = ' ("\\n" call)*' if self.syntax is HERMES and self.parallel else ""
        try:
            return lark_grammar(f"start: call{more}\ncall: {' '.join(pieces)}\n")
        except GrammarError as err:
            raise RequestError(f"tools: a function's parameters cannot be compiled: {err}", param="tools") from None


def syntax_of(template: str) -> CallSyntax:
    return HERMES if "<tool_call>" in template else LLAMA3_JSON


def read_tool_request(body: dict, template: str | None) -> ToolRequest | None:
    """Validate ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (None: the request has no tools).

    Args:
        template: the served model's Jinja chat_template that renders tools, or None when it has none.

    Raises:
        RequestError: naming the field: tools for a model whose template has no tools, a malformed tool, a choice
            naming an unknown function, a tool_choice without tools.
    """
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if tools is None:
        for name, value in (("tool_choice", choice), ("parallel_tool_calls", parallel)):
            if value is not None:
                raise RequestError(f"{name} needs tools", param=name)
        return None
    if template is None:
        raise RequestError("tools: this model's chat template does not render tools (the built-in templates and "
                           "Jinja templates without a tools variable do not); serve a model whose "
                           "tokenizer_config.json chat_template handles tools, such as Qwen2's or Llama 3.1's",
                           param="tools", code="unsupported_field")
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list of {'type': 'function', 'function': {...}}", param="tools")
    names = [_checked_function(tool, f"tools[{index}]") for index, tool in enumerate(tools)]
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    mode, allowed = _choice(choice if choice is not None else "auto", names)
    return ToolRequest(tools, mode, allowed, parallel is not False, syntax_of(template))


def _checked_function(tool, where: str) -> str:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict):
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}",
                           param="tools")
    unknown = set(function) - set(FUNCTION_KEYS)
    if unknown:
        raise RequestError(f"{where}.function takes {', '.join(FUNCTION_KEYS)}; got {', '.join(sorted(unknown))}",
                           param="tools")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise RequestError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}",
                           param="tools")
    parameters = function.get("parameters")
    if parameters is not None:
        try:
            json_schema_grammar(parameters)
        except GrammarError as err:
            raise RequestError(f"{where}.function.parameters: {err}", param="tools") from None
    return name


def _choice(choice, names: list[str]) -> tuple[str, tuple[str, ...]]:
    if choice in TOOL_CHOICES:
        return choice, tuple(names) if choice == "required" else ()
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if name is None:
        raise RequestError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not among tools ({', '.join(names)})",
                           param="tool_choice")
    return "function", (name,)


def parse_tool_calls(text: str, request: ToolRequest) -> tuple[str | None, list[dict]]:
    """A finished reply's text before its calls, and the calls in OpenAI's shape (``[]``: the reply is no call;
    all of its text is then content). A call naming a function not among the tools, or whose JSON does not parse,
    makes the reply plain text."""
    known = {tool["function"]["name"] for tool in request.tools}
    syntax = request.syntax
    if syntax is HERMES:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        bodies = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text[start:], flags=re.DOTALL)
        content = text[:start].strip() or None
    else:
        stripped = text.strip()
        stripped = stripped[len(LLAMA_PYTHON_TAG):] if stripped.startswith(LLAMA_PYTHON_TAG) else stripped
        bodies, content = [stripped], None
    calls = []
    for body in bodies:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict):
            return text, []
        arguments = call.get(syntax.arguments_key, call.get("arguments"))
        if call.get("name") not in known or not isinstance(arguments, dict):
            return text, []
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return content, calls
