"""Constrained decoding over the two vocabularies served here: SentencePiece (the shipped tokenizer) and byte-level
BPE (the Qwen2 fixture). Random logits stand in for a model that knows nothing of JSON: whatever is sampled, the
decoded output is JSON that validates against the schema, and EOS comes only once it is complete."""

import json
import os

import jsonschema
import numpy as np
import pytest

from paddle_llm.serving.grammar import ANY_JSON_OBJECT, GrammarError, GrammarVocabulary, json_schema_grammar

HF_QWEN2 = os.path.join(os.path.dirname(__file__), "..", "assets", "hf", "qwen2")
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6}, "size": {"enum": ["small", "large"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
          "required": ["name", "size", "count", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module", params=["tiny-llama", HF_QWEN2], ids=["sentencepiece", "byte-level-bpe"])
def vocabulary(request):
    from paddle_llm.models.registry import load_tokenizer

    tokenizer = load_tokenizer(request.param)
    return tokenizer, GrammarVocabulary(tokenizer, [tokenizer.eos_token_id])


def constrained_sample(tokenizer, vocabulary, schema, seed, steps=200):
    """Sample from random logits through the grammar until EOS; return the decoded text."""
    rng = np.random.default_rng(seed)
    constraint = vocabulary.constraint(json_schema_grammar(schema))
    ids = []
    for _ in range(steps):
        logits = constraint.process(rng.normal(size=len(tokenizer)).astype(np.float32) * 3)
        probabilities = np.exp(logits - logits.max())
        token = int(rng.choice(len(logits), p=probabilities / probabilities.sum()))
        constraint.accept_token(token)
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(ids)
        ids.append(token)
    raise AssertionError(f"no EOS within {steps} tokens: {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("seed", range(3))
def test_random_logits_through_the_grammar_give_schema_valid_json(vocabulary, seed):
    tokenizer, grammar_vocabulary = vocabulary
    text = constrained_sample(tokenizer, grammar_vocabulary, SCHEMA, seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_any_json_object_is_an_object(vocabulary):
    tokenizer, grammar_vocabulary = vocabulary
    text = constrained_sample(tokenizer, grammar_vocabulary, ANY_JSON_OBJECT, seed=7, steps=400)
    assert isinstance(json.loads(text), dict), text


def test_eos_is_masked_until_the_json_is_complete(vocabulary):
    tokenizer, grammar_vocabulary = vocabulary
    constraint = grammar_vocabulary.constraint(json_schema_grammar({"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}))
    flat = np.zeros(len(tokenizer), dtype=np.float32)
    for piece in ['{"a":', "1"]:
        for token in grammar_vocabulary.tokenizer.tokenize_str(piece):
            assert not np.isfinite(constraint.process(flat)[tokenizer.eos_token_id])
            constraint.accept_token(token)
    assert not np.isfinite(constraint.process(flat)[tokenizer.eos_token_id])  # "1" could still grow to "12"
    constraint.accept_token(grammar_vocabulary.tokenizer.tokenize_str("}")[0])
    allowed = np.flatnonzero(np.isfinite(constraint.process(flat)))
    assert allowed.tolist() == [tokenizer.eos_token_id]


@pytest.mark.parametrize("schema", [{"type": "object", "properties": {"a": {"type": "no-such-type"}}},
                                    {"type": "object", "required": 3}, ["not", "an", "object"]])
def test_a_schema_llguidance_cannot_compile_is_a_grammar_error(schema):
    with pytest.raises(GrammarError, match="schema"):
        json_schema_grammar(schema)


def test_an_added_token_that_is_not_special_spells_its_text():
    """Qwen2.5 writes a call's ``<tool_call>`` as one added token: a grammar forcing that text must allow it."""
    from paddle_llm.models.registry import load_tokenizer

    tokenizer = load_tokenizer(HF_QWEN2)
    tokenizer.add_tokens(["<tool_call>"])
    added = tokenizer.convert_tokens_to_ids("<tool_call>")
    grammar_vocabulary = GrammarVocabulary(tokenizer, [tokenizer.eos_token_id])
    assert grammar_vocabulary.tokenizer.decode_bytes([added]) == b"<tool_call>"
    assert grammar_vocabulary.tokenizer.decode_bytes([tokenizer.eos_token_id]) == b""  # special: EOS only
