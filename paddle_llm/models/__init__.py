"""Model families built from PaddleNLP's classes, one package each (``llama/``, ``chatglm/``, ``chatglm2/``) listed in
``registry.py``, and models resolved from presets or local directories."""

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
