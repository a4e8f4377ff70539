"""Chat templates, one per model family, as data plus two small functions.

``render_chat`` turns OpenAI-style messages into the prompt text a family was tuned on (its ``ChatTemplate``,
``ModelFamily.chat_template``); ``chat_segments`` gives the
same text cut into consecutive pieces flagged ``train_on`` (True only for assistant replies), so fine-tuning can mask
prompt tokens. ``"".join(text for text, _ in chat_segments(f, m)) == render_chat(f, m, add_generation_prompt=False)``
always holds: the two functions share one renderer.

Each family's package holds its template (``ModelFamily.chat_template``, e.g. ``paddle_llm/models/llama``).
A template without a textual terminator has the trainer append the EOS token after each reply
(``ChatTemplate.append_eos_token``).
"""

from __future__ import annotations

import json

from paddle_llm.models.registry import ChatTemplate

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")


def _roles(messages: object, roles: tuple[str, ...]):
    """Each message of a conversation with its index and role, once the list, the item and the role are checked.

    Raises:
        ValueError: naming the index and field.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in roles:
            raise ValueError(f"messages[{index}].role {role!r} is not one of {', '.join(roles)}")
        yield index, message, role


def validate_messages(messages: object, add_generation_prompt: bool) -> list[dict]:
    """Check a conversation's shape and return it as a list of ``{"role", "content"}`` dicts.

    Rules: a non-empty list; each item has a known ``role`` and a string ``content``; an optional system message
    comes first; after it, turns alternate user, assistant, user, ...; a prompt for generation ends with a user turn.

    Raises:
        ValueError: the message names the offending index and field, e.g. ``messages[2].role``.
    """
    checked = []
    for index, message, role in _roles(messages, ROLES):
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    turns_start = 1 if checked[0]["role"] == "system" else 0
    for index in range(turns_start, len(checked)):
        expected = "user" if (index - turns_start) % 2 == 0 else "assistant"
        if checked[index]["role"] != expected:
            where = "only messages[0] may be 'system'" if checked[index]["role"] == "system" else "turns alternate user/assistant"
            raise ValueError(f"messages[{index}].role is {checked[index]['role']!r} but {expected!r} was expected ({where})")
    if turns_start == len(checked):
        raise ValueError("messages holds only a system message; add a user message")
    if add_generation_prompt and checked[-1]["role"] != "user":
        raise ValueError(f"messages[{len(checked) - 1}].role must be 'user' to ask for a reply, got {checked[-1]['role']!r}")
    return checked


def _render_segments(template: ChatTemplate, messages: list[dict]) -> list[tuple[str, bool]]:
    """The one renderer behind both public functions: text pieces in order, flagged True for replies."""
    segments: list[tuple[str, bool]] = []
    system = ""
    turns = messages
    if messages[0]["role"] == "system":
        system = template.system_format.format(content=messages[0]["content"])
        turns = messages[1:]
        if not template.system_inside_first_user:
            segments.append((system, False))
            system = ""
    for index, message in enumerate(turns):
        if message["role"] == "user":
            round_number = template.first_round + index // 2
            separator = template.round_separator if index > 0 else ""
            text = separator + template.user_format.format(round=round_number, system=system, content=message["content"])
            system = ""
            segments.append((text, False))
        else:
            segments.append((template.assistant_format.format(content=message["content"]), True))
    if template.conversation_prefix:  # part of the first prompt piece, never trained on
        first_text, _ = segments[0]
        segments[0] = (template.conversation_prefix + first_text, False)
    return segments


def render_chat(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render a conversation as the prompt text of a family's chat format.

    Args:
        template: the family's chat format (``ModelFamily.chat_template``).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        add_generation_prompt: the text ends where the assistant's reply begins (the last message must be the
            user's). False renders a complete conversation, e.g. for training.

    Returns:
        The prompt text.

    Raises:
        ValueError: a malformed conversation (the message names the index and field).
    """
    checked = validate_messages(messages, add_generation_prompt)
    return "".join(text for text, _ in _render_segments(template, checked))


def chat_segments(template: ChatTemplate, messages: list[dict]) -> list[tuple[str, bool]]:
    """Cut a complete conversation into consecutive text pieces, each flagged ``train_on``.

    Only assistant replies are flagged True; joining the pieces gives ``render_chat(..., add_generation_prompt=False)``.

    Raises:
        ValueError: a malformed conversation.
    """
    checked = validate_messages(messages, add_generation_prompt=False)
    return _render_segments(template, checked)


