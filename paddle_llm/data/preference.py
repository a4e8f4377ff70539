"""Preference data for DPO: read pairs of replies to one prompt, frame them with the model's chat template, and
tokenize each as prompt + reply with the prompt masked out of the loss.

Two record formats, one JSON object per line (``--train_dataset_path`` / ``--dev_dataset_path``):

- ``paddlenlp``  ``{"src": str | [str], "tgt": str | [str], "response": [str, str], "sort": [int, int]}``, PaddleNLP's
  (``paddlenlp.trl.trl_data``): ``src`` holds one more prompt than ``tgt`` holds replies (earlier rounds of the
  conversation), ``response`` the two candidate last replies and ``sort`` their ranks; the higher rank is chosen.
- ``pairwise``   ``{"prompt": str | [messages], "chosen": str, "rejected": str}``, the common one, or ``messages`` (a
  conversation ending with the user's turn) instead of ``prompt``; ``chosen``/``rejected`` may also be a list
  holding one assistant message.

Each pair becomes two ``SftSample``s (prompt + chosen, prompt + rejected) that share the prompt tokens exactly, so a
log-probability difference is a difference of the replies alone. Truncation follows PaddleNLP's rule for
``--max_seq_len``/``--max_prompt_len``: when prompt and both replies exceed ``max_seq_len`` together, the prompt
keeps its last ``max_prompt_len`` tokens, then both replies are cut in proportion to their lengths.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from paddle_llm.data.jsonl import DataError, LazyJsonlDataset, iter_jsonl_records, questionable_records
from paddle_llm.data.sft import (
    FamilyLayout,
    Record,
    Round,
    SftCollator,
    SftSample,
    _assemble,
    _checked_conversation,
    _field_error,
    _rounds,
    _string_list,
    IGNORE_INDEX,
)

PREFERENCE_FORMATS = ("paddlenlp", "pairwise")
PACKED_LABELS = ("chosen_labels", "rejected_labels")  # a packed batch's labels, PaddleNLP's names


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference: a conversation ending with the user's turn, and two replies to it.

    Attributes:
        prompt: ``({"role", "content"}, ...)``, ending with a user message.
        chosen: the preferred reply.
        rejected: the other reply.
        where: ``path:line``, for messages about this record.
    """

    prompt: tuple
    chosen: str
    rejected: str
    where: str


