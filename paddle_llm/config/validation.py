"""Checks that run before anything distributed starts, and the CPU fallbacks for GPU-only switches.

Every rule is a pure function of the parsed flag values, the model's config fields and the world size, so it is
tested table-driven without a process group. Errors say what to change. All errors are reported together.
"""

from __future__ import annotations

import os
from typing import Mapping

# GPU-only switches that fall back on CPU: flag -> why it cannot run there
GPU_ONLY_FLAGS = {
    "flash_mask": "PaddleNLP's flash-mask attention kernel is GPU-only; attention runs through explicit masks (the same attention)",
    "use_flash_attention": "flash attention has no CPU kernel; using the standard attention",
    "use_fused_rms_norm": "the fused RMSNorm is a CUDA op; using the composed RMSNorm",
    "use_fused_rope": "the fused rotary embedding is a CUDA op; using the composed one",
    "use_fused_linear": "the fused linear is a CUDA op; using paddle.nn.Linear",
    "use_fused_dropout_add": "the fused dropout-add is a CUDA op; using the composed ops",
    "use_fused_linear_cross_entropy": "the fused linear cross-entropy is a CUDA op; using the composed loss",
    "fp16": "fp16 AMP has no effect on CPU (no fp16 kernels); training in float32",
    "bf16": "bf16 AMP keeps float32 weights on CPU and bf16 matmul has no CPU kernel; training in float32",
}
SHARDING_STAGES = ("stage1", "stage2", "stage3")
# Flash attention 2 kernels (what Paddle ships) exist for Ampere (sm80) and newer only.
FLASH_ATTENTION_MIN_CAPABILITY = (8, 0)


def _divisors(n: int, up_to: int | None = None) -> str:
    return ", ".join(str(d) for d in range(1, min(n, up_to or n) + 1) if n % d == 0)


# The largest degree worth suggesting for splitting a model dimension (a 32000-row vocabulary has 48 divisors).
LARGEST_SUGGESTED_DEGREE = 64


def _degree(values: Mapping, name: str) -> int:
    value = values.get(name)
    return 1 if value in (None, -1, 0) else int(value)


def sharding_stages(sharding) -> list[str]:
    """Normalise ``--sharding`` (``"stage2 offload"``, a list, or a bool meaning stage1) to its stage words."""
    if sharding is True:
        return ["stage1"]
    if not sharding:
        return []
    words = sharding if isinstance(sharding, list) else str(sharding).replace(",", " ").split()
    return [w for w in words if w not in ("False", "false", "0")]


def model_shape(model_fields: Mapping) -> dict:
    """Heads, KV heads, MLP width, layers and vocabulary from any supported family's config fields."""
    heads = model_fields.get("num_attention_heads")
    kv_heads = model_fields.get("num_key_value_heads") or (
        model_fields.get("multi_query_group_num") if model_fields.get("multi_query_attention") else None
    ) or heads
    layers = model_fields.get("num_hidden_layers") or model_fields.get("num_layers")
    vocab = model_fields.get("padded_vocab_size") or model_fields.get("vocab_size")
    ffn = model_fields.get("intermediate_size") or model_fields.get("ffn_hidden_size") or model_fields.get("inner_hidden_size")
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "ffn_hidden_size": ffn, "num_layers": layers, "vocab_size": vocab}


def _check_degrees_against_world(values: Mapping, world_size: int) -> list[str]:
    """The degrees must tile the processes: tp × pp × sep divides the world, sharding divides what is left."""
    errors = []
    tp, pp, sep = (_degree(values, name) for name in ("tensor_parallel_degree", "pipeline_parallel_degree", "sep_parallel_degree"))
    model_parallel = tp * pp * sep
    names = " × ".join(n for n, d in (("tensor_parallel_degree", tp), ("pipeline_parallel_degree", pp), ("sep_parallel_degree", sep)) if d > 1 or n != "sep_parallel_degree")
    if world_size == 1 and model_parallel > 1:
        # PaddleNLP silently drops every degree on one process: the run would not be the layout asked for.
        errors.append(
            f"{names} = {model_parallel} needs {model_parallel} processes but this run has 1: launch with "
            f"`python -m paddle.distributed.launch --nproc_per_node {model_parallel} ...` (or --gpus), or set the degrees to 1"
        )
    elif world_size > 1 and world_size % model_parallel != 0:
        errors.append(
            f"world size {world_size} is not divisible by {names} = {model_parallel}: launch a multiple of "
            f"{model_parallel} processes, or choose degrees whose product divides {world_size} ({_divisors(world_size)})"
        )
    sharding_degree = _degree(values, "sharding_parallel_degree")
    remaining = world_size // max(1, model_parallel)
    if world_size > 1 and sharding_degree > 1 and remaining % sharding_degree != 0:
        errors.append(
            f"sharding_parallel_degree={sharding_degree} does not divide the {remaining} data-parallel ranks left "
            f"after tensor, pipeline and sep parallel: use one of {_divisors(remaining)}"
        )
    return errors


