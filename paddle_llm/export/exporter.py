"""Write an export directory from a checkpoint: the step graph (or FastDeploy's layout) and everything around it.

``--format paddle`` directory::

    model.json, model.pdiparams     one decoding step with a KV cache (see step_graph), for Paddle Inference,
                                    runnable on any x86-64 CPU
    model.avx512f.json              exported on an AVX-512 CPU: the same step with Paddle's fused RMSNorm
    model.kernels.json, model.kernels.pdiparams
                                    where paddle_llm's CPU kernels compile (float32 Llama-family steps): the same
                                    step multiplying by panel-packed weights with the compiled matmul
    prefix_cache.pdparams           only for prefix-tuned checkpoints: the prefix as a ready-made past
    config.json                     PaddleNLP model config
    tokenizer files                 as the tokenizer's save_pretrained writes them
    generation_config.json          EOS / pad / BOS ids and default sampling settings
    paddle_llm_export.json          family, chat template, cache layout, limits, parity result

``--format fastdeploy`` directory: ``model.safetensors`` + ``config.json`` + tokenizer + ``generation_config.json``
(the checkpoint layout FastDeploy 2.x loads), plus ``paddle_llm_export.json``.

``--format hf`` directory: what transformers' ``save_pretrained`` writes (see
``paddle_llm.models.hf_checkpoint.save_hf_directory``), nothing else.

Every format also holds ``.paddle_llm_output.json`` (``paddle_llm.files.OUTPUT_MARKER``): export wrote it, so a
later export may replace it.
"""

from __future__ import annotations

import filecmp
import json
import os
from dataclasses import dataclass, replace

from paddle_llm.cpu import features as cpu_features
from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.inference.manifest import (
    AVX512_PROGRAM,
    DTYPES,
    FORMAT_FASTDEPLOY,
    FORMAT_HF,
    FORMAT_STATIC,
    GRAPH_PREFIX,
    KERNELS_PARAMS_FILE,
    KERNELS_PROGRAM,
    PARAMS_FILE,
    PORTABLE_PROGRAM,
    PREFIX_CACHE_FILE,
    STEP_INTERFACE,
    STEP_LLAMA_INFERENCE,
    ExportManifest,
    program_needs,
)
from paddle_llm.files import check_output_directory, replace_directory_atomically
from paddle_llm.models.hf_checkpoint import DEFAULT_MAX_SHARD_BYTES, default_write_dtype, save_hf_directory
from paddle_llm.models.registry import ModelFamily, resolve_model

