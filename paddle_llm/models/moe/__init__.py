"""Mixture-of-experts configs (ERNIE-4.5-21B-A3B's ``ernie4_5_moe``, ``qwen3_moe``, ``qwen2_moe``): estimated, not
trained.

``paddle-llm estimate`` reads their config.json and counts parameters and memory from the expert layout
(``estimate.py``); every other command refuses them with one line (``ModelFamily.estimate_only``), before anything
is built: there are no PaddleNLP classes behind this family here, no routing in our CPU paths, no export step.
"""

from __future__ import annotations

from paddle_llm.models.llama import estimate as llama_estimate
from paddle_llm.models.moe import estimate
from paddle_llm.models.registry import ModelFamily

FAMILY = ModelFamily(
    name="moe",
    model_types=("ernie4_5_moe", "qwen3_moe", "qwen2_moe"),
    config_class="",
    model_class="",
    tokenizer_class="",
    max_positions_field="max_position_embeddings",
    estimate_shape=estimate.shape,
    activations=llama_estimate.ACTIVATIONS,
    hf_refusal="training mixture-of-experts models is not supported yet",
    estimate_only=estimate.not_trained_line,
)