def _check_combinations(values: Mapping, pipeline_supported: bool) -> list[str]:
    """Combinations PaddleNLP refuses (or silently ignores) at runtime."""
    errors = []
    tp, pp = _degree(values, "tensor_parallel_degree"), _degree(values, "pipeline_parallel_degree")
    stages = sharding_stages(values.get("sharding"))
    unknown = [w for w in stages if w not in SHARDING_STAGES + ("offload",)]
    if unknown:
        errors.append(f"--sharding {values.get('sharding')!r}: unknown word {unknown[0]!r}; use stage1, stage2 or stage3, optionally with offload")
    if pp > 1 and {"stage2", "stage3"} & set(stages):
        errors.append(
            f"--pipeline_parallel_degree {pp} cannot be combined with --sharding {' '.join(stages)}: "
            "PaddleNLP supports only stage1 sharding with pipeline parallel; use --sharding stage1"
        )
    if tp > 1 and "stage3" in stages:
        errors.append(
            f"--tensor_parallel_degree {tp} cannot be combined with --sharding stage3: PaddleNLP pairs tensor parallel "
            "with sharding stage1 or stage2 only; use --sharding stage2"
        )
    if values.get("sequence_parallel") and tp == 1:
        errors.append("--sequence_parallel splits activations across the tensor-parallel group: it needs --tensor_parallel_degree 2 or more")
    if pp > 1 and not pipeline_supported:
        errors.append(f"--pipeline_parallel_degree {pp}: this model family has no pipeline-parallel model in PaddleNLP; use tensor parallel or sharding")
    return errors


def _check_model_split(values: Mapping, model_fields: Mapping) -> list[str]:
    """Tensor parallel splits heads, KV heads, the MLP and the vocabulary; pipeline parallel splits the layers (and
    cannot split a tied embedding and LM head correctly)."""
    errors = []
    tp, pp = _degree(values, "tensor_parallel_degree"), _degree(values, "pipeline_parallel_degree")
    shape = model_shape(model_fields)
    for name in ("num_attention_heads", "num_key_value_heads", "ffn_hidden_size", "vocab_size"):
        count = shape[name]
        if tp > 1 and count and count % tp != 0:
            errors.append(f"tensor_parallel_degree={tp} does not divide {name}={count}: use {_divisors(count, LARGEST_SUGGESTED_DEGREE)}")
    if pp > 1 and model_fields.get("tie_word_embeddings"):
        # Measured on a tied 2-layer model, PP2 against one process: equal losses without clipping, but the norm is
        # sqrt(|g|^2 + |g_embedding|^2), so the default --max_grad_norm 1.0 clips by a different factor.
        errors.append(
            f"--pipeline_parallel_degree {pp} with tie_word_embeddings=true: PaddleNLP's pipeline keeps the tied "
            "embedding on the first and the last stage and counts its gradient on both in the global gradient norm, "
            "so gradient clipping (and the logged grad_norm) differ from one process; use tensor parallel or sharding"
        )
    vpp = _degree(values, "virtual_pp_degree")
    if pp > 1 and shape["num_layers"] and shape["num_layers"] % (pp * vpp) != 0:
        errors.append(
            f"num_layers={shape['num_layers']} is not divisible by pipeline_parallel_degree × virtual_pp_degree "
            f"= {pp * vpp}: use stages × virtual stages from {_divisors(shape['num_layers'])}"
        )
    return errors


