"""How a family runs one KV-cache decoding step, as data the exporter and the server read (``ModelFamily.step``).

``paddle_llm.inference.step_graph`` drives every family through one signature (see there); a ``StepSpec`` says how to
call the family's PaddleNLP model for it, where its cache keeps batch and sequence, and what a traced graph needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def past_key_values_call(model, input_ids, position_ids, attention_mask, past):
    """One step through a PaddleNLP causal LM that takes ``past_key_values`` and returns ``(logits, presents)``."""
    logits, present = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=past,
        use_cache=True,
        return_dict=False,
    )[:2]
    return logits, present


@dataclass(frozen=True)
class StepSpec:
    """One family's decoding step.

    Attributes:
        call: ``(model, input_ids, position_ids, mask, past) -> (logits [b, q, vocab], [(key, value)] per layer)``.
        batch_axis, seq_axis: axes inside one layer's key tensor in PaddleNLP's cache (heads are at axis 2).
        glm_positions: the model takes ``position_ids`` as ``[b, 2, q]`` (position, block position), as ChatGLM v1.
        kv_geometry: ``config -> (key/value heads, head_dim)`` of the cache.
        prepare_for_tracing: swaps trace-friendly sublayers into a model in place (numerics unchanged), or None.
        inference_step: ``(model, dtype, fused_rms_norm, packed_matmul) -> (layer, "")``, a step of our own that
            reproduces the
            model in fewer ops, or ``(None, reason)`` for a model it cannot reproduce; None when the family has
            none and PaddleNLP's forward always runs. Its layer takes a head-major cache ``[b, heads, seq, dim]``.
    """

    call: Callable
    batch_axis: int
    seq_axis: int
    glm_positions: bool
    kv_geometry: Callable[[object], tuple[int, int]]
    prepare_for_tracing: Callable[[object, object], None] | None = None
    inference_step: Callable | None = None
