"""Tiny trained checkpoints for export and serving tests.

A preset model trained for a few dozen steps on one repeated sentence: small enough to build in seconds, trained
enough that greedy decoding produces varied text instead of one token forever (which would hide cache bugs).
"""

from __future__ import annotations

import os

import numpy as np

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns to repeat what it reads. "
    "Paddle serves answers to questions, one token at a time. "
)


def make_checkpoint(preset_name: str, directory: str, train_steps: int = 30, seed: int = 0, **overrides) -> str:
    """Build ``preset_name`` with a fixed seed, train it briefly, and save model + tokenizer to ``directory``.

    Returns:
        ``directory``.
    """
    import paddle

    from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model

    paddle.seed(seed)
    np.random.seed(seed)
    source = resolve_model(preset_name)
    model = build_model(source, build_config(source, **overrides), load_weights=False)
    tokenizer = load_tokenizer(preset_name, source.family)
    ids = np.asarray(tokenizer(TRAINING_TEXT * 4, add_special_tokens=False)["input_ids"], dtype="int64")
    window, batch = 33, 4
    optimizer = paddle.optimizer.AdamW(learning_rate=3e-3, parameters=model.parameters())
    model.train()
    rng = np.random.default_rng(seed)
    for _ in range(train_steps):
        starts = rng.integers(0, len(ids) - window, size=batch)
        chunk = np.stack([ids[s:s + window] for s in starts])
        inputs, labels = chunk[:, :-1], chunk[:, 1:]  # PaddleNLP causal-LM losses take pre-shifted labels
        extra = {k: paddle.to_tensor(v) for k, v in source.family.causal_lm_inputs(inputs).items()}
        outputs = model(input_ids=paddle.to_tensor(inputs), labels=paddle.to_tensor(labels), return_dict=False, **extra)
        loss = outputs[0]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _load(checkpoint: str):
    from paddle_llm.models.registry import build_config, build_model, resolve_model

    source = resolve_model(checkpoint)
    return source.family, build_model(source, build_config(source), load_weights=True)


def make_lora_adapter(checkpoint: str, directory: str, seed: int = 1) -> str:
    """A rank-4 LoRA adapter with non-zero B (PaddleNLP starts B at zero: merging that would be a no-op)."""
    import paddle

    from paddle_llm.peft.lora import apply_lora

    paddle.seed(seed)
    family, model = _load(checkpoint)
    lora_model = apply_lora(model, family, rank=4)
    for name, parameter in lora_model.named_parameters():
        if "lora_B" in name:
            parameter.set_value(paddle.randn(parameter.shape, dtype=parameter.dtype) * 0.05)
    lora_model.save_pretrained(directory)
    return directory


def make_prefix_adapter(checkpoint: str, directory: str, num_prefix_tokens: int = 4, seed: int = 2) -> str:
    """A prefix-tuning adapter with random prefix embeddings (as if trained)."""
    import paddle

    from paddle_llm.peft.prefix import apply_prefix

    paddle.seed(seed)
    family, model = _load(checkpoint)
    prefix_model = apply_prefix(model, family, num_prefix_tokens)
    for parameter in prefix_model.prefix_encoder.parameters():
        parameter.set_value(paddle.randn(parameter.shape, dtype=parameter.dtype) * 0.5)
    prefix_model.save_pretrained(directory)
    return directory
