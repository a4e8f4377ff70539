"""Parse PaddleNLP-style flags into plain dicts, without building the dataclasses yet.

Building PaddleNLP's ``TrainingArguments`` runs its ``__post_init__``, which may create process groups. Parsing
to dicts first lets ``validation`` reject a bad combination before anything distributed starts.

Accepted forms, as PaddleNLP's scripts accept them:
  * ``run_pretrain.py args.json --flag value``: the JSON file first, command-line flags override it;
  * ``--flag value``, ``--flag=value``; a bare boolean flag means true; booleans take 1/0/true/false/True/False;
  * list flags take several values (``--report_to visualdl wandb``);
  * aliases: ``--tensor_model_parallel_size``, ``--pipeline_model_parallel_size``, ``--lora_rank``, and
    PaddleNLP 3.0.0b4's ``--weight_blocksize``, ``--weight_double_quant``, ``--weight_double_quant_block_size``.
An unknown flag is an error naming it and the closest known flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
import sys
import typing
from dataclasses import dataclass

# alias -> canonical field name
ALIASES = {
    "tensor_model_parallel_size": "tensor_parallel_degree",
    "pipeline_model_parallel_size": "pipeline_parallel_degree",
    "lora_rank": "r",
    # PaddleNLP 3.0.0b4's own spellings of the QLoRA flags (its QuantizationConfig field names)
    "weight_blocksize": "qlora_weight_blocksize",
    "weight_double_quant": "qlora_weight_double_quant",
    "weight_double_quant_block_size": "qlora_weight_double_quant_block_size",
}
TRUE_WORDS = {"1", "true", "yes", "y", "t", "on"}
FALSE_WORDS = {"0", "false", "no", "n", "f", "off"}
# "20--dataloader_num_workers": a shell line ending in "20\" joined to the next line's flag (seen in pasted scripts)
FUSED_TOKEN = re.compile(r"^(?P<value>[^-\s][^\s]*?)--(?P<flag>[A-Za-z_][A-Za-z0-9_]*)$")


class ArgumentError(ValueError):
    """A flag or args-file problem; the message names the flag, or the file and line."""


@dataclass
class ParsedArgs:
    """Effective values (defaults overlaid with the file and the command line), grouped by dataclass."""

    groups: list[dict]
    explicit: set[str]

    def as_dict(self) -> dict:
        """Every flag's effective value in one flat dict (field names are unique across the dataclasses)."""
        return {name: value for group in self.groups for name, value in group.items()}

    def value(self, name: str):
        for group in self.groups:
            if name in group:
                return group[name]
        raise KeyError(name)

    def set(self, name: str, value) -> None:
        for group in self.groups:
            if name in group:
                group[name] = value
                return
        raise KeyError(name)

    def build(self, dataclass_types) -> list:
        """Instantiate the dataclasses (this runs their ``__post_init__``)."""
        return [cls(**values) for cls, values in zip(dataclass_types, self.groups)]


def _field_kind(field: dataclasses.Field, hints: dict) -> tuple[type, bool]:
    """Return (scalar type, is_list) for a field, looking through Optional[...]."""
    annotation = hints.get(field.name, str)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, typing.List):
        return (args[0] if args else str), True
    return annotation, False


def _convert(name: str, raw, kind: type):
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ArgumentError(f"--{name} takes a boolean (1/0/true/false), got {raw!r}")
    if kind in (int, float):
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise ArgumentError(f"--{name} takes {'a number' if kind is float else 'an integer'}, got {raw!r}") from None
        if kind is float:
            return number
        if not number.is_integer():
            raise ArgumentError(f"--{name} takes an integer, got {raw!r}")
        return int(number)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choices = [m.value for m in kind]
        if raw not in choices:
            raise ArgumentError(f"--{name} must be one of {', '.join(map(str, choices))}, got {raw!r}")
        return raw
    return raw if isinstance(raw, str) or raw is None else str(raw) if kind is str else raw


def _schema(dataclass_types) -> dict[str, tuple[int, dataclasses.Field, type, bool]]:
    schema = {}
    for group_index, cls in enumerate(dataclass_types):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init:
                kind, is_list = _field_kind(field, hints)
                schema[field.name] = (group_index, field, kind, is_list)
    return schema


