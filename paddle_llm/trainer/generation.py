"""Greedy decoding for evaluation, and exact match against the reference replies.

A plain loop that re-runs the whole sequence for each new token: at the sizes evaluated on CPU it costs
milliseconds, it works the same for LoRA and prefix-tuned models, and it needs nothing from PaddleNLP's ``generate``
(whose cache path breaks on CPU for Llama in PaddleNLP 3.0.0b4). Inputs are built by the fine-tuning collator, so a
prompt is framed, masked and positioned exactly as in training (ChatGLM's 2-D positions included).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from paddle_llm.data.sft import IGNORE_INDEX, GenerationPrompt, SftCollator, SftSample


@dataclass(frozen=True)
class Prediction:
    reference: str
    prediction: str

    @property
    def correct(self) -> bool:
        return normalize_answer(self.prediction) == normalize_answer(self.reference)


def normalize_answer(text: str) -> str:
    """Exact match up to surrounding and repeated whitespace (tokenizers differ in how they decode spaces)."""
    return " ".join(text.split())


def _logits(outputs):
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits if hasattr(outputs, "logits") else outputs


def greedy_decode(model, prompts: list[GenerationPrompt], collator: SftCollator, max_new_tokens: int) -> list[list[int]]:
    """Decode each prompt greedily until EOS or ``max_new_tokens``; returns the new tokens (EOS excluded).

    Prompts of equal length are decoded together (they stay equal in length, so no padding is needed).
    """
    import paddle

    eos = collator.layout.eos_id
    results: list[list[int] | None] = [None] * len(prompts)
    by_length = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt.input_ids)].append(index)
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            for indices in by_length.values():
                sequences = [list(prompts[i].input_ids) for i in indices]
                generated = [[] for _ in indices]
                finished = [False] * len(indices)
                for _ in range(max_new_tokens):
                    rows = [
                        [SftSample(np.asarray(seq, dtype="int64"), np.full(len(seq), IGNORE_INDEX, dtype="int64"), prompts[i].context_length)]
                        for seq, i in zip(sequences, indices)
                    ]
                    features = collator(rows)
                    features.pop("labels")
                    outputs = model(**{name: paddle.to_tensor(value) for name, value in features.items()})
                    next_ids = paddle.argmax(_logits(outputs)[:, -1], axis=-1).numpy().tolist()
                    for row, token in enumerate(next_ids):
                        if finished[row]:
                            continue
                        if token == eos:
                            finished[row] = True
                        else:
                            generated[row].append(int(token))
                        sequences[row].append(int(token))
                    if all(finished):
                        break
                for row, i in enumerate(indices):
                    results[i] = generated[row]
    finally:
        if was_training:
            model.train()
    return results


def decode_tokens(tokenizer, tokens: list[int]) -> str:
    """Decode generated ids; ids past the tokenizer's vocabulary (a model's embedding is often padded beyond it)
    become ``<unk>`` instead of an error, so such a reply never matches."""
    size = len(tokenizer)
    pieces, run = [], []
    for token in tokens:
        if token < size:
            run.append(token)
            continue
        pieces += [tokenizer.decode(run, skip_special_tokens=True), "<unk>"]
        run = []
    pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)


def exact_match(model, prompts: list[GenerationPrompt], collator: SftCollator, tokenizer, max_new_tokens: int) -> tuple[float, list[Prediction]]:
    """Greedy-decode every prompt and compare with its reference.

    Returns:
        (accuracy in [0, 1], the predictions).
    """
    outputs = greedy_decode(model, prompts, collator, max_new_tokens)
    predictions = [
        Prediction(prompt.reference, decode_tokens(tokenizer, tokens))
        for prompt, tokens in zip(prompts, outputs)
    ]
    accuracy = sum(p.correct for p in predictions) / max(1, len(predictions))
    return accuracy, predictions