def detect_preference_format(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    if all(key in record for key in ("src", "response", "sort")):
        return "paddlenlp"
    if "chosen" in record and "rejected" in record:
        return "pairwise"
    return None


def _reply(record: dict, key: str, where: str) -> str:
    """``chosen``/``rejected``: a non-empty string, or ``[{"role": "assistant", "content": str}]``."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise _field_error(where, key, f"must be a string (or a list of one assistant message), got {type(value).__name__}")
    if not value.strip():
        raise _field_error(where, key, "is empty")
    return value


def _prompt_conversation(messages: object, where: str, field_name: str) -> tuple:
    """A prompt conversation: the chat-template rules, ending with the user's turn (the replies come after it)."""
    if not isinstance(messages, list) or not messages:
        raise _field_error(where, field_name, "must be a non-empty list of {role, content} messages")
    return _checked_conversation(messages + [{"role": "assistant", "content": ""}], where, field_name)[:-1]


def parse_preference(record: object, record_format: str, where: str) -> PreferenceRecord:
    """Turn one decoded JSON line into a ``PreferenceRecord``.

    Raises:
        DataError: the message names ``where`` (file:line) and the offending field.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record_format == "paddlenlp":
        sources = _string_list(record, "src", where)
        # a first-turn preference has no earlier replies: PaddleNLP's files write "tgt": [] (or leave it out)
        targets = _string_list(record, "tgt", where) if record.get("tgt") not in (None, []) else []
        if len(sources) != len(targets) + 1:
            raise _field_error(where, "src", f"has {len(sources)} prompts for {len(targets)} earlier replies in 'tgt'; give one more prompt than replies (the last prompt is the one the responses answer)")
        responses, ranks = record.get("response"), record.get("sort")
        if not isinstance(responses, list) or len(responses) != 2:
            raise _field_error(where, "response", "must be a list of 2 replies")
        for index, response in enumerate(responses):
            if not isinstance(response, str) or not response.strip():
                raise _field_error(where, f"response[{index}]", "must be a non-empty string")
        if not isinstance(ranks, list) or len(ranks) != 2 or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise _field_error(where, "sort", "must be a list of 2 integers (the higher one marks the chosen response)")
        if ranks[0] == ranks[1]:
            raise _field_error(where, "sort", f"both responses rank {ranks[0]}; give the chosen one the higher number")
        messages = []
        for index, source in enumerate(sources):
            messages.append({"role": "user", "content": source.strip()})
            if index < len(targets):
                messages.append({"role": "assistant", "content": targets[index].strip()})
        chosen, rejected = (responses[0], responses[1]) if ranks[0] > ranks[1] else (responses[1], responses[0])
        return PreferenceRecord(_prompt_conversation(messages, where, "src"), chosen.strip(), rejected.strip(), where)
    if record_format == "pairwise":
        if "messages" in record:
            prompt = _prompt_conversation(record["messages"], where, "messages")
        elif "prompt" not in record:
            raise DataError(f"{where}: missing field 'prompt' (fields present: {', '.join(sorted(record)) or 'none'})")
        elif isinstance(record["prompt"], list):
            prompt = _prompt_conversation(record["prompt"], where, "prompt")
        elif isinstance(record["prompt"], str) and record["prompt"].strip():
            prompt = ({"role": "user", "content": record["prompt"]},)
        else:
            raise _field_error(where, "prompt", "must be a non-empty string or a list of messages")
        chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
        return PreferenceRecord(prompt, chosen, rejected, where)
    raise ValueError(f"unknown preference format {record_format!r}; use one of {', '.join(PREFERENCE_FORMATS)}")


@dataclass
class PreferenceRead:
    path: str
    record_format: str
    records: list[PreferenceRecord]  # empty when read lazily (``read_preferences``' ``keep``)
    skipped: list[str] = field(default_factory=list)
    questionable: str | None = None  # one line about pairs that teach nothing (``questionable_records``)
    count: int = 0  # good records read


PREFERENCE_FIELDS_HINT = "src/tgt/response/sort (PaddleNLP) or prompt (or messages)/chosen/rejected"


def read_preferences(path: str, skip_bad_lines: bool = False, strict_data: bool = False,
                     keep: Callable[[PreferenceRecord, int, int], None] | None = None) -> PreferenceRead:
    """Read a jsonl file of preference records (the format is detected from its first record), one line at a time.

    Args:
        strict_data: fail on pairs whose chosen and rejected replies are the same instead of counting them in
            ``questionable``.
        keep: called with ``(record, line_number, byte_offset)`` for each good record, which is then not kept in
            ``records`` (``--lazy``).

    Raises:
        DataError: a missing or empty file, a bad record (without ``skip_bad_lines``), no good record at all, or
            (with ``strict_data``) a pair whose replies are the same.
    """
    skipped, records, same, count, record_format = [], [], [], 0, None
    for record, record_format, line_number, offset in iter_jsonl_records(
        path, detect_preference_format, parse_preference, skip_bad_lines, PREFERENCE_FIELDS_HINT, skipped
    ):
        count += 1
        if record.chosen.strip() == record.rejected.strip():
            same.append(record.where)
        if keep is None:
            records.append(record)
        else:
            keep(record, line_number, offset)
    notice = questionable_records(path, same, "pairs whose chosen and rejected replies are the same, which teach no preference", strict_data)
    return PreferenceRead(path, record_format, records, skipped, notice, count)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass(frozen=True)
class PreferenceLimits:
    """``--max_seq_len`` (prompt and both replies together, as PaddleNLP counts it) and ``--max_prompt_len``."""

    max_seq_len: int
    max_prompt_len: int


class PreferenceTruncation(Counter):
    REASONS = {
        "prompt_truncated": "prompts cut to their last --max_prompt_len tokens",
        "replies_truncated": "reply pairs cut in proportion to fit --max_seq_len",
        "dropped_prompt_too_long": "pairs dropped: the prompt leaves no room for two replies within --max_seq_len",
    }

    def describe(self) -> str:
        parts = [f"{self[key]} {text}" for key, text in self.REASONS.items() if self[key]]
        return "; ".join(parts) if parts else "nothing truncated"


@dataclass(frozen=True)
class PreferencePair:
    """Two training samples with the same prompt tokens: prompt + chosen, prompt + rejected."""

    chosen: SftSample
    rejected: SftSample

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _prompt_and_reply(record: PreferenceRecord, reply: str, layout: FamilyLayout, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prefix, prompt tokens, reply tokens) of the conversation ending with ``reply``, framed by the template.

    Earlier rounds (their replies too) are part of the prompt: DPO trains on the last reply only.
    """
    conversation = Record(record.prompt + ({"role": "assistant", "content": reply},), True, record.where)
    prefix, rounds = _rounds(conversation, layout, tokenizer)
    prompt = [token for item in rounds[:-1] for token in item.prompt + item.reply] + rounds[-1].prompt
    if not prefix and layout.prefix_ids and tuple(prompt[: len(layout.prefix_ids)]) == layout.prefix_ids:
        # Llama's template writes the BOS as text; kept apart, a prompt cut from the left still starts with it.
        prefix, prompt = list(layout.prefix_ids), prompt[len(layout.prefix_ids) :]
    return prefix, prompt, rounds[-1].reply


def tokenize_preference(record: PreferenceRecord, layout: FamilyLayout, tokenizer, limits: PreferenceLimits, report: Counter) -> PreferencePair | None:
    """Frame, truncate and shift one preference into two samples (None when two replies cannot fit)."""
    prefix, prompt, chosen = _prompt_and_reply(record, record.chosen, layout, tokenizer)
    _, _, rejected = _prompt_and_reply(record, record.rejected, layout, tokenizer)
    fixed = len(prefix) + len(layout.reply_start_ids)
    if fixed + len(prompt) + len(chosen) + len(rejected) > limits.max_seq_len:
        if len(prompt) > limits.max_prompt_len:
            prompt = prompt[-limits.max_prompt_len :]
            report["prompt_truncated"] += 1
        room = limits.max_seq_len - fixed - len(prompt)
        if room < 2:
            report["dropped_prompt_too_long"] += 1
            return None
        if len(chosen) + len(rejected) > room:
            chosen_room = min(room - 1, max(1, int(len(chosen) / (len(chosen) + len(rejected)) * room)))
            chosen, rejected = chosen[:chosen_room], rejected[: room - chosen_room]
            report["replies_truncated"] += 1
    return PreferencePair(_sample(prefix, prompt, chosen, layout), _sample(prefix, prompt, rejected, layout))


def _sample(prefix: list[int], prompt: list[int], reply: list[int], layout: FamilyLayout) -> SftSample:
    tokens, targets, context_length = _assemble(prefix, [Round(prompt, reply)], layout, include_last_reply=True)
    ids = np.asarray(tokens, dtype="int64")
    labels = np.where(np.asarray(targets[1:], dtype=bool), ids[1:], IGNORE_INDEX).astype("int64")
    return SftSample(ids[:-1], labels, context_length)


class PreferenceCollator:
    """A batch of pairs as one batch of ``2 x pairs`` rows: every chosen sample, then every rejected one, in the
    same order, so the policy and the reference each need one forward pass per batch. Padding, masks and GLM
    positions are ``SftCollator``'s."""

    def __init__(self, layout: FamilyLayout):
        self.rows = SftCollator(layout)

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        return self.rows([[pair.chosen] for pair in pairs] + [[pair.rejected] for pair in pairs])


def shared_prefix_length(pair: PreferencePair) -> int:
    """How many leading positions the two samples share exactly (same token, same label): the prompt up to its last
    token, whose label is already the reply's first token."""
    chosen, rejected = pair.chosen, pair.rejected
    length = min(len(chosen), len(rejected))
    same = (chosen.input_ids[:length] == rejected.input_ids[:length]) & (chosen.labels[:length] == rejected.labels[:length])
    return int(np.argmin(same)) if not same.all() else length


class PackedPairCollator:
    """A batch of pairs as one row per pair (PaddleNLP's DPO layout, ``--flash_mask``): the shared prompt once, then
    the chosen reply, then the rejected reply, whose positions restart where the prompt ends.

    The causal 4-D bool mask ``[pairs, 1, seq, seq]`` is cut so the rejected tokens never see the chosen ones, which
    makes every logit the one its own unpacked row (``PreferenceCollator``) computes, with the prompt run once.
    ``chosen_labels`` and ``rejected_labels`` each label only their reply. Padding tokens attend only to
    themselves. Causal families only: a GLM context is bidirectional, so its last prompt token cannot be shared.

    Args:
        pad_to: pad every batch to this width (pipeline parallel needs one shape for every micro-batch, see
            ``SftCollator``).
    """

    def __init__(self, layout: FamilyLayout, pad_to: int | None = None):
        if layout.glm_context:
            raise ValueError(f"packed pairs (--flash_mask) need a causal model; {layout.family.name}'s context is bidirectional")
        self.layout = layout
        self.pad_to = pad_to

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        shared = [shared_prefix_length(pair) for pair in pairs]
        width = max(max(len(pair.chosen) + len(pair.rejected) - k for pair, k in zip(pairs, shared)), self.pad_to or 0)
        rows = len(pairs)
        input_ids = np.full((rows, width), self.layout.pad_id, dtype="int64")
        chosen_labels = np.full((rows, width), IGNORE_INDEX, dtype="int64")
        rejected_labels = np.full((rows, width), IGNORE_INDEX, dtype="int64")
        positions = np.zeros((rows, width), dtype="int64")
        mask = np.zeros((rows, 1, width, width), dtype=bool)
        for row, (pair, k) in enumerate(zip(pairs, shared)):
            chosen_end = len(pair.chosen)
            end = chosen_end + len(pair.rejected) - k
            input_ids[row, :chosen_end] = pair.chosen.input_ids
            input_ids[row, chosen_end:end] = pair.rejected.input_ids[k:]
            chosen_labels[row, :chosen_end] = pair.chosen.labels
            rejected_labels[row, chosen_end:end] = pair.rejected.labels[k:]
            positions[row, :chosen_end] = np.arange(chosen_end)
            positions[row, chosen_end:end] = np.arange(k, len(pair.rejected))
            mask[row, 0, :end, :end] = np.tril(np.ones((end, end), dtype=bool))
            mask[row, 0, chosen_end:end, k:chosen_end] = False  # the rejected reply does not see the chosen one
            padding = np.arange(end, width)
            mask[row, 0, padding, padding] = True
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                "chosen_labels": chosen_labels, "rejected_labels": rejected_labels}


