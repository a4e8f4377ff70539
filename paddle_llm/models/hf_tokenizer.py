"""Tokenizers and chat templates as Hugging Face model directories ship them.

- ``tokenizer.json`` (a byte-level BPE as Llama-3 and Qwen2 ship, or any other ``tokenizers`` model) loads into
  PaddleNLP's ``PretrainedTokenizerFast``, which wraps the same ``tokenizers`` library, so ids are transformers'.
- ``tokenizer.model`` (SentencePiece, as Llama-2 ships) loads into the family's PaddleNLP class. PaddleNLP's
  ``LlamaTokenizer`` looks for ``sentencepiece.bpe.model``, so the file is passed by path instead of renamed: the
  model directory is never written to.
- The special tokens and ``add_bos_token`` come from ``tokenizer_config.json`` (or ``special_tokens_map.json``).
- ``chat_template`` (a Jinja string in ``tokenizer_config.json``) is read by ``chat_template_of``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

from paddle_llm.models.sentencepiece_json import sentencepiece_tokenizer

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
PADDLE_SENTENCEPIECE_MODEL = "sentencepiece.bpe.model"  # PaddleNLP LlamaTokenizer's name for it
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_SENTENCEPIECE_OPTIONS = ("add_bos_token", "add_eos_token")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None


def _token_text(token) -> str | None:
    # transformers writes a special token as a string, or as a serialised AddedToken {"content": ...}.
    return token.get("content") if isinstance(token, dict) else token


def _special_tokens(directory: str) -> tuple[dict, dict]:
    config = {**_read_json(os.path.join(directory, SPECIAL_TOKENS_MAP)), **_read_json(os.path.join(directory, TOKENIZER_CONFIG))}
    tokens = {name: _token_text(config[name]) for name in _SPECIAL_TOKENS if config.get(name) is not None}
    return tokens, config


def needs_loading_here(directory: str, sentencepiece_file_name: str | None) -> bool:
    """True when PaddleNLP's ``from_pretrained`` would not load the directory as transformers does: a
    ``tokenizer.json``, a ``tokenizer.model`` under a name the class does not read, or a Jinja chat template
    (PaddleNLP would drop it when saving)."""
    if os.path.isfile(os.path.join(directory, TOKENIZER_JSON)) or chat_template_of(directory):
        return True
    return (sentencepiece_file_name is not None and os.path.isfile(os.path.join(directory, SENTENCEPIECE_MODEL))
            and not os.path.isfile(os.path.join(directory, sentencepiece_file_name)))


def configured_class(directory: str) -> str | None:
    """``tokenizer_class`` of the directory's ``tokenizer_config.json``."""
    return _read_json(os.path.join(directory, TOKENIZER_CONFIG)).get("tokenizer_class")


def _framing(tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer.json``'s post-processor puts before and after one text (e.g. Llama-3's
    ``<|begin_of_text|>``), found by encoding a probe with and without special tokens."""
    bare = tokenizer.encode("framing probe", add_special_tokens=False)["input_ids"]
    framed = tokenizer.encode("framing probe", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start:start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare):]
    raise ValueError("tokenizer.json's post-processor changes the text's own tokens; paddle_llm cannot frame with it")


class _SavesForTransformers:
    """``save_pretrained`` also writes what transformers needs to load the directory (``write_hf_tokenizer_files``),
    with the chat template this tokenizer was loaded with, so fine-tuned and exported models keep their format."""

    jinja_chat_template: str | None = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        write_hf_tokenizer_files(save_directory, self.jinja_chat_template)
        return saved


@functools.lru_cache(maxsize=None)
def _fast_tokenizer_class():
    # Built on first use: importing PaddleNLP takes seconds, and this module is imported by the light registry.
    from paddlenlp.transformers.tokenizer_utils_fast import PretrainedTokenizerFast

    class HFTokenizerFast(_SavesForTransformers, PretrainedTokenizerFast):
        """PaddleNLP's fast tokenizer, with ``build_inputs_with_special_tokens`` adding what ``tokenizer.json``'s
        post-processor adds: PaddleNLP's base class adds nothing, and fine-tuning and serving read a family's
        framing (BOS) from that method (``data.sft.family_layout``)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._paddle_llm_framing = _framing(self)

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            before, after = self._paddle_llm_framing
            ids = list(token_ids_0) if token_ids_1 is None else list(token_ids_0) + list(token_ids_1)
            return before + ids + after

    return HFTokenizerFast


@functools.lru_cache(maxsize=None)
def _saving_class(tokenizer_class):
    return type(tokenizer_class.__name__, (_SavesForTransformers, tokenizer_class), {})


