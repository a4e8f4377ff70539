"""A model directory's Jinja chat_template frames fine-tuning and serving exactly as transformers'
``apply_chat_template`` does (ids stored by scripts/make_hf_fixtures.py), replies alone are trained on, and a
directory without one keeps the family's built-in template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from paddle_llm.data.sft import IGNORE_INDEX, Limits, Record, TruncationReport, family_layout, prompt_ids_as_trained, tokenize_record
from paddle_llm.models.chat_template import jinja_chat_segments
from paddle_llm.models.registry import FAMILIES, load_tokenizer, resolve_model
from tests.conftest import ROOT

LLAMA3 = os.path.join(ROOT, "tests", "assets", "hf", "llama3")


@pytest.fixture(scope="module")
def llama3():
    with open(os.path.join(LLAMA3, "reference.json"), encoding="utf-8") as f:
        chat = json.load(f)["chat"]
    return load_tokenizer(LLAMA3, resolve_model(LLAMA3).family), chat


def test_serving_prompt_ids_equal_apply_chat_template(llama3):
    tokenizer, chat = llama3
    assert prompt_ids_as_trained(FAMILIES["llama"], tokenizer, chat["messages"][:-1], templated=True) == chat["prompt_ids"]


def test_fine_tuning_sample_is_the_templated_conversation_and_trains_only_replies(llama3):
    tokenizer, chat = llama3
    record = Record(tuple(chat["messages"]), True, "test:1")
    sample = tokenize_record(record, family_layout(FAMILIES["llama"], tokenizer), tokenizer, Limits(512, 512), TruncationReport())
    assert list(sample.input_ids) + [int(sample.labels[-1])] == chat["conversation_ids"]
    trained = [int(t) for t in sample.labels if t != IGNORE_INDEX]
    replies = [tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for m in chat["messages"] if m["role"] == "assistant"]
    assert trained == replies[0] + replies[1]


def test_template_is_kept_when_the_tokenizer_is_saved(llama3, tmp_path):
    tokenizer, _ = llama3
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path), resolve_model(LLAMA3).family)
    assert reloaded.jinja_chat_template == tokenizer.jinja_chat_template
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers' name, so it loads there


def test_directory_without_template_keeps_the_built_in_one():
    tokenizer = load_tokenizer(os.path.join(ROOT, "tests", "assets", "hf", "llama2"), resolve_model("tiny-llama").family)
    assert tokenizer.jinja_chat_template is None
    messages = [{"role": "user", "content": "Hi"}]
    ids = prompt_ids_as_trained(FAMILIES["llama"], tokenizer, messages, templated=True)
    assert tokenizer.decode(ids).strip().endswith("[INST] Hi [/INST]")  # Llama-2's format, from render_chat


def test_template_that_rewrites_earlier_turns_is_refused():
    rewriting = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match=r"renders messages\[:\d\] differently"):
        jinja_chat_segments(rewriting, messages, {})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_jinja_template_written_on_export_renders_the_built_in_format(family, messages):
    from paddle_llm.models.chat_template import render_chat, render_jinja_chat

    asks = messages[-1]["role"] == "user"
    assert render_jinja_chat(FAMILIES[family].hf.CHAT_TEMPLATE, messages, asks, {}) == render_chat(FAMILIES[family].chat_template, messages, add_generation_prompt=asks)


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
])
def test_built_in_mistral_format_writes_bos_once_as_mistrals_own_template(messages):
    """The mistral fixture's tokenizer_config template is Mistral-Instruct's (``{{ bos_token }}`` once, then
    ``[INST] ... [/INST]{reply}</s>`` per round): a directory without a template gets the same text and pieces."""
    from paddle_llm.models.chat_template import chat_segments, jinja_chat_segments, render_chat, render_jinja_chat

    with open(os.path.join(ROOT, "tests", "assets", "hf", "mistral", "tokenizer_config.json"), encoding="utf-8") as f:
        mistral_own = json.load(f)["chat_template"]
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    built_in = FAMILIES["mistral"].chat_template
    asks = messages[-1]["role"] == "user"
    rendered = render_chat(built_in, messages, add_generation_prompt=asks)
    assert rendered.count("<s>") == 1
    assert rendered == render_jinja_chat(mistral_own, messages, asks, special_tokens)
    if not asks:
        assert chat_segments(built_in, messages) == jinja_chat_segments(mistral_own, messages, special_tokens)


def test_special_tokens_written_as_text_get_their_ids_from_a_directory_with_only_tokenizer_model(tmp_path):
    """With no tokenizer_config.json nor tokenizer.json, ``<s>`` in a chat template's text used to become the pieces
    ``<``, ``s``, ``>``. transformers' LlamaTokenizer and LlamaTokenizerFast give the BOS id (checked against
    /work/torchvenv's transformers when it is there)."""
    source = os.path.join(ROOT, "tests", "assets", "hf", "mistral")
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(source, name), tmp_path / name)
    text = "<s>[INST] Hi [/INST]ok</s>"
    tokenizer = load_tokenizer(str(tmp_path), resolve_model(str(tmp_path)).family)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer(text.replace("<s>", "").replace("</s>", ""), add_special_tokens=False)["input_ids"] == ids[1:-1]
    torch_python = "/work/torchvenv/bin/python"
    if os.path.isfile(torch_python):
        script = ("import json, sys; from transformers import LlamaTokenizer, LlamaTokenizerFast; "
                  "print(json.dumps([c.from_pretrained(sys.argv[1])(sys.argv[2], add_special_tokens=False)['input_ids'] "
                  "for c in (LlamaTokenizer, LlamaTokenizerFast)]))")
        result = subprocess.run([torch_python, "-c", script, str(tmp_path), text], capture_output=True, text=True, check=True)
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [ids, ids]


def test_mistral_inst_template_from_tokenizer_config_gives_apply_chat_template_ids():
    """The mistral fixture's [INST] template (SentencePiece tokenizer, BOS once from the template): serving's prompt
    and fine-tuning's sample are transformers' ids."""
    directory = os.path.join(ROOT, "tests", "assets", "hf", "mistral")
    with open(os.path.join(directory, "reference.json"), encoding="utf-8") as f:
        chat = json.load(f)["chat"]
    family = resolve_model(directory).family
    tokenizer = load_tokenizer(directory, family)
    assert prompt_ids_as_trained(family, tokenizer, chat["messages"][:-1], templated=True) == chat["prompt_ids"]
    record = Record(tuple(chat["messages"]), True, "test:1")
    sample = tokenize_record(record, family_layout(family, tokenizer), tokenizer, Limits(512, 512), TruncationReport())
    assert list(sample.input_ids) + [int(sample.labels[-1])] == chat["conversation_ids"]