def _check_micro_batches(values: Mapping) -> list[str]:
    """Under pipeline parallel a step's micro-batches are its accumulation steps; the schedule needs enough of them.

    The global batch is ``per_device_train_batch_size × gradient_accumulation_steps × data-parallel ranks``; the
    first factor is the micro-batch and the second their number.
    """
    errors = []
    pp, vpp = _degree(values, "pipeline_parallel_degree"), _degree(values, "virtual_pp_degree")
    accumulation = int(values.get("gradient_accumulation_steps") or 1)
    if vpp > 1 and pp < VIRTUAL_PP_MIN_STAGES:
        errors.append(
            f"--virtual_pp_degree {vpp} interleaves pipeline stages, which Paddle runs with {VIRTUAL_PP_MIN_STAGES} or more "
            f"(its interleaved schedule stops with 'virtual pipeline must run under pp degree > 2'): use "
            f"--pipeline_parallel_degree {VIRTUAL_PP_MIN_STAGES} or more, or --virtual_pp_degree 1"
        )
    if pp > 1 and accumulation < pp:
        errors.append(
            f"pipeline parallel with gradient_accumulation_steps={accumulation} < pipeline_parallel_degree={pp} "
            "leaves stages idle: each step needs at least one micro-batch per stage; raise --gradient_accumulation_steps"
        )
    elif pp > 1 and vpp > 1 and accumulation % pp != 0:
        multiples = ", ".join(str(pp * k) for k in range(1, 4))
        errors.append(
            f"the interleaved schedule (virtual_pp_degree={vpp}) runs micro-batches in rounds of pipeline_parallel_degree={pp}: "
            f"gradient_accumulation_steps={accumulation} must be a multiple of {pp} (e.g. {multiples})"
        )
    return errors


# Paddle's PipelineParallelWithInterleave asserts num_stages > 2.
VIRTUAL_PP_MIN_STAGES = 3


def check_parallel(values: Mapping, model_fields: Mapping | None, world_size: int, pipeline_supported: bool = True) -> list[str]:
    """Check the parallel layout: degrees against the world size and each other, the model's shape, micro-batches.

    Args:
        values: flag values (``tensor_parallel_degree``, ``sharding``, ...); -1, 0 or None mean off.
        model_fields: the model's config fields (None skips the shape rules).
        world_size: the number of processes the run will have.
        pipeline_supported: whether the model family has a pipeline-parallel model class.

    Returns:
        One message per problem, each naming what to change; empty when the layout is valid.
    """
    errors = _check_combinations(values, pipeline_supported)
    errors += _check_degrees_against_world(values, world_size)
    if model_fields:
        errors += _check_model_split(values, model_fields)
    errors += _check_micro_batches(values)
    errors += check_paddle_runtime_limits(values)
    return errors