# ----- Jinja chat templates (a model directory's tokenizer_config.json "chat_template") -----


def _jinja_environment():
    # As transformers renders chat templates: sandboxed, trimmed blocks, and a raise_exception helper they call.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own: plain JSON, where Jinja's built-in escapes <, > and & for HTML.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    environment.filters["tojson"] = tojson
    return environment


def renders_tools(template: str) -> bool:
    """Whether a Jinja chat_template reads a ``tools`` variable (Qwen2's ChatML-with-tools, Llama 3.1's do)."""
    return "tools" in jinja2.meta.find_undeclared_variables(_jinja_environment().parse(template))


def _tool_call_for_template(call: object, where: str) -> dict:
    """An OpenAI ``tool_calls`` entry with its ``function.arguments`` JSON string read into an object, as
    transformers' templates take it (they write ``arguments | tojson``)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}.function.arguments is not a JSON string: {err}") from None
    return {**call, "function": {**function, "arguments": arguments}}


def validate_tool_messages(messages: object) -> list[dict]:
    """Check a conversation that may hold tool calls and tool results, for a template that renders tools.

    Beyond ``validate_messages``'s roles: an assistant turn may carry ``tool_calls`` (its content then may be null)
    and a ``tool`` turn answers one (``content`` and ``tool_call_id``). The order of turns is the template's to check.

    Raises:
        ValueError: naming the index and field.
    """
    checked = []
    for index, message, role in _roles(messages, (*ROLES, "tool")):
        content = message.get("content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if not isinstance(content, str) and not (calls and content is None):
            raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        item = {"role": role, "content": content or ""}
        if calls is not None:
            if not isinstance(calls, list):
                raise ValueError(f"messages[{index}].tool_calls must be a list")
            item["tool_calls"] = [_tool_call_for_template(call, f"messages[{index}].tool_calls[{number}]")
                                  for number, call in enumerate(calls)]
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise ValueError(f"messages[{index}].tool_call_id must be the id of the call it answers")
            item["tool_call_id"] = message["tool_call_id"]
        checked.append(item)
    if checked[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"messages[{len(checked) - 1}].role must be 'user' or 'tool' to ask for a reply, "
                         f"got {checked[-1]['role']!r}")
    return checked


def render_jinja_tool_chat(template: str, messages: list[dict], tools: list[dict] | None,
                           special_tokens: dict) -> str:
    """Render a conversation with tools (OpenAI's ``tools`` list, or None) and a generation prompt, as
    transformers' ``apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)``.

    Raises:
        ValueError: a malformed conversation, or the template refused it.
    """
    checked = validate_tool_messages(messages)
    try:
        return _jinja_environment().from_string(template).render(
            messages=checked, tools=tools, add_generation_prompt=True, **special_tokens)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"the model's chat_template refused the conversation: {err}") from None


def render_jinja_chat(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
    """Render a conversation with a Jinja ``chat_template`` as transformers' ``apply_chat_template(tokenize=False)``.

    Args:
        special_tokens: ``bos_token`` / ``eos_token`` text the template may write.

    Raises:
        ValueError: a malformed conversation, or the template refused it (its own ``raise_exception``).
    """
    checked = validate_messages(messages, add_generation_prompt)
    try:
        return _jinja_environment().from_string(template).render(
            messages=checked, add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"the model's chat_template refused the conversation: {err}") from None


def jinja_chat_segments(template: str, messages: list[dict], special_tokens: dict) -> list[tuple[str, bool]]:
    """``chat_segments`` for a Jinja template: the rendered conversation cut before and after each reply.

    A reply's text is what rendering through that reply adds to rendering up to its generation prompt; the text
    between replies is the rest. This needs a template whose rendering of the first messages is a prefix of the
    rendering of more (true of Llama-3's and Qwen2's); one that is not is refused, because replies could not be
    told apart from prompts.

    Raises:
        ValueError: a malformed conversation, or a template that rewrites earlier turns as the conversation grows.
    """
    checked = validate_messages(messages, add_generation_prompt=False)
    segments, done = [], ""
    for index, message in enumerate(checked):
        if message["role"] != "assistant":
            continue
        prompt = render_jinja_chat(template, checked[:index], True, special_tokens)
        full = render_jinja_chat(template, checked[: index + 1], False, special_tokens)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                f"the model's chat_template renders messages[:{index}] differently once messages[{index}] follows, so "
                "replies cannot be marked for training; fine-tune without it (remove chat_template from "
                "tokenizer_config.json to use the built-in template)")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments
