"""Model families (llama, chatglm, chatglm2) built from PaddleNLP's classes, resolved from presets or local dirs."""

from paddle_llm.models.registry import (
    FAMILIES,
    ModelFamily,
    ModelSource,
    build_model,
    family_of,
    load_tokenizer,
    resolve_model,
)

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "ModelSource",
    "build_model",
    "family_of",
    "load_tokenizer",
    "resolve_model",
]