def _split_fused_tokens(argv: list[str], known: set[str]) -> list[str]:
    tokens = []
    for token in argv:
        match = FUSED_TOKEN.match(token)
        if match and _canonical(match["flag"]) in known:
            print(
                f"paddle_llm: warning: split {token!r} into {match['value']!r} and '--{match['flag']}' "
                "(a missing space before a line-continuation backslash?)",
                file=sys.stderr,
            )
            tokens += [match["value"], "--" + match["flag"]]
        else:
            tokens.append(token)
    return tokens


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


def _read_args_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ArgumentError(f"{path}: args file not found") from None
    except json.JSONDecodeError as err:
        raise ArgumentError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(values, dict):
        raise ArgumentError(f"{path}: expected a JSON object mapping flag names to values")
    return values


def _command_line_values(tokens: list[str], schema: dict) -> dict:
    values: dict = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise ArgumentError(f"unexpected argument {token!r}: flags look like --name value")
        name, has_inline, inline = token[2:].partition("=")
        name = _canonical(name)
        if name not in schema:
            raise ArgumentError(f"unknown flag --{name}{_suggestion(name, schema)}")
        index += 1
        raw_values = [inline] if has_inline else []
        while not has_inline and index < len(tokens) and not tokens[index].startswith("--"):
            raw_values.append(tokens[index])
            index += 1
        _, _, kind, is_list = schema[name]
        if is_list:
            values[name] = raw_values
        elif not raw_values:
            if kind is not bool:
                raise ArgumentError(f"--{name} needs a value")
            values[name] = True
        elif len(raw_values) > 1:
            raise ArgumentError(f"--{name} takes one value, got {len(raw_values)}: {' '.join(raw_values)}")
        else:
            values[name] = raw_values[0]
    return values


def parse_flags(argv: list[str], dataclass_types) -> ParsedArgs:
    """Parse ``argv`` (optionally starting with a JSON args file) into per-dataclass dicts of effective values.

    Raises:
        ArgumentError: an unknown flag (with the closest known one), a bad value, or a bad args file.
    """
    schema = _schema(dataclass_types)
    supplied: dict = {}
    if argv and argv[0].endswith(".json"):
        for name, raw in _read_args_file(argv[0]).items():
            canonical = _canonical(name)
            if canonical not in schema:
                raise ArgumentError(f"{argv[0]}: {name!r} is not a known flag{_suggestion(canonical, schema)}")
            supplied[canonical] = raw
        argv = argv[1:]
    supplied.update(_command_line_values(_split_fused_tokens(argv, set(schema)), schema))

    converted = {}
    for name, raw in supplied.items():
        _, _, kind, is_list = schema[name]
        if is_list:
            converted[name] = [_convert(name, item, kind) for item in (raw if isinstance(raw, list) else [raw])]
        else:
            converted[name] = None if raw is None else _convert(name, raw, kind)
    groups: list[dict] = [{} for _ in dataclass_types]
    for name, (group_index, field, kind, is_list) in schema.items():
        if name in converted:
            value = converted[name]
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            raise ArgumentError(f"--{name} is required")
        groups[group_index][name] = value
    return ParsedArgs(groups=groups, explicit=set(supplied))


def _suggestion(name: str, schema: dict) -> str:
    close = difflib.get_close_matches(name, sorted(set(schema) | set(ALIASES)), n=1, cutoff=0.6)
    return f"; did you mean --{close[0]}?" if close else ""


def format_help(dataclass_types, usage: str, epilog: str = "") -> str:
    """A ``--help`` text listing every flag with its default and help, grouped by dataclass."""
    sections = [usage]
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        rows = []
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            kind, is_list = _field_kind(field, hints)
            default = field.default if field.default is not dataclasses.MISSING else ("[]" if is_list else "required")
            text = " ".join(str(field.metadata.get("help", "")).split())
            rows.append(f"  --{field.name} ({getattr(kind, '__name__', kind)}, default {default})" + (f"\n      {text}" if text else ""))
        sections.append(f"{cls.__name__}:\n" + "\n".join(rows))
    if epilog:
        sections.append(epilog)
    return "\n\n".join(sections)
