"""Train a SentencePiece tokenizer and write a directory that PaddleNLP's Llama and ChatGLM tokenizers load.

One SentencePiece model serves all three families. Its special pieces have fixed ids, so a model preset can name
them without reading the tokenizer (see ``SPECIAL_PIECES``). The directory holds the model under each name a
PaddleNLP tokenizer class looks for, and a ``tokenizer_config.json`` naming the family's class for AutoTokenizer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys

import sentencepiece as spm

from paddle_llm.data.jsonl import DataError, iter_jsonl_texts
from paddle_llm.files import check_output_directory, replace_directory_atomically
from paddle_llm.models.registry import FAMILIES, tokenizer_model_files

# id order is fixed: <unk>=0 <s>=1 </s>=2 <pad>=3, then the user-defined symbols from id 4.
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
GLM_SYMBOLS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")

# The families whose tokenizer class reads a SentencePiece model: the ones a trained directory serves.
SENTENCEPIECE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.tokenizer_model_file)

# Chinese tokenizers use 0.9995: the rarest 0.05% of characters are left to byte fallback.
DEFAULT_CHARACTER_COVERAGE = 0.9995
MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece's own lower bound
# SentencePiece refuses a vocabulary with fewer pieces than the characters it must cover, plus its meta pieces;
# "A vs B" in its message is the asked size vs that minimum.
TOKENIZER_COMMAND = "tokenizer train"  # the marker its output directories carry

REQUIRED_CHARS_ERROR = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(
    input_path: str,
    output_dir: str,
    vocab_size: int,
    json_key: str = "text",
    family: str = "llama",
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
    overwrite: bool = False,
) -> dict:
    """Train SentencePiece on a jsonl file and write a tokenizer directory.

    Args:
        input_path: jsonl file; each line's ``json_key`` is one document.
        output_dir: written atomically: a crash leaves either the old directory or the new one. An existing
            directory is replaced only if a previous ``tokenizer train`` wrote it, or with ``overwrite``.
        vocab_size: the number of pieces asked for. A corpus too small for it gets fewer (reported back).
        family: which tokenizer class ``AutoTokenizer`` should use (llama, chatglm, chatglm2); every class loads it.
        model_type: SentencePiece algorithm (bpe, like Llama's, or unigram).
        character_coverage: the share of the corpus's characters (most frequent first) that get a piece each; the
            rest are encoded as UTF-8 bytes.

    Returns:
        A summary: actual vocabulary size, documents read, and the directory.

    Raises:
        DataError: bad input lines (file and line named).
        OutputPathError (a ValueError): ``output_dir`` overlaps ``input_path`` or holds someone else's files.
        ValueError: an unknown family, a coverage outside [0.98, 1], or a vocabulary too small for the special pieces
            or for the characters the coverage needs (the message gives the smallest --vocab_size that works).
    """
    if family not in SENTENCEPIECE_FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(SENTENCEPIECE_FAMILIES)}, got {family!r}")
    reserved = len(SPECIAL_PIECES) + len(GLM_SYMBOLS) + 256
    if vocab_size <= reserved:
        raise ValueError(f"--vocab_size {vocab_size} is too small: byte fallback and special pieces take {reserved}")
    if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:
        raise ValueError(f"--character_coverage {character_coverage} must be between {MIN_CHARACTER_COVERAGE} and 1.0 (SentencePiece's range)")
    check_output_directory("--output", output_dir, {"--input": input_path}, TOKENIZER_COMMAND, overwrite=overwrite)
    documents = [text for _, text in iter_jsonl_texts(input_path, json_key)]
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,  # every input is encodable, as with Llama's tokenizer: no <unk> for unseen characters
            split_digits=True,
            hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary instead of an error
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=SPECIAL_PIECES[0],
            bos_piece=SPECIAL_PIECES[1],
            eos_piece=SPECIAL_PIECES[2],
            pad_piece=SPECIAL_PIECES[3],
            user_defined_symbols=list(GLM_SYMBOLS),
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        # SentencePiece's own count (after its normalisation and sampling) is the exact minimum; ours could differ.
        too_small = REQUIRED_CHARS_ERROR.search(str(err))
        if not too_small:
            raise
        minimum = int(too_small.group(2))
        lower = f", or a lower --character_coverage (down to {MIN_CHARACTER_COVERAGE})" if character_coverage > MIN_CHARACTER_COVERAGE else ""
        raise ValueError(
            f"--vocab_size {vocab_size} is too small for {input_path}: at --character_coverage {character_coverage} it "
            f"needs {minimum - reserved} distinct characters, one piece each, plus {reserved} special and byte pieces: "
            f"use --vocab_size {minimum} or more{lower}"
        ) from None
    processor = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    tokenizer_config = {
        "tokenizer_class": FAMILIES[family].tokenizer_class,
        # ChatGLM-6B reserves 20000 image-token ids before the text pieces; a trained-from-scratch model does not.
        "num_image_tokens": 0,
        "model_max_length": 4096,
    }
    _write_directory_atomically(output_dir, model_bytes.getvalue(), tokenizer_config, overwrite)
    return {"vocab_size": processor.get_piece_size(), "documents": len(documents), "output_dir": output_dir}


def _write_directory_atomically(output_dir: str, model_bytes: bytes, tokenizer_config: dict, overwrite: bool) -> None:
    def write(staging: str) -> None:
        for file_name in tokenizer_model_files():
            with open(os.path.join(staging, file_name), "wb") as f:
                f.write(model_bytes)
        with open(os.path.join(staging, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2)

    replace_directory_atomically(output_dir, write, TOKENIZER_COMMAND, prefix=".tokenizer-", overwrite=overwrite, output_flag="--output")


def main(argv: list[str]) -> int:
    """``paddle-llm tokenizer train --input FILE.jsonl --vocab_size N --output DIR``."""
    parser = argparse.ArgumentParser(prog="paddle-llm tokenizer", description="Tokenizer tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a SentencePiece tokenizer from jsonl",
        description="Train a SentencePiece tokenizer (byte fallback, fixed special-token ids) and write a directory "
        "that PaddleNLP's LlamaTokenizer, ChatGLMTokenizer and ChatGLMv2Tokenizer all load.",
        epilog="example: paddle-llm tokenizer train --input corpus.jsonl --vocab_size 8000 --output my_tokenizer",
    )
    train.add_argument("--input", required=True, help="jsonl file, one document per line")
    train.add_argument("--vocab_size", type=int, required=True, help="pieces to learn (a small corpus may give fewer)")
    train.add_argument("--output", required=True, help="tokenizer directory to write (replaced atomically); it must not "
                       "hold --input, and an existing one is replaced only if `tokenizer train` wrote it")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --output directory that "
                       "`tokenizer train` did not write (everything in it is deleted)")
    train.add_argument("--json_key", default="text", help="the field holding each document (default: text)")
    train.add_argument("--family", default="llama", choices=sorted(SENTENCEPIECE_FAMILIES), help="AutoTokenizer class to record (default: llama)")
    train.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece algorithm (default: bpe)")
    train.add_argument(
        "--character_coverage",
        type=float,
        default=DEFAULT_CHARACTER_COVERAGE,
        help=f"share of the corpus's characters, most frequent first, that get a piece of their own (default: "
        f"{DEFAULT_CHARACTER_COVERAGE}, what Chinese tokenizers use; 1.0 suits a small alphabet). Rarer characters are "
        "encoded as UTF-8 bytes (byte fallback), never <unk>. Every covered character takes one piece, so a Chinese "
        f"corpus needs a --vocab_size of thousands; a lower coverage (down to {MIN_CHARACTER_COVERAGE}) lets a smaller one work",
    )
    args = parser.parse_args(argv)
    try:
        summary = train_tokenizer(
            args.input, args.output, args.vocab_size, args.json_key, args.family, args.model_type,
            character_coverage=args.character_coverage, overwrite=args.overwrite,
        )
    except (DataError, ValueError) as err:
        print(f"paddle-llm tokenizer: error: {err}", file=sys.stderr)
        return 2  # bad input, the exit code of argparse's own errors and of the trainers' configuration errors
    print(json.dumps(summary))
    return 0
