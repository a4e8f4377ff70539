"""Opening a model for serving: an export directory in Paddle Inference, or a checkpoint in dygraph.

Both give a ``ServedModel``: the running ``Engine`` plus what the API layer needs (name, tokenizer, chat template,
limits). The engine code is the same for both; only the ``StepRunner`` under the decoder differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from paddle_llm.cpu import features as cpu_features
from paddle_llm.cpu.memory import host_memory
from paddle_llm.cpu.threads import available_cores
from paddle_llm.inference.sizing import BatchSizing, size_batch
from paddle_llm.inference.manifest import STEP_PADDLENLP, load_manifest
from paddle_llm.models.registry import ModelFamily, family_named, load_tokenizer, resolve_model
from paddle_llm.serving.adapters import ServedAdapters
from paddle_llm.serving.engine import Engine

ENGINE_PADDLE = "paddle"
ENGINE_DYGRAPH = "dygraph"
ENGINE_FASTDEPLOY = "fastdeploy"
ENGINES = (ENGINE_PADDLE, ENGINE_DYGRAPH, ENGINE_FASTDEPLOY)


@dataclass
class ServedModel:
    """A model ready to answer requests.

    Attributes:
        name: the id clients pass as ``model`` (the directory's base name).
        family: the model's family (its chat format is ``family.chat_template``).
        tokenizer: encodes prompts, decodes output.
        engine: the started engine.
        max_context_length: prompt + output positions.
        batch_sizing: how the engine's ``max_batch_size`` was chosen (printed at startup).
        generation_defaults: ``generation_config.json`` (default max tokens, sampling).
        adapters: the LoRA adapters requests may pick by name (``--lora_modules``), or None.
    """

    name: str
    family: ModelFamily
    tokenizer: object
    engine: Engine
    max_context_length: int
    generation_defaults: dict = field(default_factory=dict)
    batch_sizing: str = ""
    adapters: ServedAdapters | None = None


def _read_generation_config(directory: str) -> dict:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _eos_ids(*candidates) -> list[int]:
    for candidate in candidates:
        if candidate is not None:
            return [int(e) for e in (candidate if isinstance(candidate, (list, tuple)) else [candidate])]
    return []


def _batch_size(requested: int | None, layout, dtype: str, context: int) -> BatchSizing:
    """``requested``, or the size this machine and model take (``inference.sizing``)."""
    if requested is not None:
        return BatchSizing(requested, f"max_batch_size {requested} (--max_batch_size)")
    return size_batch(layout, dtype, context, available_cores(), host_memory()[1])


def _engine_options(prefill_chunk_tokens: int | None, prefix_cache_tokens: int | None) -> dict:
    """The ``Engine`` options given (None: its default)."""
    options = {"prefill_chunk_tokens": prefill_chunk_tokens, "prefix_cache_tokens": prefix_cache_tokens}
    return {name: value for name, value in options.items() if value is not None}


def open_export(model_dir: str, num_threads: int, max_batch_size: int | None, enable_mkldnn: bool = False,
                use_gpu: bool = False, prefill_chunk_tokens: int | None = None,
                prefix_cache_tokens: int | None = None) -> ServedModel:
    """Serve an export directory (``paddle-llm export --format paddle``) through Paddle Inference.

    ``max_batch_size`` None sizes the batch from the machine and the model (``inference.sizing``);
    ``prefill_chunk_tokens`` and ``prefix_cache_tokens`` None are the engine's defaults.

    Raises:
        FileNotFoundError, ValueError: not a step-graph export; the message says what to run.
    """
    from paddle_llm.inference.runtime import open_export_decoder

    manifest = load_manifest(model_dir)
    decoder = open_export_decoder(model_dir, manifest, num_threads=num_threads, enable_mkldnn=enable_mkldnn,
                                  use_gpu=use_gpu)
    family = family_named(manifest.family)
    tokenizer = load_tokenizer(model_dir, family)
    sizing = _batch_size(max_batch_size, decoder.layout, manifest.dtype, manifest.max_context_length)
    engine = Engine(decoder, tokenizer, manifest.eos_token_ids, manifest.max_context_length, sizing.max_batch_size,
                    **_engine_options(prefill_chunk_tokens, prefix_cache_tokens)).start()
    return ServedModel(
        name=os.path.basename(os.path.normpath(model_dir)),
        family=family,
        tokenizer=tokenizer,
        engine=engine,
        max_context_length=manifest.max_context_length,
        generation_defaults=_read_generation_config(model_dir),
        batch_sizing=sizing.reason,
    )


@dataclass(frozen=True)
class AdapterSlots:
    """How many LoRA adapters a checkpoint is served with (``--max_loras``, ``--max_lora_rank``) and whether the
    endpoints may change them."""

    max_loras: int
    max_rank: int
    runtime_updates: bool


def open_checkpoint(model_dir: str, max_batch_size: int | None, device: str = "cpu",
                    prefill_chunk_tokens: int | None = None, prefix_cache_tokens: int | None = None,
                    adapter_slots: AdapterSlots | None = None) -> ServedModel:
    """Serve a checkpoint directly in dygraph (``--engine dygraph``): no export step.

    Math threads are process-wide in dygraph; set them first (``paddle_llm.cpu.threads.configure_cpu_runtime``).

    Args:
        adapter_slots: room for per-request LoRA adapters (empty; ``ServedModel.adapters.load`` fills it), or None.

    Raises:
        FileNotFoundError, ValueError: not a checkpoint with weights, or a family adapters cannot be served on.
    """
    import paddle

    from paddle_llm.inference.load import load_checkpoint_tokenizer, load_model
    from paddle_llm.inference.runtime import DygraphStepRunner, StepDecoder
    from paddle_llm.inference.step_graph import build_step_layer, max_context_length, step_spec

    paddle.set_device(device)
    source = resolve_model(model_dir)
    family = source.family
    model = load_model(source)
    bank = None
    if adapter_slots is None:
        fused_rms_norm = cpu_features.fused_rms_norm_allowed(cpu_features.detect())
        step = build_step_layer(model, family, "float32", fused_rms_norm=fused_rms_norm)
        step_layer, layout = step.layer, step.layout
    else:
        bank, step_layer, layout = _adapter_step(model, family, adapter_slots)
    generation = _read_generation_config(model_dir)
    context = max_context_length(family, model.config)
    decoder = StepDecoder(
        DygraphStepRunner(step_layer),
        layout,
        "float32",
        step_spec(family).glm_positions,
        int(generation.get("pad_token_id") or getattr(model.config, "pad_token_id", 0) or 0),
        max_columns=context,
        adapter_bank=bank,
    )
    tokenizer = load_checkpoint_tokenizer(source)
    eos = _eos_ids(generation.get("eos_token_id"), getattr(model.config, "eos_token_id", None))
    sizing = _batch_size(max_batch_size, layout, "float32", context)
    engine = Engine(decoder, tokenizer, eos, context, sizing.max_batch_size,
                    **_engine_options(prefill_chunk_tokens, prefix_cache_tokens)).start()
    adapters = None if bank is None else ServedAdapters(bank, engine, model_dir, adapter_slots.runtime_updates)
    return ServedModel(
        name=os.path.basename(os.path.normpath(model_dir)),
        family=family,
        tokenizer=tokenizer,
        engine=engine,
        max_context_length=context,
        generation_defaults=generation,
        batch_sizing=sizing.reason,
        adapters=adapters,
    )


def _adapter_step(model, family: ModelFamily, slots: AdapterSlots):
    """The step with a ``LoRABank`` in every linear layer: PaddleNLP's forward (``KVCacheStep``), whose projections
    are the layers the bank wraps (a family's own inference step fuses them into other weights).

    Raises:
        ValueError: the family keeps its hidden states sequence-first (ChatGLM), which the bank's batched product
            does not handle.
    """
    from paddle_llm.inference.step_graph import KVCacheStep, cache_layout, step_spec
    from paddle_llm.peft.multi_lora import LoRABank

    if step_spec(family).batch_axis != 0:
        raise ValueError(f"--lora_modules: per-request adapters need a batch-first model, and {family.name} keeps its "
                         "hidden states sequence-first; merge each adapter (`paddle-llm merge-lora`) and serve the "
                         "merged model")
    bank = LoRABank(model, slots.max_loras, slots.max_rank)
    return bank, KVCacheStep(model, family, model.config.num_hidden_layers), cache_layout(family, model.config, STEP_PADDLENLP)
