"""Constrained decoding: a grammar (a JSON schema, or any JSON object) masks each step's logits so the output
matches it, with llguidance (``docs/serve.md`` says why that library).

``GrammarVocabulary`` is built once per served tokenizer: the bytes each token id spells, which is what llguidance's
token masks are computed from. SentencePiece pieces spell ``▁`` as a space and ``<0xNN>`` byte-fallback pieces as
that byte; byte-level BPE pieces (Llama 3, Qwen2) spell each byte as one character of GPT-2's byte alphabet.
``GrammarConstraint`` is one request's matcher: the engine calls ``process`` before sampling and ``accept_token``
after, and an EOS id is allowed only where the grammar may end.
"""

from __future__ import annotations

import functools

import llguidance
import numpy as np

SENTENCEPIECE_SPACE = "\u2581"
# A schema llguidance compiles for ``response_format: {"type": "json_object"}``: any JSON object.
ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A grammar (schema) llguidance refuses, or a tokenizer whose tokens cannot be spelled as bytes."""


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: the character a byte-level BPE writes for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def _sentencepiece_piece(model, token_id: int) -> bytes:
    piece = model.id_to_piece(token_id)
    if model.is_byte(token_id):
        return bytes([int(piece[3:-1], 16)])
    if model.is_control(token_id) or model.is_unknown(token_id):
        return b""
    return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")


def _byte_level_piece(token: str) -> bytes | None:
    alphabet = _byte_level_alphabet()
    if not all(character in alphabet for character in token):
        return None  # not a byte-level vocabulary
    return bytes(alphabet[character] for character in token)


def _spelled_vocabulary(tokenizer, special: frozenset[int]) -> list[bytes] | None:
    """Each id's bytes: none for special tokens (llguidance allows them only as EOS); an added token that is not
    special (Qwen2.5's ``<tool_call>``) spells its text, so a grammar writing that text can pick the one token the
    model was trained to write."""
    added = {token_id: text for text, token_id in getattr(tokenizer, "added_tokens_encoder", {}).items()}
    model = getattr(tokenizer, "sp_model", None)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if model is None else None
    spelled = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            piece = b""
        elif token_id in added:
            piece = added[token_id].encode("utf-8")
        elif model is not None:
            piece = _sentencepiece_piece(model, token_id) if token_id < model.get_piece_size() else b""
        else:
            piece = _byte_level_piece(tokens[token_id] or "")
            if piece is None:
                return None
        spelled.append(piece)
    return spelled


class GrammarVocabulary:
    """A served tokenizer's vocabulary as llguidance reads it; built once per server (a few ms per 1,000 tokens).

    Raises:
        GrammarError: a tokenizer that is neither SentencePiece nor byte-level BPE.
    """

    def __init__(self, tokenizer, eos_token_ids: list[int]):
        special = frozenset(tokenizer.all_special_ids)
        spelled = _spelled_vocabulary(tokenizer, special)
        if spelled is None:
            raise GrammarError(f"the tokenizer ({type(tokenizer).__name__}) is neither SentencePiece nor byte-level "
                               "BPE, so its tokens cannot be spelled as bytes for constrained decoding")
        self.size = len(spelled)
        self.eos_token_ids = sorted(set(eos_token_ids))

        sentencepiece = getattr(tokenizer, "sp_model", None) is not None

        class _Spelling:  # the shape llguidance.TokenizerWrapper reads
            eos_token_id = self.eos_token_ids[0]
            bos_token_id = tokenizer.bos_token_id
            tokens = spelled
            special_token_ids = sorted(i for i in special if i < len(spelled))
            greedy = None

            def __call__(self, text):
                text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                if sentencepiece:
                    # SentencePiece would put its dummy-prefix space in front of text the grammar forces mid-output.
                    return self.greedy.greedy_tokenize(text)
                return tokenizer(text, add_special_tokens=False)["input_ids"]

        spelling = _Spelling()
        spelling.greedy = llguidance.LLTokenizer(llguidance.TokenizerWrapper(spelling), n_vocab=self.size,
                                                 eos_token=self.eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(spelling), n_vocab=self.size,
                                                eos_token=self.eos_token_ids)

    def constraint(self, grammar: str) -> "GrammarConstraint":
        """A fresh matcher for one request (``grammar`` from ``json_schema_grammar``).

        Raises:
            GrammarError: llguidance cannot build the grammar over this vocabulary.
        """
        return GrammarConstraint(self, grammar)


def json_schema_grammar(schema: dict) -> str:
    """llguidance's grammar for a JSON schema (``{"type": "object"}`` for any JSON object), written compactly: no
    whitespace between tokens, so a small model cannot spend its tokens on blank space.

    Raises:
        GrammarError: the schema is not an object or llguidance cannot compile it; the message says why.
    """
    if not isinstance(schema, dict):
        raise GrammarError(f"the schema must be a JSON object, got {type(schema).__name__}")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(f"the schema cannot be compiled: {messages[0]}")
    return grammar


def lark_grammar(lark: str) -> str:
    """llguidance's grammar for a Lark grammar (which may embed JSON schemas as ``%json {...}``).

    Raises:
        GrammarError: llguidance cannot compile it; the message says why.
    """
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError(f"the grammar cannot be compiled: {messages[0]}")
    return grammar


class GrammarConstraint:
    """One request's grammar state: masks logits before each sample, advances on each sampled token."""

    def __init__(self, vocabulary: GrammarVocabulary, grammar: str):
        self.vocabulary = vocabulary
        self.matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def process(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf; EOS ids only where the grammar may end (or
        where nothing else is left, so a request the grammar cannot continue ends instead of sampling nothing)."""
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)[: logits.shape[-1]] > 0
        if allowed.shape[-1] < logits.shape[-1]:
            allowed = np.concatenate([allowed, np.zeros(logits.shape[-1] - allowed.shape[-1], dtype=bool)])
        eos = [i for i in self.vocabulary.eos_token_ids if i < logits.shape[-1]]
        allowed[eos] = self.matcher.is_accepting() or not allowed.any()
        return np.where(allowed, logits, -np.inf)

    def accept_token(self, token_id: int) -> None:
        """Advance past a sampled token (EOS included; nothing follows it)."""
        if token_id not in self.vocabulary.eos_token_ids:
            self.matcher.consume_token(token_id)
