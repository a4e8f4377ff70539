"""Chat's ``response_format``: ``text`` (the default), ``json_object`` and ``json_schema``, each read into the grammar
the engine constrains decoding with (``serving.grammar``)."""

from __future__ import annotations

from paddle_llm.serving.grammar import ANY_JSON_OBJECT, GrammarError, json_schema_grammar
from paddle_llm.serving.openai.protocol import RequestError

FORMATS = ("text", "json_object", "json_schema")
JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")


def response_format_grammar(body: dict) -> str | None:
    """The grammar a request's ``response_format`` asks for (None: plain text).

    ``strict`` is accepted either way: the output always follows the schema, which is what ``strict: true`` promises.

    Raises:
        RequestError: an unknown type or key, a missing name or schema, or a schema llguidance cannot compile; the
            message says which, with ``param`` ``response_format``.
    """
    response_format = body.get("response_format")
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in FORMATS:
        raise _refused(f"response_format must be an object whose type is one of {', '.join(FORMATS)}, "
                       f"got {response_format!r}")
    extra = set(response_format) - {"type"} - ({"json_schema"} if kind == "json_schema" else set())
    if extra:
        raise _refused(f"response_format of type {kind} takes no {', '.join(sorted(extra))}")
    if kind == "text":
        return None
    schema = ANY_JSON_OBJECT
    if kind == "json_schema":
        schema = _json_schema(response_format.get("json_schema"))
    try:
        return json_schema_grammar(schema)
    except GrammarError as err:
        raise _refused(f"response_format.json_schema.schema: {err}") from None


def _json_schema(spec) -> dict:
    if not isinstance(spec, dict):
        raise _refused("response_format.json_schema must be an object with name and schema")
    unknown = set(spec) - set(JSON_SCHEMA_KEYS)
    if unknown:
        raise _refused(f"response_format.json_schema takes {', '.join(JSON_SCHEMA_KEYS)}; "
                       f"got {', '.join(sorted(unknown))}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _refused("response_format.json_schema.name is required (a non-empty string)")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise _refused("response_format.json_schema.strict must be true or false")
    schema = spec.get("schema", ANY_JSON_OBJECT)
    if not isinstance(schema, dict):
        raise _refused(f"response_format.json_schema.schema must be a JSON schema object, got {type(schema).__name__}")
    return schema


def _refused(message: str) -> RequestError:
    return RequestError(message, param="response_format")
