"""A SentencePiece model as a ``tokenizer.json`` that gives the same ids, for Hugging Face exports.

Without a ``tokenizer.json``, transformers' fast tokenizer (the default, and in transformers 5 the only one) builds
its own conversion of ``tokenizer.model``, and that conversion drops the model's normaliser: NFKC (full-width
punctuation becomes half-width), SentencePiece's whitespace rules (leading, trailing and repeated spaces removed).
Here every part is read from the model proto and rebuilt with the ``tokenizers`` library:

- normaliser: the precompiled character map (NFKC, or whatever rule the model was trained with), then, as
  SentencePiece does after it, runs of spaces collapsed and the ends' spaces removed (``remove_extra_whitespaces``),
  the dummy ``▁`` prefix (``add_dummy_prefix``; see ``_normalizer`` for the one text it differs on) and spaces
  escaped to ``▁`` (``escape_whitespaces``);
- model: BPE (merges ordered by the merged piece's score, as SentencePiece picks them) or Unigram (the scores),
  both with byte fallback when the model has it;
- ``<unk>``, control pieces (``<s>``, ``</s>``, ``<pad>``) and user-defined symbols as added tokens;
- decoder: ``▁`` back to spaces, byte pieces back to UTF-8, the dummy prefix's space removed.

The proto is read with a few lines of wire-format decoding: the ``sentencepiece`` wheel's ``sentencepiece_model_pb2``
needs protobuf 5, and Paddle pins protobuf 4.
"""

from __future__ import annotations

import re
import struct

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

SPACE_SYMBOL = "▁"
# SentencePiece's piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType
_MERGEABLE = (NORMAL, USER_DEFINED, UNUSED)  # the pieces SentencePiece's BPE may build by merging


def _wire_fields(data: bytes):
    """(field number, value) for each field of one protobuf message: ints for varints, bytes for length-delimited
    fields, raw 4/8 bytes for fixed-width ones."""
    position = 0

    def varint() -> int:
        nonlocal position
        value = shift = 0
        while True:
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, varint()
        elif wire_type == 2:
            length = varint()
            yield number, data[position:position + length]
            position += length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            yield number, data[position:position + width]
            position += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def read_sentencepiece_model(path: str) -> dict:
    """What a ``tokenizer.json`` needs from a SentencePiece model file (field numbers: sentencepiece_model.proto)."""
    with open(path, "rb") as f:
        data = f.read()
    model = {"pieces": [], "model_type": UNIGRAM, "byte_fallback": False, "unk_id": 0, "precompiled_charsmap": b"",
             "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True,
             "treat_whitespace_as_suffix": False}
    trainer_fields = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback", 40: "unk_id"}
    normalizer_fields = {2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, value in _wire_fields(data):
        if number == 1:
            piece = {"piece": "", "score": 0.0, "type": NORMAL}
            for field, field_value in _wire_fields(value):
                if field == 1:
                    piece["piece"] = field_value.decode("utf-8")
                elif field == 2:
                    piece["score"] = struct.unpack("<f", field_value)[0]
                elif field == 3:
                    piece["type"] = field_value
            model["pieces"].append(piece)
        elif number in (2, 3):
            names = trainer_fields if number == 2 else normalizer_fields
            for field, field_value in _wire_fields(value):
                if field in names:
                    default = model[names[field]]
                    model[names[field]] = type(default)(field_value)
    if model["model_type"] not in (UNIGRAM, BPE):
        raise ValueError(f"{path}: SentencePiece model type {model['model_type']} has no tokenizer.json equivalent "
                         "(only unigram and bpe do)")
    if model["treat_whitespace_as_suffix"]:
        raise ValueError(f"{path}: treat_whitespace_as_suffix has no tokenizer.json equivalent")
    return model


def _bpe_merges(pieces: list[dict]) -> list[tuple[str, str]]:
    """Every split of a mergeable piece into two mergeable pieces, best merged score first: SentencePiece's BPE
    applies the pair whose merged piece scores highest, transformers' BPE the lowest-ranked merge."""
    ids = {p["piece"]: i for i, p in enumerate(pieces) if p["type"] in _MERGEABLE}
    merges = []
    for merged, merged_id in ids.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                merges.append((-pieces[merged_id]["score"], merged_id, ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _normalizer(model: dict):
    """SentencePiece's normalisation. The user-defined symbols are added tokens matched in its output, and
    ``tokenizers`` normalises their own text too when it loads the file: so the dummy prefix is not put before a
    text that starts with one, or "<sop>" would be looked for as "▁<sop>" (SentencePiece gives "▁ <sop>" there,
    the one case that differs)."""
    steps = []
    if model["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(model["precompiled_charsmap"]))
    if model["remove_extra_whitespaces"]:
        # Only U+0020 counts, after the character map (which may turn other spaces into it): \A and \z, as ^ and $
        # would also match around a newline.
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if model["add_dummy_prefix"]:
        symbols = [re.escape(p["piece"]) for p in model["pieces"] if p["type"] == USER_DEFINED]
        not_before = "|".join(symbols + [r"\z"])  # nor before an empty text: SentencePiece gives it no pieces
        steps.append(normalizers.Replace(Regex(rf"\A(?!{not_before})"), SPACE_SYMBOL if model["escape_whitespaces"] else " "))
    if model["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", SPACE_SYMBOL))
    return normalizers.Sequence(steps)


def sentencepiece_tokenizer(path: str, bos_token: str | None, eos_token: str | None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` encoding and decoding as the SentencePiece model at ``path`` does.

    Args:
        bos_token, eos_token: added around every text by the post-processor (the tokenizer's ``add_bos_token`` /
            ``add_eos_token``), or None.
    """
    model = read_sentencepiece_model(path)
    pieces = model["pieces"]
    ids = {p["piece"]: i for i, p in enumerate(pieces)}
    byte_fallback = model["byte_fallback"]
    if model["model_type"] == BPE:
        unk = pieces[model["unk_id"]]["piece"]
        tokenizer = Tokenizer(models.BPE(ids, _bpe_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback))
    else:
        vocab = [(p["piece"], p["score"]) for p in pieces]
        tokenizer = Tokenizer(models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=byte_fallback))
    # Control pieces and <unk> are special tokens, split off before normalising (as PaddleNLP's tokenizers do).
    # User-defined symbols SentencePiece matches inside the normalised text: "hi<sop>there" is ▁hi <sop> there.
    tokenizer.add_tokens([AddedToken(p["piece"], normalized=p["type"] == USER_DEFINED, special=p["type"] != USER_DEFINED)
                          for p in pieces if p["type"] in (UNKNOWN, CONTROL, USER_DEFINED)])
    tokenizer.normalizer = _normalizer(model)
    steps = [decoders.Replace(SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model["add_dummy_prefix"]:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    framing = [token for token in (bos_token, eos_token) if token]
    if framing:
        single = " ".join(([f"{bos_token}:0"] if bos_token else []) + ["$A:0"] + ([f"{eos_token}:0"] if eos_token else []))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                 special_tokens=[(token, ids[token]) for token in framing])
    return tokenizer
