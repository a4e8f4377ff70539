"""Loading a checkpoint for export: base weights, LoRA merged in, prefix-tuning turned into a past.

LoRA and prefix adapters load through ``paddle_llm.peft`` (PaddleNLP's ``LoRAModel`` / ``PrefixModelForCausalLM`` with
our per-family layouts). LoRA is merged (``W + A @ B * scaling``, LoRA layers swapped back for plain ``nn.Linear``),
so the exported graph has no adapter ops. A prefix has no weights to merge: its encoder's output *is* a per-layer
past, computed once here and stored next to the graph.
"""

from __future__ import annotations

import tempfile

import paddle

from paddle_llm.config.validation import GPU_ONLY_FLAGS
from paddle_llm.inference.manifest import CacheLayout
from paddle_llm.inference.step_graph import step_spec
from paddle_llm.models.registry import ModelFamily, ModelSource, build_config, build_model, load_tokenizer
from paddle_llm.peft.lora import load_lora
from paddle_llm.peft.lora import merge_lora as merge_into_model
from paddle_llm.peft.prefix import apply_prefix


def _require_weights(source: ModelSource) -> None:
    if not source.has_weights:
        raise FileNotFoundError(
            f"--model_name_or_path {source.name_or_path!r} has no weights to export; pass a checkpoint directory "
            "written by `paddle-llm pretrain`/`finetune` (config.json + model_state.pdparams)"
        )


def load_model(source: ModelSource, lora_path: str | None = None, merge_lora: bool = True):
    """Load a checkpoint in float32, with a LoRA adapter merged (or attached, for a reference model), with the
    GPU-only kernel switches off when running on a CPU.

    Args:
        source: a resolved checkpoint directory.
        lora_path: a directory holding ``lora_config.json`` and the adapter weights, or None.
        merge_lora: True folds the adapter into the base weights and returns the plain model; False returns the
            ``LoRAModel`` wrapper that computes ``x W + x A B * scaling`` at run time (the parity reference).

    Raises:
        FileNotFoundError: no weights, or the LoRA directory is not one.
        AdapterMismatchError: the adapter was saved for another base (the first mismatching tensor is named).
    """
    _require_weights(source)
    overrides = {"dtype": "float32"}
    if paddle.get_device() == "cpu":
        # A checkpoint trained on GPUs keeps its fused-kernel switches (--use_fused_rms_norm ...) in config.json;
        # on a CPU, PaddleNLP's forward would call kernels that do not exist there.
        overrides.update({name: False for name in GPU_ONLY_FLAGS if name.startswith("use_")})
    model = build_model(source, build_config(source, **overrides), load_weights=True)
    if lora_path:
        lora_model = load_lora(model, lora_path, source.name_or_path)
        model = merge_into_model(lora_model) if merge_lora else lora_model
    model.eval()
    return model


def load_prefix_model(model, source: ModelSource, prefix_path: str):
    """Wrap ``model`` (loaded from ``source``) with the prefix-tuning adapter saved in ``prefix_path``.

    Raises:
        FileNotFoundError: ``prefix_path`` has no ``prefix_config.json`` or no weights.
        AdapterMismatchError: the prefix was saved for another base (its past's shape is named).
    """
    prefix_model = apply_prefix(model, source.family, num_prefix_tokens=0, prefix_path=prefix_path, base_path=source.name_or_path)
    prefix_model.eval()
    return prefix_model


def prefix_cache(prefix_model, family: ModelFamily, layout: CacheLayout) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
    """The prefix encoder's past for one row, per layer, in the step graph's cache layout."""

    with paddle.no_grad():
        per_layer = prefix_model._get_past_key_values(1)
    # PaddleNLP's past is in its model's own cache layout (heads at axis 2); move each axis where ``layout`` has it.
    paddlenlp_axes = step_spec(family)
    source_axes = {layout.batch_axis: paddlenlp_axes.batch_axis, layout.seq_axis: paddlenlp_axes.seq_axis,
                   layout.head_axis: 2, 3: 3}
    permutation = [source_axes[axis] for axis in range(4)]
    keys = [layer_past[0].transpose(permutation) for layer_past in per_layer]
    values = [layer_past[1].transpose(permutation) for layer_past in per_layer]
    expected = layout.shape(1, keys[0].shape[layout.seq_axis])
    if list(keys[0].shape) != expected:
        raise ValueError(f"prefix past has shape {list(keys[0].shape)}, but the model's cache needs {expected}")
    return keys, values


def reload_in_dtype(model, source: ModelSource, dtype: str):
    """Rebuild ``model`` with its parameters in ``dtype``.

    Half-precision kernels are missing on CPU, so merging happens in float32 and PaddleNLP's loader does the cast;
    it also builds the layers under the target default dtype, which ChatGLM's attention reads at construction.
    """
    if dtype == "float32":
        return model
    with tempfile.TemporaryDirectory(prefix="paddle_llm_export_") as staging:
        model.save_pretrained(staging)
        staged = ModelSource(source.name_or_path, source.family, source.config_fields, staging, True)
        half = build_model(staged, build_config(staged, dtype=dtype), load_weights=True)
    half.eval()
    return half


def load_checkpoint_tokenizer(source: ModelSource):
    """The tokenizer saved with the checkpoint (or the shipped one for a preset)."""
    return load_tokenizer(source.directory or source.name_or_path, source.family)