def load_hf_tokenizer(directory: str, tokenizer_class, sentencepiece_file_name: str | None):
    """Load a transformers tokenizer directory into a PaddleNLP tokenizer that keeps its chat template.

    Args:
        directory: holds ``tokenizer.json`` or ``tokenizer.model`` (see ``needs_loading_here``).
        tokenizer_class: the family's PaddleNLP tokenizer class (a SentencePiece one, for ``tokenizer.model``).
        sentencepiece_file_name: the file name that class reads its SentencePiece model from.
    """
    tokens, config = _special_tokens(directory)
    if os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
        tokenizer = _fast_tokenizer_class()(tokenizer_file=os.path.join(directory, TOKENIZER_JSON), **tokens)
    elif sentencepiece_file_name == SENTENCEPIECE_MODEL or os.path.isfile(os.path.join(directory, sentencepiece_file_name)):
        tokenizer = _saving_class(tokenizer_class).from_pretrained(directory)
    else:
        options = {name: config[name] for name in _SENTENCEPIECE_OPTIONS if name in config}
        tokenizer = _saving_class(tokenizer_class)(vocab_file=os.path.join(directory, SENTENCEPIECE_MODEL), **tokens, **options)
    _split_out_special_tokens(tokenizer)
    tokenizer.jinja_chat_template = chat_template_of(directory)
    return tokenizer


def _split_out_special_tokens(tokenizer) -> None:
    """Make ``<s>``, ``</s>`` and the other special tokens written as text tokenize to their ids, as transformers does.

    A directory holding only ``tokenizer.model`` declares no added tokens, and PaddleNLP then cut ``<s>`` written in
    a chat template into the pieces ``<``, ``s``, ``>``; transformers' slow and fast classes give the BOS id.
    Registering tokens the vocabulary already holds adds none; it only stops the text from being split.
    """
    unsplit = {name: token for name, token in tokenizer.special_tokens_map.items()
               if isinstance(token, str) and tokenizer.tokenize(token) != [token]}
    if unsplit:
        tokenizer.add_special_tokens(unsplit)  # the same names and tokens: the saved special tokens do not change


def write_hf_tokenizer_files(directory: str, chat_template: str | None) -> None:
    """Complete a tokenizer directory PaddleNLP's ``save_pretrained`` wrote so transformers loads it too.

    PaddleNLP names the Llama SentencePiece model ``sentencepiece.bpe.model`` (transformers reads
    ``tokenizer.model``: a copy is added) and writes its own class names into ``tokenizer_config.json``
    (``tokenizer_class`` becomes transformers' name). The Jinja ``chat_template``, when there is one, is added.
    """
    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    config = _read_json(config_path)
    if os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif os.path.isfile(os.path.join(directory, PADDLE_SENTENCEPIECE_MODEL)):
        if not os.path.isfile(os.path.join(directory, SENTENCEPIECE_MODEL)):
            shutil.copyfile(os.path.join(directory, PADDLE_SENTENCEPIECE_MODEL), os.path.join(directory, SENTENCEPIECE_MODEL))
        config["tokenizer_class"] = "LlamaTokenizer"
    if chat_template:
        config["chat_template"] = chat_template
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def write_fast_tokenizer_files(directory: str, pad_token: str | None) -> bool:
    """Make a directory ``write_hf_tokenizer_files`` completed load in transformers' fast tokenizer with our ids.

    A SentencePiece ``tokenizer.model`` gets the ``tokenizer.json`` that reproduces it (``sentencepiece_json``):
    without one, transformers converts the model itself and drops its normaliser. A ``tokenizer.json`` already there
    (an HF tokenizer we loaded) stays as it is. ``pad_token`` (the piece of ``config.json``'s ``pad_token_id``, or
    None) goes into ``tokenizer_config.json`` and ``special_tokens_map.json``. PaddleNLP's ``from_slow`` is dropped:
    it would make transformers ignore the ``tokenizer.json``. Decoding keeps SentencePiece's spaces
    (``clean_up_tokenization_spaces`` false, unless the source says otherwise).

    Returns:
        True when the ``tokenizer.json`` was built from a SentencePiece model.
    """
    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    config = _read_json(config_path)
    sentencepiece_path = os.path.join(directory, SENTENCEPIECE_MODEL)
    from_sentencepiece = not os.path.isfile(os.path.join(directory, TOKENIZER_JSON)) and os.path.isfile(sentencepiece_path)
    if from_sentencepiece:
        tokens, _ = _special_tokens(directory)
        bos = tokens.get("bos_token") if config.get("add_bos_token", True) else None  # Llama's defaults
        eos = tokens.get("eos_token") if config.get("add_eos_token", False) else None
        sentencepiece_tokenizer(sentencepiece_path, bos, eos).save(os.path.join(directory, TOKENIZER_JSON))
        # transformers 5's LlamaTokenizer keeps only the vocabulary and merges of a tokenizer.json and sets its own
        # normaliser (none); the generic class uses the file whole. The slow class still reads tokenizer.model.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("from_slow", None)
    # SentencePiece's text back, as transformers' own Llama and Qwen2 configs ask (not "a ." made "a.").
    config.setdefault("clean_up_tokenization_spaces", False)
    special_path = os.path.join(directory, SPECIAL_TOKENS_MAP)
    special = _read_json(special_path)
    if pad_token is not None:
        config["pad_token"] = special["pad_token"] = pad_token
    for path, content in ((config_path, config), (special_path, special)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    return from_sentencepiece


def chat_template_of(directory: str | None) -> str | None:
    """The Jinja ``chat_template`` of a model directory's ``tokenizer_config.json``, ``chat_template.json``, or the
    ``chat_template.jinja`` file transformers 5 (and 4.5x) writes instead."""
    if not directory:
        return None
    template = _read_json(os.path.join(directory, TOKENIZER_CONFIG)).get("chat_template")
    if template is None:
        template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template