def check_training(values: Mapping) -> list[str]:
    """The numbers and paths PaddleNLP's Trainer would otherwise reject with a bare assertion or an OSError traceback
    once training starts: the learning rate, the batch sizes, the checkpoint to resume from and the output directory."""
    errors = []
    if (values.get("learning_rate") or 0) < 0:
        errors.append(f"--learning_rate {values['learning_rate']}: a learning rate cannot be negative (PaddleNLP's default is 5e-05)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if name in values and values[name] is not None and values[name] < 1:
            errors.append(f"--{name} {values[name]}: must be 1 or more")
    resume = values.get("resume_from_checkpoint")
    if resume is not None and resume is not False:
        if str(resume).strip() == "":
            errors.append("--resume_from_checkpoint is empty: pass a checkpoint directory (output_dir/checkpoint-N), or drop "
                          "the flag to resume from the last complete checkpoint in --output_dir")
        elif not os.path.isdir(str(resume)):
            errors.append(f"--resume_from_checkpoint {resume}: no such directory; pass a checkpoint directory "
                          "(output_dir/checkpoint-N)")
        elif not os.listdir(str(resume)):
            errors.append(f"--resume_from_checkpoint {resume}: the directory is empty, so there is nothing to resume; pass "
                          "a checkpoint directory a run saved (output_dir/checkpoint-N)")
    return errors + _output_dir_errors(values.get("output_dir"))


def _output_dir_errors(output_dir: str | None) -> list[str]:
    """An output directory must be a directory (or not exist yet) that this user can write, or create."""
    if not output_dir:
        return []
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir {output_dir}: is a file, not a directory; pass a directory path (it is created if missing)"]
    existing = output_dir
    while not os.path.exists(existing):  # the nearest existing ancestor is where the directory gets created
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        return [f"--output_dir {output_dir}: {existing} is a file, so the directory cannot be created there; pass another path"]
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == output_dir else f"{existing} is"
        return [f"--output_dir {output_dir}: {where} read-only for this user; pass a directory you can write"]
    return []


def check_precision(values: Mapping, explicit: set[str]) -> list[str]:
    """``--fp16_opt_level O2`` needs ``--fp16`` or ``--bf16``; an explicit ``--fp16 0`` is a deliberate choice."""
    level = values.get("fp16_opt_level")
    if level == "O2" and "fp16_opt_level" in explicit and not (values.get("fp16") or values.get("bf16")):
        if "fp16" not in explicit and "bf16" not in explicit:
            return ["--fp16_opt_level O2 needs --fp16 or --bf16 (O2 is pure half precision); add one, or drop --fp16_opt_level"]
    if values.get("fp16") and values.get("bf16"):
        return ["--fp16 and --bf16 are exclusive: choose one"]
    return []


# --weight_quantize_algo values this toolkit quantizes (paddle_llm/peft/quantize.py); PaddleNLP's llm.int8 and a8w8
# are inference formats with no LoRA path, so they are refused here.
WEIGHT_QUANTIZE_ALGOS = ("nf4", "fp4", "weight_only_int8", "weight_only_int4")
BLOCKWISE_ALGOS = ("nf4", "fp4")


def check_quantization(values: Mapping, model_fields: Mapping | None) -> list[str]:
    """QLoRA's flags: a known algorithm, with ``--lora``, block sizes that tile the weights, one process per model.

    Every quantized layer has ``hidden_size`` as its input or output width, so a block size dividing
    ``hidden_size`` divides every weight (blocks run over the flattened ``[in, out]`` weight).
    """
    algo = values.get("weight_quantize_algo")
    if not algo:
        explicit_double = values.get("qlora_weight_double_quant")
        return ["--qlora_weight_double_quant quantizes the scales of a quantized base: add --weight_quantize_algo nf4 (or fp4)"] if explicit_double else []
    if algo not in WEIGHT_QUANTIZE_ALGOS:
        return [f"--weight_quantize_algo {algo!r} must be one of {', '.join(WEIGHT_QUANTIZE_ALGOS)} (llm.int8 and a8w8 are PaddleNLP inference formats with no LoRA training path)"]
    errors = []
    if not values.get("lora"):
        errors.append(f"--weight_quantize_algo {algo} stores the frozen base quantized for QLoRA, so only adapters can train: add --lora True")
    if values.get("prefix_tuning"):
        errors.append(f"--weight_quantize_algo {algo} is for LoRA adapters (QLoRA): drop --prefix_tuning")
    blocksize, double_blocksize = int(values.get("qlora_weight_blocksize") or 0), int(values.get("qlora_weight_double_quant_block_size") or 0)
    hidden = int((model_fields or {}).get("hidden_size") or 0)
    if algo in BLOCKWISE_ALGOS:
        if blocksize < 2 or blocksize % 2:
            errors.append(f"--qlora_weight_blocksize {blocksize}: must be an even number of weights (two 4-bit codes share a byte); PaddleNLP uses 64")
        elif hidden and hidden % blocksize:
            errors.append(f"--qlora_weight_blocksize {blocksize} does not divide hidden_size={hidden}, so it would not divide every weight (blocks tile each flattened weight exactly): use one of {', '.join(str(2**k) for k in range(1, 13) if hidden % 2**k == 0)} (64 is PaddleNLP's default)")
        if values.get("qlora_weight_double_quant") and double_blocksize < 1:
            errors.append(f"--qlora_weight_double_quant_block_size {double_blocksize}: must be at least 1 (PaddleNLP uses 256)")
    elif values.get("qlora_weight_double_quant"):
        errors.append(f"--qlora_weight_double_quant quantizes the block scales of nf4/fp4; {algo} has one scale per output channel: drop it, or use --weight_quantize_algo nf4")
    if _degree(values, "tensor_parallel_degree") > 1:
        errors.append(f"--weight_quantize_algo {algo} quantizes whole linear layers here, not tensor-parallel shards: use --tensor_parallel_degree 1 (data parallel or sharding work)")
    return errors


def check_device(values: Mapping, cuda_available: bool) -> list[str]:
    device = str(values.get("device") or "gpu")
    if device.startswith("gpu") and not cuda_available:
        return [
            f"--device {device} but this Paddle build has no CUDA support (a CPU build, or no GPU visible): pass "
            "--device cpu, or install paddlepaddle-gpu 3.x (see docs/install.md, 'GPU install')"
        ]
    if device.split(":")[0] not in ("gpu", "cpu", "xpu", "npu"):
        return [f"--device {device!r} is not one of gpu, cpu, xpu, npu"]
    return []


def supports_flash_attention(compute_capability: tuple[int, int]) -> bool:
    """Flash attention kernels exist for this compute capability (Ampere or newer)."""
    return tuple(compute_capability) >= FLASH_ATTENTION_MIN_CAPABILITY


def check_split(split: str) -> list[str]:
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        return [f"--split {split!r}: expected comma-separated numbers like 949,50,1"]
    if len(numbers) > 3 or any(n < 0 for n in numbers) or sum(numbers) <= 0:
        return [f"--split {split!r}: give up to three non-negative proportions (train,valid,test) with a positive sum"]
    return []


def apply_cpu_fallbacks(values: dict) -> list[str]:
    """Turn off GPU-only switches when training on CPU; return one warning per switch that was on."""
    if not str(values.get("device") or "gpu").startswith("cpu"):
        return []
    warnings = []
    for flag, reason in GPU_ONLY_FLAGS.items():
        if values.get(flag):
            values[flag] = False
            warnings.append(f"--{flag} is GPU-only: {reason}")
    if values.get("fp16_opt_level") == "O2" and not (values.get("fp16") or values.get("bf16")):
        values["fp16_opt_level"] = "O1"  # nothing left for O2 to act on once AMP is off
    pipeline_config = str(values.get("pipeline_parallel_config") or "").split()
    if _degree(values, "pipeline_parallel_degree") > 1 and "disable_batch_p2p_comm" not in pipeline_config:
        # Fleet's batched p2p sends on the compute stream, which gloo lacks; its isend/irecv path works on CPU.
        values["pipeline_parallel_config"] = " ".join(pipeline_config + ["disable_batch_p2p_comm"])
        warnings.append("pipeline parallel on CPU exchanges activations with isend/irecv: added disable_batch_p2p_comm to --pipeline_parallel_config")
    return warnings


# ---------------------------------------------------------------------------------------------------------------------
# PaddleNLP's argument files (llm/config/*/*.json): switches Paddle itself refuses on this machine, the LoRA variants'
# combinations, and PaddleNLP's PEFT methods this toolkit does not implement (each refused by name).

# flag -> (the method it selects, its companion flags); the flags are declared in config.arguments.PeftArguments
UNCLAIMED_PEFT_METHODS = {
    "vera": ("VeRA", ("vera_rank",)),
    "lokr": ("LoKr", ("lokr_path", "lokr_dim")),
    "use_shift_sparse_attention": ("LongLoRA (shifted sparse attention)", ()),
    "use_mora": ("MoRA", ()),
    "lora_use_mixer": ("MosLoRA", ()),
    "reft": ("ReFT", ()),
}
# PaddleNLP's run_finetune.py and run_dpo.py: ``--rslora_plus`` sets these three
RSLORA_PLUS = {"rslora": True, "lora_plus_scale": 4.0, "lora_alpha": 4}
# Paddle's sharding offload: "Only support offload strategy while using 'Adam', 'AdamW' and 'Momentum' optimizer with
# AMP/Pure FP16"
OFFLOAD_OPTIMIZERS = ("adamw", "adam", "momentum")


# Measured with PaddleNLP 3.0.0b4 on Paddle 3.3.1: segment_parallel_utils._reshard_qkv calls alltoall(inputs, outputs),
# Paddle 2's order; Paddle 3 reads alltoall(outputs, inputs). On 2 CPU processes, with gloo's missing all-to-all
# stood in for, step 1's gradient norm was NaN; with the two lists swapped back the losses matched one process.
SEP_PARALLEL_BROKEN = (
    "PaddleNLP 3.0.0b4 reshards attention heads with paddle.distributed.alltoall(inputs, outputs), Paddle 2's argument "
    "order; Paddle 3.3.1 takes (outputs, inputs), so attention reads unwritten memory (a NaN gradient at step 1 on any device)"
)


def check_paddle_runtime_limits(values: Mapping) -> list[str]:
    """Switches Paddle stops on deep inside the first step, reported before launch: sharding offload without AMP
    (always so on CPU, where AMP falls back to float32), and PaddleNLP's flash-mask kernel on a GPU (no flash-mask
    data path here; on CPU it falls back with a warning, ``GPU_ONLY_FLAGS``); sep parallel (``SEP_PARALLEL_BROKEN``),
    context parallel on CPU (it needs flash attention); and PaddleNLP's benchmark modes."""
    errors = []
    stages = sharding_stages(values.get("sharding"))
    on_cpu = str(values.get("device") or "gpu").startswith("cpu")
    if "offload" in stages:
        reason = "Paddle offloads sharded optimizer state only under AMP/pure fp16 with Adam, AdamW or Momentum"
        if on_cpu:
            errors.append(f"--sharding {' '.join(stages)}: {reason}, and AMP has no CPU kernels (fp16/bf16 fall back to float32 on CPU): drop offload")
        elif not (values.get("fp16") or values.get("bf16")):
            errors.append(f"--sharding {' '.join(stages)}: {reason}: add --bf16 True (or --fp16 True), or drop offload")
        elif not str(values.get("optim") or "adamw").startswith(OFFLOAD_OPTIMIZERS):
            errors.append(f"--sharding {' '.join(stages)}: {reason}, not --optim {values.get('optim')}: use adamw, or drop offload")
    if _degree(values, "sep_parallel_degree") > 1:
        errors.append(
            f"--sep_parallel_degree {_degree(values, 'sep_parallel_degree')}: {SEP_PARALLEL_BROKEN}: "
            "for long sequences use --tensor_parallel_degree with --sequence_parallel 1"
        )
    if _degree(values, "context_parallel_degree") > 1 and on_cpu:
        errors.append(
            f"--context_parallel_degree {_degree(values, 'context_parallel_degree')}: PaddleNLP stops with 'Context parallel requires "
            "`use_flash_attention=True`' and flash attention has no CPU kernel: run it on GPUs (Ampere or newer), or drop it"
        )
    for name in ("benchmark", "autotuner_benchmark"):
        if values.get(name):
            errors.append(f"--{name} (PaddleNLP's throughput mode) is not supported here: drop it; measure with benchmarks/ instead")
    if values.get("flash_mask") and not on_cpu:
        errors.append("--flash_mask (PaddleNLP's flash-mask attention kernel and its start/end-row data) is not supported on GPU here: drop it; attention masks are explicit tensors")
    return errors


def check_peft_variants(values: Mapping) -> list[str]:
    """The LoRA variants PaddleNLP's LoRAModel implements (rsLoRA, LoRA+, PiSSA, ``--rslora_plus``), and the PEFT
    methods refused by name (``UNCLAIMED_PEFT_METHODS``)."""
    errors = []
    for flag, (method, companions) in UNCLAIMED_PEFT_METHODS.items():
        given = [f"--{name}" for name in (flag, *companions) if values.get(name) not in (None, False)]
        if given:
            errors.append(f"{' '.join(given)}: {method} is not supported here; use --lora True (LoRA, rsLoRA, LoRA+ or PiSSA) or --prefix_tuning True")
    plus_scale = float(1.0 if values.get("lora_plus_scale") is None else values["lora_plus_scale"])
    variants = [f"--{name}" for name in ("rslora", "rslora_plus", "pissa") if values.get(name)]
    variants += ["--lora_plus_scale"] if plus_scale != 1.0 else []
    if variants and not values.get("lora"):
        errors.append(f"{' '.join(variants)} shape a LoRA adapter: add --lora True")
    elif variants and values.get("lora_path"):
        errors.append(f"{' '.join(variants)} shape a new adapter, but --lora_path loads one whose lora_config.json sets its own: drop {' '.join(variants)}")
    if plus_scale <= 0:
        errors.append(f"--lora_plus_scale {values.get('lora_plus_scale')}: must be positive (the B matrices' learning-rate multiple)")
    if values.get("rslora_plus"):
        clashes = [f"--{name} {values.get(name)}" for name, wanted in RSLORA_PLUS.items() if values.get(name) not in (None, False, -1, 1.0, wanted)]
        if clashes:
            errors.append(f"--rslora_plus sets --rslora True --lora_plus_scale 4 --lora_alpha 4, which {', '.join(clashes)} contradicts: drop one")
    if values.get("pissa"):
        if values.get("rslora") or values.get("rslora_plus"):
            errors.append("--pissa and --rslora are exclusive: PiSSA's adapter scaling is 1 (PaddleNLP ignores rsLoRA under PiSSA)")
        if values.get("weight_quantize_algo"):
            errors.append(f"--pissa rewrites the base weights, which --weight_quantize_algo {values['weight_quantize_algo']} stores quantized: use one of them")
        if _degree(values, "tensor_parallel_degree") > 1:
            errors.append("--pissa does not run under tensor parallel (PaddleNLP's parallel LoRA layers refuse it): use --tensor_parallel_degree 1")
    if plus_scale != 1.0 and str(values.get("optim")) == "lomo":
        errors.append("--lora_plus_scale sets a per-parameter learning rate, which --optim lomo does not read: use adamw or sgd")
    return errors
