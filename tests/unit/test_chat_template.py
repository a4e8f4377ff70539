"""Chat templates: exact renderings per family, segments that join to the rendering, and precise validation errors."""

import pytest

from paddle_llm.models.chat_template import chat_segments, render_chat
from paddle_llm.models.registry import FAMILIES, family_named

CHAT_FAMILIES = sorted(name for name, family in FAMILIES.items() if family.chat_template)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a fox."},
]


def test_llama_two_rounds_with_system():
    assert render_chat(FAMILIES["llama"].chat_template, CONVERSATION) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Name a fox. [/INST]"
    )


def test_llama_without_system():
    assert render_chat(FAMILIES["llama"].chat_template, [{"role": "user", "content": "Hi"}]) == "<s>[INST] Hi [/INST]"


def test_chatglm_v1_rounds_count_from_zero():
    assert render_chat(FAMILIES["chatglm"].chat_template, CONVERSATION[1:]) == "[Round 0]\n问：Hi\n答：Hello!\n[Round 1]\n问：Name a fox.\n答："


def test_chatglm2_rounds_count_from_one_with_blank_lines():
    assert render_chat(FAMILIES["chatglm2"].chat_template, CONVERSATION[1:]) == (
        "[Round 1]\n\n问：Hi\n\n答：Hello!\n\n[Round 2]\n\n问：Name a fox.\n\n答："
    )


def test_chatglm_system_becomes_leading_paragraph():
    assert render_chat(FAMILIES["chatglm2"].chat_template, CONVERSATION[:2]) == "Be brief.\n\n[Round 1]\n\n问：Hi\n\n答："


def test_qwen2_chatml_every_message_framed_and_the_reply_trained_through_im_end():
    assert render_chat(FAMILIES["qwen2"].chat_template, CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName a fox.<|im_end|>\n<|im_start|>assistant\n"
    )
    replies = [text for text, train_on in chat_segments(FAMILIES["qwen2"].chat_template, CONVERSATION[:3]) if train_on]
    assert replies == ["Hello!<|im_end|>"]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_segments_join_to_rendering_and_flag_only_replies(family):
    conversation = CONVERSATION + [{"role": "assistant", "content": "Reynard."}]
    template = FAMILIES[family].chat_template
    segments = chat_segments(template, conversation)
    assert "".join(text for text, _ in segments) == render_chat(template, conversation, add_generation_prompt=False)
    trained = [text for text, train_on in segments if train_on]
    assert len(trained) == 2
    assert "Hello!" in trained[0] and "Reynard." in trained[1]
    assert all("Hi" not in text and "Be brief." not in text for text in trained)


def test_generation_prompt_is_prefix_of_full_conversation():
    for family in CHAT_FAMILIES:
        template = FAMILIES[family].chat_template
        full = render_chat(template, CONVERSATION + [{"role": "assistant", "content": "Reynard."}], add_generation_prompt=False)
        assert full.startswith(render_chat(template, CONVERSATION))


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role 'robot'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\]\.role is 'user' but 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"messages\[1\].*only messages\[0\] may be 'system'"),
        ([{"role": "system", "content": "a"}], "only a system message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], r"messages\[1\]\.role must be 'user'"),
        (["hi"], r"messages\[0\] must be an object"),
    ],
)
def test_bad_conversations_name_index_and_field(messages, expected):
    with pytest.raises(ValueError, match=expected):
        render_chat(FAMILIES["llama"].chat_template, messages)


def test_unknown_family():
    with pytest.raises(ValueError, match="no chat template for model family 'gpt'"):
        family_named("gpt", "chat_template")
