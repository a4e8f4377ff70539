"""Fine-tuning data: formats, chat templates and prompt masking token by token, truncation, packing, bad input."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddle_llm.data.jsonl import DataError
from paddle_llm.data.packing import pack_best_fit_decreasing
from paddle_llm.data.sft import (
    IGNORE_INDEX,
    Limits,
    Record,
    SftCollator,
    TruncationReport,
    build_split,
    family_layout,
    generation_prompt,
    read_records,
    tokenize_record,
)
from paddle_llm.models.registry import FAMILIES as REGISTERED_FAMILIES
from paddle_llm.models.registry import load_tokenizer

WIDE = Limits(src_length=512, max_length=1024)
FAMILIES = ("llama", "chatglm", "chatglm2")


@pytest.fixture(scope="module")
def tokenizers():
    return {family: load_tokenizer(f"tiny-{family}") for family in FAMILIES}


def layout_of(tokenizers, family):
    return family_layout(REGISTERED_FAMILIES[family], tokenizers[family])


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sample_of(tokenizers, family, record, limits=WIDE):
    report = TruncationReport()
    return tokenize_record(record, layout_of(tokenizers, family), tokenizers[family], limits, report), report


def chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return Record(tuple(messages), templated=True, where="test:1")


def expected(pieces):
    """Shifted (input_ids, labels) from (token ids, trained) pieces: the reference the code must match exactly."""
    tokens = [t for piece, _ in pieces for t in piece]
    targets = [trained for piece, trained in pieces for _ in piece]
    labels = [t if trained else IGNORE_INDEX for t, trained in zip(tokens[1:], targets[1:])]
    return tokens[:-1], labels


# ---------------------------------------------------------------------------------------------------- formats


def test_each_format_reads_into_the_same_conversation(tmp_path):
    rows = {
        "src_tgt": {"src": "hi", "tgt": "hello"},
        "alpaca": {"instruction": "hi", "input": "", "output": "hello"},
        "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    }
    for name, row in rows.items():
        result = read_records(write_jsonl(tmp_path / f"{name}.json", [row]))
        assert result.record_format == name
        (record,) = result.records
        assert [m["content"] for m in record.messages] == ["hi", "hello"]
        # a single plain src/tgt round is PaddleNLP's untemplated generation fine-tuning; the rest are chats
        assert record.templated is (name != "src_tgt")


def test_alpaca_input_joins_the_instruction_and_instruction_generation_templates_src_tgt(tmp_path):
    (record,) = read_records(write_jsonl(tmp_path / "a.json", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])).records
    assert record.messages[0]["content"] == "Add\n\n2 and 3"
    (record,) = read_records(write_jsonl(tmp_path / "s.json", [{"src": "q", "tgt": "a"}]), instruction_generation=True).records
    assert record.templated


def test_multi_turn_src_tgt_lists_and_sharegpt_system(tmp_path):
    (record,) = read_records(write_jsonl(tmp_path / "m.json", [{"src": ["a", "b"], "tgt": ["1", "2"]}])).records
    assert [m["role"] for m in record.messages] == ["user", "assistant", "user", "assistant"] and record.templated
    row = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (record,) = read_records(write_jsonl(tmp_path / "g.json", [row])).records
    assert record.messages[0] == {"role": "system", "content": "be brief"}


# --------------------------------------------------------------------------- templates and masking, token by token


def test_llama_plain_src_tgt_bos_prompt_masked_reply_and_eos_trained(tokenizers):
    tok = tokenizers["llama"]
    sample, _ = sample_of(tokenizers, "llama", Record(({"role": "user", "content": "what is 2+3?"}, {"role": "assistant", "content": "five"}), False, "t"))
    inputs, labels = expected([([tok.bos_token_id] + ids(tok, "what is 2+3?"), False), (ids(tok, "five") + [tok.eos_token_id], True)])
    assert sample.input_ids.tolist() == inputs and sample.labels.tolist() == labels


def test_llama_multi_turn_masks_every_user_turn_and_trains_every_reply(tokenizers):
    tok = tokenizers["llama"]
    sample, _ = sample_of(tokenizers, "llama", chat("hi", "hello", "and you?", "fine", system="be kind"))
    inputs, labels = expected(
        [
            (ids(tok, "<s>[INST] <<SYS>>\nbe kind\n<</SYS>>\n\nhi [/INST]"), False),
            (ids(tok, " hello </s>"), True),
            (ids(tok, "<s>[INST] and you? [/INST]"), False),
            (ids(tok, " fine </s>"), True),
        ]
    )
    assert sample.input_ids.tolist() == inputs and sample.labels.tolist() == labels
    assert inputs[0] == tok.bos_token_id and inputs.count(tok.bos_token_id) == 2  # no doubled BOS
    assert sample.context_length == 0


def test_chatglm2_template_prefix_tokens_and_eos_after_each_reply(tokenizers):
    tok = tokenizers["chatglm2"]
    prefix = tok.build_inputs_with_special_tokens([])
    sample, _ = sample_of(tokenizers, "chatglm2", chat("hi", "hello", "more", "sure"))
    inputs, labels = expected(
        [
            (list(prefix) + ids(tok, "[Round 1]\n\n问：hi\n\n答："), False),
            (ids(tok, "hello") + [tok.eos_token_id], True),
            (ids(tok, "\n\n[Round 2]\n\n问：more\n\n答："), False),
            (ids(tok, "sure") + [tok.eos_token_id], True),
        ]
    )
    assert sample.input_ids.tolist() == inputs and sample.labels.tolist() == labels


def test_chatglm_v1_glm_layout_context_then_gmask_sop_and_only_the_last_reply_trained(tokenizers):
    tok = tokenizers["chatglm"]
    gmask, sop = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    sample, _ = sample_of(tokenizers, "chatglm", chat("hi", "hello", "more", "sure"))
    context = ids(tok, "[Round 0]\n问：hi\n答：") + ids(tok, "hello") + [tok.eos_token_id] + ids(tok, "\n[Round 1]\n问：more\n答：")
    inputs, labels = expected([(context + [gmask, sop], False), (ids(tok, "sure") + [tok.eos_token_id], True)])
    assert sample.input_ids.tolist() == inputs and sample.labels.tolist() == labels
    assert sample.input_ids[sample.context_length] == sop and sample.input_ids[sample.context_length - 1] == gmask


def test_glm_mask_and_positions_follow_chatglm_rules(tokenizers):
    layout = layout_of(tokenizers, "chatglm")
    sample, _ = sample_of(tokenizers, "chatglm", chat("ab", "cd"))
    batch = SftCollator(layout)([[sample]])
    n, context = len(sample), sample.context_length
    mask, positions = batch["attention_mask"][0, 0], batch["position_ids"][0]
    assert mask[:, :context].all()  # the context is seen whole, from everywhere
    assert not mask[context, context + 1 :].any() and mask[context:, context:].sum() == (n - context) * (n - context + 1) // 2
    assert positions[0].tolist() == list(range(context)) + [context - 1] * (n - context)
    assert positions[1].tolist() == [0] * context + list(range(1, n - context + 1))


def test_generation_prompt_ends_where_the_reply_starts(tokenizers):
    for family in FAMILIES:
        tok, layout = tokenizers[family], layout_of(tokenizers, family)
        record = chat("hi", "hello")
        sample, _ = sample_of(tokenizers, family, record)
        prompt = generation_prompt(record, layout, tok, WIDE, max_new_tokens=8)
        first_trained = int(np.flatnonzero(sample.labels != IGNORE_INDEX)[0])
        assert prompt.input_ids == sample.input_ids[: first_trained + 1].tolist(), family
        assert prompt.reference == "hello" and prompt.context_length == sample.context_length


# ------------------------------------------------------------------------------------------------- truncation


def test_prompt_cut_from_the_start_to_src_length_and_reply_cut_to_max_length(tokenizers):
    tok = tokenizers["llama"]
    record = Record(({"role": "user", "content": "one two three four five six seven"}, {"role": "assistant", "content": "eight nine ten eleven"}), False, "t")
    prompt_ids, reply_ids = ids(tok, record.messages[0]["content"]), ids(tok, record.messages[1]["content"]) + [tok.eos_token_id]
    sample, report = sample_of(tokenizers, "llama", record, Limits(src_length=5, max_length=9))
    inputs, labels = expected([([tok.bos_token_id] + prompt_ids[-5:], False), (reply_ids[:3], True)])
    assert sample.input_ids.tolist() == inputs and sample.labels.tolist() == labels
    assert report["prompt_truncated"] == 1 and report["reply_truncated"] == 1
    assert "prompts cut to --src_length" in report.describe() and "replies cut" in report.describe()


def test_early_rounds_dropped_before_the_last_reply_is_cut(tokenizers):
    sample, report = sample_of(tokenizers, "llama", chat("a " * 20, "b " * 20, "hi", "ok"), Limits(src_length=64, max_length=40))
    assert report["rounds_dropped"] == 1 and report["reply_truncated"] == 0
    assert len(sample) < 40


def test_prompt_filling_max_length_drops_the_sample_with_a_reason(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "t.json", [{"src": "x " * 30, "tgt": "y"}, {"src": "short", "tgt": "ok"}])
    split = build_split(path, layout_of(tokenizers, "llama"), tokenizers["llama"], Limits(src_length=40, max_length=20))
    assert len(split.samples) == 1 and split.report["dropped_prompt_too_long"] == 1
    assert "1 samples dropped: the prompt leaves no room" in split.summary()
    with pytest.raises(DataError, match="no record fits --max_length 4"):
        build_split(path, layout_of(tokenizers, "llama"), tokenizers["llama"], Limits(src_length=3, max_length=4))


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.json:2: not valid JSON"),
        (json.dumps({"src": "q"}), r"bad\.json:2: missing field 'tgt' \(fields present: src\)"),
        (json.dumps({"src": "q", "tgt": 3}), r"bad\.json:2: field 'tgt': must be a string, got int"),
        (json.dumps({"src": ["a", "b"], "tgt": ["1"]}), r"bad\.json:2: field 'tgt': has 1 replies for 2 prompts"),
        (json.dumps([1, 2]), r"bad\.json:2: expected a JSON object, got list"),
    ],
)
def test_bad_src_tgt_record_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.json", [{"src": "fine", "tgt": "ok"}, line])
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_bad_chat_records_name_the_message_and_field(tmp_path):
    wrong_role = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    with pytest.raises(DataError, match=r"c\.json:1: field 'messages': messages\[1\]\.role 'bot' is not one of"):
        read_records(write_jsonl(tmp_path / "c.json", [wrong_role]))
    no_reply = {"messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(DataError, match=r"d\.json:1: field 'messages': the last message must be the assistant's reply"):
        read_records(write_jsonl(tmp_path / "d.json", [no_reply]))
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}
    with pytest.raises(DataError, match=r"e\.json:1: field 'conversations\[1\]\.from': 'robot' is not one of"):
        read_records(write_jsonl(tmp_path / "e.json", [sharegpt]))
    with pytest.raises(DataError, match=r"f\.json:1: cannot tell the record format from fields \(prompt, text\)"):
        read_records(write_jsonl(tmp_path / "f.json", [{"text": "x", "prompt": "y"}]))


def test_skip_bad_lines_is_off_by_default_skips_when_asked_and_an_all_bad_file_still_fails(tmp_path):
    path = write_jsonl(tmp_path / "some.json", [{"src": "a", "tgt": "b"}, "{broken", {"src": "c"}, {"src": "d", "tgt": "e"}])
    with pytest.raises(DataError, match="some.json:2"):
        read_records(path)
    result = read_records(path, skip_bad_lines=True)
    assert len(result.records) == 2 and len(result.skipped) == 2 and "some.json:3: missing field 'tgt'" in result.skipped[1]
    all_bad = write_jsonl(tmp_path / "all.json", ["{broken", json.dumps({"src": "only"})])
    with pytest.raises(DataError, match=r"all\.json: every one of its 2 records is bad"):
        read_records(all_bad, skip_bad_lines=True)
    empty = write_jsonl(tmp_path / "empty.json", [""])
    with pytest.raises(DataError, match="the file is empty"):
        read_records(empty)


# --------------------------------------------------------------------------------------- packing and the collator


def test_packed_rows_are_block_diagonal_with_restarting_positions(tokenizers):
    layout = layout_of(tokenizers, "llama")
    samples = [sample_of(tokenizers, "llama", chat(q, a))[0] for q, a in (("hi", "yo"), ("what now", "nothing much"))]
    batch = SftCollator(layout)([samples])
    first, second = len(samples[0]), len(samples[1])
    mask = batch["attention_mask"][0, 0]
    assert not mask[first:, :first].any() and not mask[:first, first:].any()  # no attention across samples
    assert batch["position_ids"][0].tolist() == list(range(first)) + list(range(second))
    # an unpacked causal batch needs no mask at all: padding sits to the right of every real token
    assert set(SftCollator(layout)([[s] for s in samples])) == {"input_ids", "labels"}


def test_pipeline_batches_are_padded_to_one_width(tokenizers):
    """Pipeline parallel sends activations without shape metadata: every micro-batch must have one width."""
    layout = layout_of(tokenizers, "llama")
    samples = [sample_of(tokenizers, "llama", chat(q, a))[0] for q, a in (("hi", "yo"), ("what now", "nothing much"))]
    batch = SftCollator(layout, pad_to=64)([[s] for s in samples])
    assert batch["input_ids"].shape == (2, 64) and batch["labels"].shape == (2, 64)
    assert (batch["labels"][:, max(map(len, samples)):] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------------- properties

TEXT = st.text(alphabet="abcdefghij 0123456789?.", min_size=1, max_size=24)
CONVERSATIONS = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3)
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY_SETTINGS
@given(family=st.sampled_from(FAMILIES), rounds=CONVERSATIONS, src_length=st.integers(1, 40), max_length=st.integers(2, 80))
def test_labels_align_with_inputs_and_only_replies_are_trained(tokenizers, family, rounds, src_length, max_length):
    tok = tokenizers[family]
    record = chat(*[text for pair in rounds for text in pair])
    sample, _ = sample_of(tokenizers, family, record, Limits(src_length, max_length))
    if sample is None:
        return
    assert len(sample.input_ids) == len(sample.labels) <= max_length - 1
    trained = np.flatnonzero(sample.labels != IGNORE_INDEX)
    assert len(trained) > 0
    # labels align: every trained label is the next input token (the last one is the sequence's final token)
    inner = trained[trained < len(sample) - 1]
    assert (sample.labels[inner] == sample.input_ids[inner + 1]).all()
    # prompts masked: the trained tokens, read in order, are the start of the replies (and their EOS), nothing else
    replies = [ids(tok, text) for _, text in rounds]
    layout = layout_of(tokenizers, family)
    if family == "llama":
        replies = [ids(tok, f" {text} </s>") for _, text in rounds]
    else:
        replies = [reply + [layout.eos_id] for reply in replies]
    if layout.glm_context:
        replies = replies[-1:]
    trained_ids = sample.labels[trained].tolist()
    assert any(trained_ids == [t for r in replies[start:] for t in r][: len(trained_ids)] for start in range(len(replies)))


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60), capacity=st.integers(64, 128))
def test_packs_never_exceed_capacity_and_hold_every_sample_once(lengths, capacity):
    packs = pack_best_fit_decreasing(lengths, capacity)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= capacity for pack in packs)
    # best fit never leaves two packs that could have been one
    fills = sorted(sum(lengths[i] for i in pack) for pack in packs)
    assert len(fills) < 2 or fills[0] + fills[1] > capacity


def test_a_sample_longer_than_the_pack_is_an_error():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than the pack capacity 8"):
        pack_best_fit_decreasing([3, 9], 8)


def test_paddle_cross_entropy_mean_still_counts_ignored_positions():
    """Why ChatGLM-6B gets our token-mean loss (finetune_trainer.TokenMeanCrossEntropy). If Paddle changes this,
    the override may become unnecessary: this test then fails and says so."""
    import paddle

    logits = paddle.to_tensor(np.zeros((1, 4, 5), dtype="float32"))
    labels = paddle.to_tensor(np.array([[1, IGNORE_INDEX, IGNORE_INDEX, 2]]))
    mean = float(paddle.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))
    assert mean == pytest.approx(np.log(5) * 2 / 4), "Paddle now averages over labelled tokens only"