EXPORT_COMMAND = "export"  # the marker its output directories carry
DEFAULT_GENERATION = {"max_new_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class ExportRequest:
    """What to export. Validated by ``validate`` before any model is loaded."""

    model_name_or_path: str
    output_path: str
    dtype: str | None = None  # None: float32, or for --format hf the source checkpoint's stored dtype
    format: str = FORMAT_STATIC
    lora_path: str | None = None
    prefix_path: str | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # --format hf: safetensors shards of at most this size
    overwrite: bool = False  # replace an existing output_path that export did not write

    def validate(self) -> None:
        """Raises: ValueError naming the flag to change."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.format not in (FORMAT_STATIC, FORMAT_FASTDEPLOY, FORMAT_HF):
            raise ValueError(f"--format must be {FORMAT_STATIC!r}, {FORMAT_FASTDEPLOY!r} or {FORMAT_HF!r}, got {self.format!r}")
        if self.lora_path and self.prefix_path:
            raise ValueError("--lora_path and --prefix_path are exclusive: a checkpoint is tuned one way")
        if self.format in (FORMAT_FASTDEPLOY, FORMAT_HF) and self.prefix_path:
            raise ValueError(f"--format {self.format} cannot carry a prefix (it holds plain weights); use --format paddle")
        if self.max_shard_bytes < 1:
            raise ValueError(f"--max_shard_size must be positive, got {self.max_shard_bytes} bytes")
        inputs = {"--model_name_or_path": self.model_name_or_path, "--lora_path": self.lora_path, "--prefix_path": self.prefix_path}
        check_output_directory("--output_path", self.output_path, inputs, EXPORT_COMMAND, overwrite=self.overwrite)


def _eos_ids(config, generation: dict) -> list[int]:
    eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _generation_config(source, config) -> dict:
    """The checkpoint's generation_config.json (if any) completed with the config's special ids and our defaults."""
    generation = dict(DEFAULT_GENERATION)
    path = os.path.join(source.directory or "", "generation_config.json")
    if source.directory and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            generation.update(json.load(f))
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if generation.get(name) is None and getattr(config, name, None) is not None:
            generation[name] = getattr(config, name)
    return generation


def _write_side_files(directory: str, config, tokenizer, generation: dict) -> None:
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)


def _check_dtype_supported(request: ExportRequest) -> None:
    """Half-precision step graphs need a CUDA build of Paddle.

    Tracing checks each op's dtype against the kernels the build registers, and the CPU build has no float16 /
    bfloat16 kernels for ops every family uses (where, multiply, arange, gather), so tracing fails midway. Weights
    alone (``--format fastdeploy``) can be cast anywhere.

    Raises:
        ValueError: half precision asked for a step graph on a CPU-only build.
    """
    import paddle

    if request.format == FORMAT_STATIC and request.dtype != "float32" and not paddle.device.is_compiled_with_cuda():
        raise ValueError(
            f"--dtype {request.dtype} step graphs need a CUDA build of Paddle: this CPU build has no {request.dtype} "
            "kernels for the ops the graph uses. Export float32 here, export on a GPU machine, or use "
            f"--format fastdeploy (weights only) with --dtype {request.dtype}"
        )


def _write_step_graph(staging: str, step, kernels_step, family: ModelFamily, dtype: str, prefix,
                      manifest: ExportManifest) -> None:
    """Trace the one-step graph (a ``step_graph.StepBuild``) into ``staging`` (and the prefix past, if any), and
    record both in the manifest.

    ``model.json`` runs on any x86-64 CPU. Where this CPU has AVX-512 and the step is ours, ``model.avx512f.json``
    is the same step with Paddle's fused RMSNorm over the same weights; serving picks it on CPUs that can run it.
    ``kernels_step`` (``_kernels_step``), when there is one, becomes ``model.kernels.json`` over its own packed
    weights, first in the manifest: serving picks it wherever the compiled kernels load.
    """
    import paddle

    from paddle_llm.inference.step_graph import save_step_graph, step_spec

    save_step_graph(step.layer, family, dtype, step.layout.num_layers, os.path.join(staging, GRAPH_PREFIX))
    manifest.programs = [{"file": PORTABLE_PROGRAM, "needs": program_needs(os.path.join(staging, PORTABLE_PROGRAM))}]
    if step.implementation == STEP_LLAMA_INFERENCE and cpu_features.fused_rms_norm_allowed(cpu_features.detect()):
        manifest.programs.insert(0, _write_avx512_program(staging, step, family, dtype))
    if kernels_step is not None:
        manifest.programs.insert(0, _write_kernels_program(staging, kernels_step, family, dtype))
    manifest.step_implementation = step.implementation
    manifest.cache = step.layout.to_dict()
    manifest.glm_positions = step_spec(family).glm_positions
    if prefix is not None:
        # Stored stacked over layers: one file, and the runtime splits it per layer.
        keys, values = prefix
        paddle.save({"key": paddle.stack(keys).astype(dtype), "value": paddle.stack(values).astype(dtype)},
                    os.path.join(staging, PREFIX_CACHE_FILE))
        manifest.prefix_cache = PREFIX_CACHE_FILE


def _kernels_step(model, family: ModelFamily, dtype: str, step, log):
    """The step over panel-packed weights with the compiled matmul (a ``StepBuild``), or None where it does not
    apply (PaddleNLP's forward kept, not float32) or the kernels cannot be compiled here (logged)."""
    from paddle_llm.inference.step_graph import build_step_layer

    if step.implementation != STEP_LLAMA_INFERENCE or dtype != "float32":
        return None
    kernels = cpu_kernels.load()
    if kernels is None:
        log(f"{KERNELS_PROGRAM} not written: paddle_llm's CPU kernels cannot be compiled here ({cpu_kernels.describe()})")
        return None
    return build_step_layer(model, family, dtype, packed_matmul=kernels)


def _write_kernels_program(staging: str, kernels_step, family: ModelFamily, dtype: str) -> dict:
    """Trace the packed-weight step into ``model.kernels.json`` and its own ``model.kernels.pdiparams``."""
    from paddle_llm.inference.step_graph import save_step_graph

    variant_prefix = os.path.join(staging, "kernels-variant")
    save_step_graph(kernels_step.layer, family, dtype, kernels_step.layout.num_layers, variant_prefix)
    os.replace(variant_prefix + ".pdiparams", os.path.join(staging, KERNELS_PARAMS_FILE))
    program = os.path.join(staging, KERNELS_PROGRAM)
    os.replace(variant_prefix + ".json", program)
    return {"file": KERNELS_PROGRAM, "params": KERNELS_PARAMS_FILE, "needs": program_needs(program)}


def _write_avx512_program(staging: str, step, family: ModelFamily, dtype: str) -> dict:
    """Trace the fused-RMSNorm variant of ``step`` and keep only its program: the same layer's buffers save to the
    same parameter file, which is checked byte for byte rather than assumed."""
    from paddle_llm.inference.step_graph import save_step_graph

    variant_prefix = os.path.join(staging, "avx512f-variant")
    step.layer.fused_rms_norm = True
    try:
        save_step_graph(step.layer, family, dtype, step.layout.num_layers, variant_prefix)
    finally:
        step.layer.fused_rms_norm = False
    if not filecmp.cmp(variant_prefix + ".pdiparams", os.path.join(staging, PARAMS_FILE), shallow=False):
        raise RuntimeError("the fused-RMSNorm step saved different weights than the portable one")
    os.remove(variant_prefix + ".pdiparams")
    program = os.path.join(staging, AVX512_PROGRAM)
    os.replace(variant_prefix + ".json", program)
    return {"file": AVX512_PROGRAM, "needs": program_needs(program)}


def _export_hf(request: ExportRequest, source, log) -> None:
    """``--format hf``: the merged float32 model, cast on write, as a Hugging Face directory."""
    from paddle_llm.inference.load import load_checkpoint_tokenizer, load_model

    if source.family.hf is None:
        raise ValueError(f"--format hf is not available for {source.family.name}: {source.family.hf_refusal}")
    tokenizer = load_checkpoint_tokenizer(source)
    log(f"loading {source.family.name} checkpoint {request.model_name_or_path}" + (f" + LoRA {request.lora_path}" if request.lora_path else ""))
    model = load_model(source, request.lora_path, merge_lora=True)
    generation = _generation_config(source, model.config)
    replace_directory_atomically(
        request.output_path,
        lambda staging: save_hf_directory(model, source.family.hf, tokenizer, staging, generation, request.max_shard_bytes, request.dtype),
        EXPORT_COMMAND,
        prefix=".export-",
        overwrite=request.overwrite,
    )
    log(f"wrote {request.output_path} (Hugging Face layout, {request.dtype})")


def export_checkpoint(request: ExportRequest, log=print) -> ExportManifest | None:
    """Export a checkpoint. The output directory is replaced only once everything is written.

    Args:
        request: what to export.
        log: progress lines go here.

    Returns:
        The manifest written (parity not yet filled in; see ``paddle_llm.export.parity``); None for ``--format hf``,
        which writes no manifest.

    Raises:
        ValueError, FileNotFoundError: bad flags or inputs, named in the message.
    """
    from paddle_llm.inference.load import (
        load_checkpoint_tokenizer,
        load_model,
        load_prefix_model,
        prefix_cache,
        reload_in_dtype,
    )
    from paddle_llm.inference.step_graph import build_step_layer, max_context_length, prepare_for_tracing, step_spec

    request.validate()
    source = resolve_model(request.model_name_or_path)
    if request.dtype is None:
        default = default_write_dtype(source.stored_dtype) if request.format == FORMAT_HF else "float32"
        request = replace(request, dtype=default)
    _check_dtype_supported(request)
    family = source.family
    if request.format == FORMAT_HF:
        return _export_hf(request, source, log)
    step_spec(family)  # fail on an unsupported family before loading anything
    tokenizer = load_checkpoint_tokenizer(source)
    log(f"loading {family.name} checkpoint {request.model_name_or_path}" + (f" + LoRA {request.lora_path}" if request.lora_path else ""))
    model = load_model(source, request.lora_path, merge_lora=True)
    prefix_model = load_prefix_model(model, source, request.prefix_path) if request.prefix_path else None
    model = reload_in_dtype(model, source, request.dtype)
    config = model.config
    step = kernels_step = prefix = None  # the FastDeploy layout holds weights only
    if request.format != FORMAT_FASTDEPLOY:
        prepare_for_tracing(model, family, config)
        step = build_step_layer(model, family, request.dtype)
        kernels_step = _kernels_step(model, family, request.dtype, step, log)
        log(f"step implementation: {step.implementation}"
            + (f" (PaddleNLP's forward kept: {step.kept_because})" if step.kept_because else ""))
        if prefix_model is not None:
            prefix = prefix_cache(prefix_model, family, step.layout)
    generation = _generation_config(source, config)
    manifest = ExportManifest(
        format=request.format,
        family=family.name,
        chat_template=family.name,
        dtype=request.dtype,
        vocab_size=int(config.vocab_size),
        max_context_length=max_context_length(family, config),
        eos_token_ids=_eos_ids(config, generation),
        pad_token_id=int(generation.get("pad_token_id") or 0),
        step_interface=STEP_INTERFACE,
        source={
            "model_name_or_path": os.path.abspath(request.model_name_or_path),
            "lora_path": os.path.abspath(request.lora_path) if request.lora_path else None,
            "prefix_path": os.path.abspath(request.prefix_path) if request.prefix_path else None,
        },
    )

    def write(staging: str) -> None:
        if request.format == FORMAT_FASTDEPLOY:
            log("writing model.safetensors (FastDeploy checkpoint layout)")
            model.save_pretrained(staging, safe_serialization=True)
        else:
            log(f"tracing one decoding step ({request.dtype}, dynamic batch and lengths)")
            _write_step_graph(staging, step, kernels_step, family, request.dtype, prefix, manifest)
        _write_side_files(staging, config, tokenizer, generation)
        manifest.save(staging)

    replace_directory_atomically(request.output_path, write, EXPORT_COMMAND, prefix=".export-", overwrite=request.overwrite)
    log(f"wrote {request.output_path}")
    return manifest