class PairDataset:
    """A map-style dataset of ``PreferencePair``s, in the order the trainer should read them."""

    def __init__(self, pairs: list[PreferencePair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]


@dataclass
class PreferenceSplit:
    read: PreferenceRead
    dataset: PairDataset | LazyJsonlDataset
    report: PreferenceTruncation
    tokens: int  # in every pair kept, both samples

    @property
    def tokens_per_row(self) -> float:
        """Tokens per pair (both samples)."""
        return self.tokens / max(1, len(self.dataset))

    def summary(self) -> str:
        text = f"{self.read.path}: {self.read.count} records ({self.read.record_format}), {len(self.dataset)} pairs; {self.report.describe()}"
        if self.read.skipped:
            text += f"; {len(self.read.skipped)} bad lines skipped"
        if isinstance(self.dataset, LazyJsonlDataset):
            text += "; read lazily (--lazy: each pair is read from the file when the trainer asks for it)"
        return text


def build_preference_split(path: str, layout: FamilyLayout, tokenizer, limits: PreferenceLimits, skip_bad_lines: bool = False,
                           strict_data: bool = False, shuffle_seed: int | None = None, lazy: bool = False) -> PreferenceSplit:
    """Read, frame, tokenize and truncate one preference file.

    Args:
        lazy: keep only where each kept pair's line is, and read it again when the trainer asks for it
            (``LazyJsonlDataset``); the pairs, their order and so every batch are the ones read whole.

    Raises:
        DataError: bad records (see ``read_preferences``), or no pair fits the length limits.
    """
    report = PreferenceTruncation()
    kept, tokens = [], 0

    def keep(record: PreferenceRecord, line_number: int, offset: int) -> None:
        nonlocal tokens
        pair = tokenize_preference(record, layout, tokenizer, limits, report)
        if pair is not None:
            kept.append([(line_number, offset)] if lazy else pair)
            tokens += len(pair)

    read = read_preferences(path, skip_bad_lines, strict_data, keep)
    if not kept:
        raise DataError(f"{path}: no pair fits --max_seq_len {limits.max_seq_len} ({report.describe()})")
    if shuffle_seed is not None:
        kept = [kept[i] for i in np.random.default_rng(shuffle_seed).permutation(len(kept))]
    if not lazy:
        return PreferenceSplit(read, PairDataset(kept), report, tokens)

    def make_pair(lines: list[tuple[object, str]]) -> PreferencePair:
        [(decoded, where)] = lines
        return tokenize_preference(parse_preference(decoded, read.record_format, where), layout, tokenizer, limits, PreferenceTruncation())

    return PreferenceSplit(read, LazyJsonlDataset(path, kept, make_pair), report, tokens)
