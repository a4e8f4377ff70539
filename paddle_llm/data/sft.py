"""Supervised fine-tuning data: read records, render them the way a model family expects, tokenize with the prompt
masked out of the loss, and truncate with a report.

Four record formats, one JSON object per line (``train.json`` / ``dev.json`` in ``--dataset_name_or_path``):

- ``src_tgt``  ``{"src": str | [str], "tgt": str | [str]}`` (PaddleNLP's; lists are the rounds of a conversation)
- ``alpaca``   ``{"instruction": str, "input": str (optional), "output": str}``
- ``chat``     ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
- ``sharegpt`` ``{"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}``

Every record becomes a conversation. A single-turn ``src_tgt`` record is plain text (prompt, then reply, then EOS: the
PaddleNLP default) unless ``--instruction_generation`` is on; everything else is rendered with the family's chat
template (``paddle_llm.models.chat_template``). Only assistant replies are trained on.

ChatGLM-6B (v1) is a GLM: it reads its context bidirectionally, then generates after ``[gMASK]<sop>`` with 2-D
positions. Its samples are laid out that way (``glm_context``): every round before the last is context, and only the
last reply is trained on, as in ChatGLM's and PaddleNLP's own fine-tuning.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from paddle_llm.data.jsonl import DataError, LazyJsonlDataset, iter_jsonl_records, questionable_records
from paddle_llm.data.packing import pack_best_fit_decreasing, pack_greedy, packing_stats
from paddle_llm.models.chat_template import chat_segments, jinja_chat_segments, validate_messages
from paddle_llm.models.registry import ModelFamily

IGNORE_INDEX = -100  # PaddleNLP's criteria skip this label
RECORD_FORMATS = ("src_tgt", "alpaca", "chat", "sharegpt")
# The keys that identify a format, checked in this order by auto-detection.
FORMAT_KEYS = {"chat": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"), "src_tgt": ("src", "tgt")}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Record:
    """One record, normalised to a conversation.

    Attributes:
        messages: ``[{"role", "content"}, ...]``: an optional system message, then user/assistant turns, ending
            with an assistant reply.
        templated: render with the family's chat template (False: plain prompt text, then the reply).
        where: ``path:line``, for messages about this record.
    """

    messages: tuple
    templated: bool
    where: str

    @property
    def reference(self) -> str:
        """The last reply: what generation-based evaluation compares against."""
        return self.messages[-1]["content"]


def _field_error(where: str, field_name: str, problem: str) -> DataError:
    return DataError(f"{where}: field {field_name!r}: {problem}")


def _require_string(record: dict, key: str, where: str, allow_empty: bool = True) -> str:
    if key not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: missing field {key!r} (fields present: {keys})")
    value = record[key]
    if not isinstance(value, str):
        raise _field_error(where, key, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _field_error(where, key, "is empty")
    return value


def _string_list(record: dict, key: str, where: str) -> list[str]:
    if key not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: missing field {key!r} (fields present: {keys})")
    value = record[key]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _field_error(where, key, "is an empty list")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            name = f"{key}[{index}]" if isinstance(value, list) else key
            raise _field_error(where, name, f"must be a string, got {type(item).__name__}")
    return items


def _checked_conversation(messages: list, where: str, field_name: str) -> tuple:
    """Validate roles and order with the chat-template rules; a training conversation must end with a reply."""
    try:
        checked = validate_messages(messages, add_generation_prompt=False)
    except ValueError as err:
        raise DataError(f"{where}: field {field_name!r}: {str(err).replace('messages', field_name, 1)}") from None
    if checked[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {field_name!r}: the last message must be the assistant's reply to train on, got {checked[-1]['role']!r}")
    return tuple(checked)


def parse_record(record: object, record_format: str, where: str, instruction_generation: bool) -> Record:
    """Turn one decoded JSON line into a ``Record``.

    Raises:
        DataError: the message names ``where`` (file:line) and the offending field.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record_format == "src_tgt":
        sources, targets = _string_list(record, "src", where), _string_list(record, "tgt", where)
        if len(sources) != len(targets):
            raise _field_error(where, "tgt", f"has {len(targets)} replies for {len(sources)} prompts in 'src'; give one reply per prompt")
        messages = []
        for source, target in zip(sources, targets):
            messages += [{"role": "user", "content": source}, {"role": "assistant", "content": target}]
        # One plain round is PaddleNLP's generation fine-tuning; rounds need a template to be told apart.
        return Record(tuple(messages), templated=instruction_generation or len(sources) > 1, where=where)
    if record_format == "alpaca":
        instruction = _require_string(record, "instruction", where, allow_empty=False)
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise _field_error(where, "input", f"must be a string, got {type(extra).__name__}")
        output = _require_string(record, "output", where)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Record((({"role": "user", "content": prompt}), {"role": "assistant", "content": output}), True, where)
    if record_format == "chat":
        messages = record.get("messages")
        if "messages" not in record:
            raise DataError(f"{where}: missing field 'messages' (fields present: {', '.join(sorted(record)) or 'none'})")
        return Record(_checked_conversation(messages, where, "messages"), True, where)
    if record_format == "sharegpt":
        if "conversations" not in record:
            raise DataError(f"{where}: missing field 'conversations' (fields present: {', '.join(sorted(record)) or 'none'})")
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _field_error(where, "conversations", "must be a non-empty list of {from, value} objects")
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise _field_error(where, f"conversations[{index}]", f"must be an object, got {type(turn).__name__}")
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise _field_error(where, f"conversations[{index}].from", f"{speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}")
            value = turn.get("value")
            if not isinstance(value, str):
                raise _field_error(where, f"conversations[{index}].value", f"must be a string, got {type(value).__name__}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
        return Record(_checked_conversation(messages, where, "conversations"), True, where)
    raise ValueError(f"unknown record format {record_format!r}; use one of {', '.join(RECORD_FORMATS)}")


def detect_format(record: object) -> str | None:
    """The format whose identifying keys a record has, or None."""
    if not isinstance(record, dict):
        return None
    for name, keys in FORMAT_KEYS.items():
        if all(key in record for key in keys):
            return name
    return None


@dataclass
class ReadResult:
    """What ``read_records`` found in one file."""

    path: str
    record_format: str
    records: list[Record]  # empty when read lazily (``read_records``' ``hold``)
    skipped: list[str] = field(default_factory=list)  # one error message per skipped line
    questionable: str | None = None  # one line about records that teach nothing (``questionable_records``)
    count: int = 0  # good records read


def read_records(path: str, data_format: str = "auto", instruction_generation: bool = False, skip_bad_lines: bool = False,
                 strict_data: bool = False, keep: Callable[[Record, int, int], None] | None = None,
                 hold: bool = True) -> ReadResult:
    """Read a jsonl file of fine-tuning records.

    Args:
        path: the file.
        data_format: one of ``RECORD_FORMATS``, or ``auto`` to detect it from the file's first record.
        instruction_generation: render single-turn src/tgt records with the chat template.
        skip_bad_lines: skip (and report) malformed records instead of failing on the first one.
        strict_data: fail on records with an empty reply (they train only the end-of-reply token) instead of
            counting them in ``questionable``.
        keep: called with ``(record, line_number, byte_offset)`` for each good record.
        hold: keep the good records in ``records``; False for ``--lazy``, where only ``keep`` sees them.

    Returns:
        The records, the format used, the skipped lines' errors and the records with an empty reply.

    Raises:
        DataError: a missing or empty file, a bad record (without ``skip_bad_lines``), no good record at all, or
            (with ``strict_data``) a record with an empty reply.
    """
    skipped, records, empty, count = [], [], [], 0
    record_format = None if data_format == "auto" else data_format
    for record, record_format, line_number, offset in iter_jsonl_records(
        path,
        detect_format,
        lambda decoded, found, where: parse_record(decoded, found, where, instruction_generation),
        skip_bad_lines,
        "src/tgt, instruction/input/output, messages or conversations (or set --data_format)",
        skipped,
        record_format,
    ):
        count += 1
        if any(m["role"] == "assistant" and not m["content"].strip() for m in record.messages):
            empty.append(record.where)
        if hold:
            records.append(record)
        if keep is not None:
            keep(record, line_number, offset)
    notice = questionable_records(path, empty, "records with an empty reply, which train only the end-of-reply token", strict_data)
    return ReadResult(path, record_format, records, skipped, notice, count)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass(frozen=True)
class FamilyLayout:
    """How a model family frames a tokenized conversation, read off its tokenizer.

    Attributes:
        family: the family name (selects the chat template).
        prefix_ids: special tokens before everything (Llama's BOS, ChatGLM2's ``[gMASK]<sop>``).
        reply_start_ids: special tokens between the context and the generated reply (ChatGLM's ``[gMASK]<sop>``).
        eos_id: ends every reply, so the model learns to stop.
        pad_id: fills batches; never attended to, never trained on.
        glm_context: bidirectional context and 2-D positions (see the module docstring).
    """

    family: ModelFamily
    prefix_ids: tuple[int, ...]
    reply_start_ids: tuple[int, ...]
    eos_id: int
    pad_id: int
    glm_context: bool

    @property
    def needs_explicit_mask(self) -> bool:
        """True when even one unpacked sample needs a 4-D mask and positions (the model has no causal default)."""
        return self.glm_context


def family_layout(family: ModelFamily, tokenizer) -> FamilyLayout:
    """Read a family's framing tokens from its tokenizer's ``build_inputs_with_special_tokens``."""
    sentinel = -1
    framed = list(tokenizer.build_inputs_with_special_tokens([sentinel]))
    at = framed.index(sentinel)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return FamilyLayout(
        family=family,
        prefix_ids=tuple(framed[:at]),
        reply_start_ids=tuple(framed[at + 1 :]),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(pad_id),
        glm_context=family.glm_context,
    )


@dataclass(frozen=True)
class Limits:
    """Length limits, in tokens (``--src_length``, ``--max_length``)."""

    src_length: int
    max_length: int


@dataclass(frozen=True)
class SftSample:
    """One training sample, already shifted: ``labels[i]`` is the token after ``input_ids[i]``, or ``IGNORE_INDEX``.

    Attributes:
        input_ids: int64 token ids.
        labels: int64, same length; ``IGNORE_INDEX`` wherever the next token is not a reply token.
        context_length: GLM only: ``input_ids[:context_length]`` is the bidirectional context (0 otherwise).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    context_length: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Round:
    prompt: list[int]
    reply: list[int]


def _segments(record: Record, family: ModelFamily, tokenizer) -> list[tuple[str, bool]]:
    if record.templated:
        # A model directory's own Jinja chat_template (kept on its tokenizer) wins over the family's built-in one.
        jinja = getattr(tokenizer, "jinja_chat_template", None)
        if jinja:
            special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
            return jinja_chat_segments(jinja, list(record.messages), special)
        return chat_segments(family.chat_template, list(record.messages))
    return [(record.messages[0]["content"], False), (record.messages[1]["content"], True)]


def _rounds(record: Record, layout: FamilyLayout, tokenizer) -> tuple[list[int], list[Round]]:
    """Tokenize a record into (prefix, rounds); each reply carries its EOS when the text has no terminator."""
    # A Jinja template writes each reply's terminator itself.
    jinja = getattr(tokenizer, "jinja_chat_template", None)
    append_eos = not record.templated or (not jinja and layout.family.chat_template.append_eos_token)
    rounds, prompt = [], []
    for text, train_on in _segments(record, layout.family, tokenizer):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        if not train_on:
            prompt += ids
            continue
        rounds.append(Round(prompt, ids + [layout.eos_id] if append_eos else ids))
        prompt = []
    prefix = list(layout.prefix_ids)
    # Llama's template writes "<s>" as text; the tokenizer already made it the BOS id.
    if prefix and rounds and rounds[0].prompt[: len(prefix)] == prefix:
        prefix = []
    return prefix, rounds


class TruncationReport(Counter):
    """Counts of what truncation did, by reason; ``str()`` is the one-line summary the recipe logs."""

    REASONS = {
        "prompt_truncated": "prompts cut to --src_length (start removed)",
        "rounds_dropped": "conversations lost early rounds to fit --max_length",
        "reply_truncated": "replies cut to fit --max_length",
        "dropped_prompt_too_long": "samples dropped: the prompt leaves no room for a reply within --max_length",
    }

    def describe(self) -> str:
        parts = [f"{self[key]} {text}" for key, text in self.REASONS.items() if self[key]]
        return "; ".join(parts) if parts else "nothing truncated"


def _fit(prefix: list[int], rounds: list[Round], layout: FamilyLayout, limits: Limits, reply_room: int, report: Counter) -> list[Round] | None:
    """Apply the length rules in place of PaddleNLP's: prompts to src_length, then whole early rounds, then the
    last reply. ``reply_room`` is how many reply tokens must fit (all of them for training, the generation budget
    for a prompt). Returns the rounds kept, or None when even an empty reply does not fit."""
    cut = False
    for item in rounds:
        if len(item.prompt) > limits.src_length:
            item.prompt = item.prompt[-limits.src_length :]
            cut = True
    report["prompt_truncated"] += cut
    fixed = len(prefix) + len(layout.reply_start_ids)

    def total(kept: list[Round]) -> int:
        return fixed + sum(len(r.prompt) + len(r.reply) for r in kept[:-1]) + len(kept[-1].prompt) + reply_room

    kept = list(rounds)
    while len(kept) > 1 and total(kept) > limits.max_length:
        kept.pop(0)
    report["rounds_dropped"] += len(kept) < len(rounds)
    room_left = limits.max_length - (total(kept) - reply_room)
    if room_left < 1:  # not even one reply token (the one thing a sample is trained on) fits
        report["dropped_prompt_too_long"] += 1
        return None
    if reply_room and len(kept[-1].reply) > room_left:
        kept[-1].reply = kept[-1].reply[:room_left]
        report["reply_truncated"] += 1
    return kept


def _assemble(prefix: list[int], rounds: list[Round], layout: FamilyLayout, include_last_reply: bool) -> tuple[list[int], list[bool], int]:
    """Tokens, per-token "is a training target" flags, and the GLM context length (0 when not a GLM)."""
    tokens, targets = list(prefix), [False] * len(prefix)
    context_length = 0
    for index, item in enumerate(rounds):
        last = index == len(rounds) - 1
        tokens += item.prompt
        targets += [False] * len(item.prompt)
        if last:
            tokens += layout.reply_start_ids
            targets += [False] * len(layout.reply_start_ids)
            if layout.glm_context:
                context_length = len(tokens) - 1  # ChatGLM: the context ends where <sop> starts the reply
            if not include_last_reply:
                break
        trained = last or not layout.glm_context
        tokens += item.reply
        targets += [trained] * len(item.reply)
    return tokens, targets, context_length


def prompt_ids_as_trained(family: ModelFamily, tokenizer, messages: list[dict], templated: bool) -> list[int]:
    """The ids a model fine-tuned here sees before its reply, for a conversation that ends with a user turn.

    Serving encodes requests with this, so a fine-tuned model is asked exactly as it was trained: the same
    segments tokenized the same way, with the same BOS and reply framing (a whole rendered prompt tokenized in one
    piece differs at segment boundaries, and such a model may answer nothing at all).

    Args:
        family: the model's family (``models.registry.ModelFamily``).
        tokenizer: the model's tokenizer.
        messages: the conversation so far; a completion prompt is one user message.
        templated: render with the chat template (chat requests) or as plain text (completion requests).

    Raises:
        ValueError: a malformed conversation (from the chat template).
    """
    layout = family_layout(family, tokenizer)
    record = Record(tuple(messages) + ({"role": "assistant", "content": ""},), templated, "request")
    prefix, rounds = _rounds(record, layout, tokenizer)
    tokens, _, _ = _assemble(prefix, rounds, layout, include_last_reply=False)
    return tokens


def tokenize_record(record: Record, layout: FamilyLayout, tokenizer, limits: Limits, report: Counter) -> SftSample | None:
    """Tokenize, truncate and shift one record into a training sample (None when it cannot fit; see ``report``)."""
    prefix, rounds = _rounds(record, layout, tokenizer)
    reply_length = len(rounds[-1].reply)
    kept = _fit(prefix, rounds, layout, limits, reply_length, report)
    if kept is None:
        return None
    tokens, targets, context_length = _assemble(prefix, kept, layout, include_last_reply=True)
    ids = np.asarray(tokens, dtype="int64")
    labels = np.where(np.asarray(targets[1:], dtype=bool), ids[1:], IGNORE_INDEX).astype("int64")
    return SftSample(ids[:-1], labels, context_length)


@dataclass(frozen=True)
class GenerationPrompt:
    """A dev record's prompt for greedy decoding, with the reply it should produce."""

    input_ids: list[int]
    context_length: int
    reference: str


def generation_prompt(record: Record, layout: FamilyLayout, tokenizer, limits: Limits, max_new_tokens: int) -> GenerationPrompt | None:
    """Everything before the last reply, framed as at training time, leaving ``max_new_tokens`` of room."""
    prefix, rounds = _rounds(record, layout, tokenizer)
    kept = _fit(prefix, rounds, layout, limits, min(max_new_tokens, limits.max_length - 1), Counter())
    if kept is None:
        return None
    tokens, _, context_length = _assemble(prefix, kept, layout, include_last_reply=False)
    return GenerationPrompt(tokens, context_length, record.reference)


# ---------------------------------------------------------------------------------------------------------------------
# Model inputs for a row of one or more samples


def sample_mask_and_positions(length: int, context_length: int, glm: bool) -> tuple[np.ndarray, np.ndarray]:
    """The attention block (bool ``[length, length]``, True = may attend) and positions of one sample.

    Causal, except a GLM context, which every token sees whole. Positions count from 0; a GLM has a second row of
    "block" positions, and every token from ``<sop>`` on sits at the ``[gMASK]`` position (ChatGLM's own rule).
    """
    block = np.tril(np.ones((length, length), dtype=bool))
    positions = np.arange(length, dtype="int64")
    if not glm:
        return block, positions
    block[:, :context_length] = True
    block_positions = np.zeros(length, dtype="int64")
    if context_length:
        positions[context_length:] = context_length - 1
        block_positions[context_length:] = np.arange(1, length - context_length + 1)
    return block, np.stack([positions, block_positions])


class SftCollator:
    """Turn rows (each a list of samples: one when unpacked, several when packed) into a padded batch.

    Rows are padded on the right to the longest row. Unpacked rows of a causal model need nothing but ``input_ids``
    and ``labels`` (a token never looks right, so padding is invisible). Packed rows, and every GLM row, also get a
    block-diagonal 4-D bool mask ``[batch, 1, seq, seq]`` and positions that restart at each sample, so attention
    never crosses a sample boundary and each sample is computed exactly as if it were alone. Padding tokens attend
    only to themselves (a fully masked row would be NaN in some kernels).

    Args:
        layout: the family's framing.
        pad_to: pad every batch to this width instead of its longest row. Pipeline parallel needs it: fleet's 1F1B
            steady state sends activations without fresh shape metadata, so every micro-batch must have one shape
            (a narrower one corrupts the receiver's buffer on gloo).
    """

    def __init__(self, layout: FamilyLayout, pad_to: int | None = None):
        self.layout = layout
        self.pad_to = pad_to

    def __call__(self, rows: list) -> dict:
        rows = [row if isinstance(row, (list, tuple)) else [row] for row in rows]
        width = max(max(sum(len(sample) for sample in row) for row in rows), self.pad_to or 0)
        batch = len(rows)
        input_ids = np.full((batch, width), self.layout.pad_id, dtype="int64")
        labels = np.full((batch, width), IGNORE_INDEX, dtype="int64")
        explicit = self.layout.needs_explicit_mask or any(len(row) > 1 for row in rows)
        if explicit:
            mask = np.zeros((batch, 1, width, width), dtype=bool)
            position_rows = 2 if self.layout.glm_context else 1
            positions = np.zeros((batch, position_rows, width), dtype="int64")
        for b, row in enumerate(rows):
            offset = 0
            for sample in row:
                end = offset + len(sample)
                input_ids[b, offset:end] = sample.input_ids
                labels[b, offset:end] = sample.labels
                if explicit:
                    block, sample_positions = sample_mask_and_positions(len(sample), sample.context_length, self.layout.glm_context)
                    mask[b, 0, offset:end, offset:end] = block
                    positions[b, :, offset:end] = sample_positions
                offset = end
            if explicit:
                padding = np.arange(offset, width)
                mask[b, 0, padding, padding] = True
        features = {"input_ids": input_ids, "labels": labels}
        if explicit:
            features["attention_mask"] = mask
            features["position_ids"] = positions if self.layout.glm_context else positions[:, 0]
        return features


# ---------------------------------------------------------------------------------------------------------------------
# Splits


class RowDataset:
    """A map-style dataset of rows (lists of ``SftSample``), in the order the trainer should read them."""

    def __init__(self, rows: list[list[SftSample]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[SftSample]:
        return self.rows[index]


@dataclass
class SftSplit:
    """One file turned into trainer rows, and what happened on the way (for the log).

    Attributes:
        read: the records read and the lines skipped.
        samples: the tokenized samples kept.
        dataset: the rows the trainer reads (one sample each, or packs).
        report: truncation counts.
        packing: packing statistics when ``--zero_padding``.
    """

    read: ReadResult
    samples: list[SftSample]  # empty when read lazily
    dataset: RowDataset | LazyJsonlDataset
    report: TruncationReport
    packing: object | None
    sample_count: int = 0
    tokens: int = 0  # in every sample kept

    @property
    def tokens_per_row(self) -> float:
        return self.tokens / max(1, len(self.dataset))

    def summary(self) -> str:
        read = self.read
        text = (
            f"{read.path}: {read.count} records ({read.record_format}), {self.sample_count} samples; "
            f"{self.report.describe()}"
        )
        if read.skipped:
            text += f"; {len(read.skipped)} bad lines skipped"
        if self.packing is not None:
            text += (
                f"; packed into {self.packing.sequences} sequences of <= {self.packing.capacity} tokens "
                f"({self.packing.padding_fraction:.1%} padding)"
            )
        if isinstance(self.dataset, LazyJsonlDataset):
            text += "; read lazily (--lazy: each row is read from the file when the trainer asks for it)"
        return text


def build_split(
    path: str,
    layout: FamilyLayout,
    tokenizer,
    limits: Limits,
    data_format: str = "auto",
    instruction_generation: bool = False,
    skip_bad_lines: bool = False,
    strict_data: bool = False,
    zero_padding: bool = False,
    shuffle_seed: int | None = None,
    greedy_zero_padding: bool = False,
    lazy: bool = False,
) -> SftSplit:
    """Read, tokenize, truncate and (optionally) pack one file.

    Args:
        greedy_zero_padding: pack with PaddleNLP's greedy packing (``packing.pack_greedy``) instead of best-fit
            decreasing.
        shuffle_seed: shuffle samples (and packs) with this seed; None keeps file order. The trainer reads rows in
            order, so a resumed run sees exactly the batches an uninterrupted one would.
        lazy: keep only where each kept sample's line is (and its length, for packing), and read it again when the
            trainer asks for its row (``LazyJsonlDataset``); the rows, their order and so every batch are the ones
            read whole.

    Raises:
        DataError: bad records (see ``read_records``), or no sample fits the length limits.
    """
    report = TruncationReport()
    kept, lengths, tokens = [], [], 0

    def keep(record: Record, line_number: int, offset: int) -> None:
        nonlocal tokens
        sample = tokenize_record(record, layout, tokenizer, limits, report)
        if sample is not None:
            kept.append((line_number, offset) if lazy else sample)
            lengths.append(len(sample))
            tokens += len(sample)

    read = read_records(path, data_format, instruction_generation, skip_bad_lines, strict_data, keep, hold=not lazy)
    if not kept:
        raise DataError(f"{path}: no record fits --max_length {limits.max_length} ({report.describe()})")
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        order = rng.permutation(len(kept))
        kept, lengths = [kept[i] for i in order], [lengths[i] for i in order]
    stats = None
    if zero_padding:
        packs = (pack_greedy if greedy_zero_padding else pack_best_fit_decreasing)(lengths, limits.max_length)
        stats = packing_stats(lengths, packs, limits.max_length)
        if rng is not None:
            packs = [packs[i] for i in rng.permutation(len(packs))]
        rows = [[kept[i] for i in pack] for pack in packs]
    else:
        rows = [[item] for item in kept]
    if lazy:

        def make_row(lines: list[tuple[object, str]]) -> list[SftSample]:
            return [tokenize_record(parse_record(decoded, read.record_format, where, instruction_generation), layout, tokenizer, limits, TruncationReport())
                    for decoded, where in lines]

        return SftSplit(read, [], LazyJsonlDataset(path, rows, make_row), report, stats, len(kept), tokens)
    samples = kept
    return SftSplit(read, samples, RowDataset(rows), report, stats, len(samples), tokens)
