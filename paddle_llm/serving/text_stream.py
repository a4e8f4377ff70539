"""Turning a stream of token ids into a stream of text: incremental decoding and stop strings.

Streamed pieces concatenate to exactly the text a non-streamed request returns, because both go through these two
classes; the REST and gRPC layers only forward the pieces.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

# Leading prompt tokens kept as decoding context: SentencePiece drops a word's leading space at the start of a
# decode, so the first generated word needs something before it to decode exactly as it will in the full text.
CONTEXT_TOKENS = 6
INCOMPLETE_CHARACTER = "\ufffd"


class TextDecoder:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` (called as a function), and where the tokenizer allows it,
    the text each ordinary token adds to text already decoded, so streaming can skip decoding (``appended``)."""

    def __init__(self, decode: Callable[[list[int]], str], known_texts: Callable[[], dict[int, str]] | None = None):
        """
        Args:
            decode: ids to text.
            known_texts: builds ``appended`` when streaming first asks for it (a pass over the whole vocabulary,
                which a decoder only decoding, such as an endpoint's for logprobs, never pays).
        """
        self._decode = decode
        self._known_texts = known_texts

    def __call__(self, ids: list[int]) -> str:
        return self._decode(ids)

    @functools.cached_property
    def appended(self) -> dict[int, str]:
        """``{id: text}``: what ``id`` adds after text whose last token is one of ``follows_text``; ids not in it are
        decoded."""
        return self._known_texts() if self._known_texts else {}

    @functools.cached_property
    def follows_text(self) -> frozenset[int]:
        """The ids of ``appended`` whose text has a visible character."""
        return frozenset(i for i, text in self.appended.items() if not text.isspace())


def text_decoder(tokenizer) -> TextDecoder:
    """``tokenizer``'s decode, through SentencePiece directly where that is the same.

    PaddleNLP's decode walks ids and tokens in Python: 140 us for 8 ids against 3 us for SentencePiece's own, and
    streaming decodes twice per generated token and row, so at batch 8 it took a third of each decoding step. For a
    ``LlamaTokenizer`` with no added tokens, dropping its special ids and calling SentencePiece is its decode
    exactly (``tests/unit/test_engine.py`` compares them); other tokenizers keep their own decode. Even
    SentencePiece's two decodes per token were two thirds of the sampling and text time at 32 rows of the demo's
    model, so its ordinary pieces also get their appended text (``sentencepiece_appended_texts``).
    """
    from paddlenlp.transformers import LlamaTokenizer

    def plain(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    pieces = getattr(tokenizer, "sp_model", None)
    if type(tokenizer) is not LlamaTokenizer or pieces is None or tokenizer.added_tokens_encoder \
            or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return TextDecoder(plain)
    special, piece_count = frozenset(tokenizer.all_special_ids), pieces.get_piece_size()

    def direct(ids: list[int]) -> str:
        kept = [i for i in ids if i not in special]
        if any(i >= piece_count for i in kept):  # ids past the SentencePiece model: let PaddleNLP decide
            return plain(ids)
        return pieces.decode(kept)

    return TextDecoder(direct, functools.partial(sentencepiece_appended_texts, pieces, special))


def sentencepiece_appended_texts(pieces, special: frozenset[int]) -> dict[int, str]:
    """``{id: text}`` for each ordinary piece (not special, control, unknown or unused) and each ASCII byte piece,
    whose decode after another ordinary piece is that piece's decode plus its own text (the piece with U+2581 as a
    space, or the byte's character), checked by SentencePiece on every such pair with one anchor piece.

    Why that is enough: SentencePiece decodes by concatenating pieces; only a leading space of the whole text is
    dropped, bytes are merged into characters, and a suffix-space or denormalising model rewrites text. After text
    that ends in a visible character, none of that touches the next ordinary piece or ASCII byte, and a model where
    it would (suffix spaces, denormalisation) fails the check and keeps decoding. Bytes above 0x7F are parts of
    characters and are always decoded.
    """
    candidates, texts = [], []
    for i in range(pieces.get_piece_size()):
        if i in special or pieces.IsControl(i) or pieces.IsUnknown(i) or pieces.IsUnused(i):
            continue
        piece = pieces.IdToPiece(i)
        if not pieces.IsByte(i):
            candidates.append(i)
            texts.append(piece.replace("\u2581", " "))
        elif int(piece[3:-1], 16) < 0x80:  # "<0x41>"
            candidates.append(i)
            texts.append(chr(int(piece[3:-1], 16)))
    anchor = next((i for i, text in zip(candidates, texts) if text.isalnum() and not pieces.IsByte(i)), None)
    if anchor is None:
        return {}
    anchor_text = pieces.decode([anchor])
    decoded = pieces.decode([[anchor, i] for i in candidates])
    return {i: text for i, text, both in zip(candidates, texts, decoded)
            if both == anchor_text + text and INCOMPLETE_CHARACTER not in text}


def token_piece(decode: Callable[[list[int]], str], context: Sequence[int], token_id: int) -> str:
    """The text ``token_id`` adds after ``context`` (its last few ids), as logprobs name a token."""
    window = list(context[-CONTEXT_TOKENS:])
    before, after = decode(window), decode(window + [token_id])
    return after[len(before):] if after.startswith(before) else decode([token_id])


class IncrementalDetokenizer:
    """Decodes one token at a time, returning only the new text (vLLM's prefix/read offset scheme).

    Decoding a window that starts a few tokens back and diffing it against the same window without the newest
    tokens gives the new text with correct spacing. A byte-fallback character split over several tokens decodes as
    U+FFFD until its last byte arrives, so text ending in U+FFFD is held back.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], decode: TextDecoder | None = None):
        """
        Args:
            tokenizer: decodes ids to text.
            prompt_ids: the prompt; its last tokens are the decoding context.
            decode: ``text_decoder(tokenizer)`` when the caller already has one (it is built once per engine).
        """
        self._decode = decode or text_decoder(tokenizer)
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" while a character is still incomplete)."""
        token_id = int(token_id)
        # Nothing held back, and an ordinary piece after visible text: its text is known without decoding.
        if self.read_offset == len(self.ids) and self.ids and self.ids[-1] in self._decode.follows_text:
            text = self._decode.appended.get(token_id)
            if text is not None:
                self.ids.append(token_id)
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return text
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(INCOMPLETE_CHARACTER):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held back when generation ends (an incomplete character is returned as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopStringFilter:
    """Cuts output at the first stop string, holding back text that might be the start of one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.pending = ""

    def _held_back_length(self) -> int:
        # The longest tail of ``pending`` that is a proper prefix of some stop string.
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def push(self, text: str) -> tuple[str, bool]:
        """Add new text; return ``(text safe to emit, whether a stop string was hit)``."""
        if not self.stop:
            return text, False
        self.pending += text
        hits = [index for index in (self.pending.find(stop) for stop in self.stop) if index >= 0]
        if hits:
            emit, self.pending = self.pending[:min(hits)], ""
            return emit, True
        held = self._held_back_length()
        emit = self.pending[:len(self.pending) - held]
        self.pending = self.pending[len(self.pending) - held:]
        return emit, False

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason."""
        emit, self.pending = self.pending, ""
        return emit
