"""PaddleNLP flag names <-> :class:`TrainingSetup`, in both directions.

``setup_from_flags`` reads the flags our entry scripts accept (``--sharding "stage2 offload"``, ``--fp16_opt_level``,
``--per_device_train_batch_size``...; see shared/reference/paddlenlp-flags.md), so the CLI and the trainer describe
a run the same way. ``flags_for_setup`` writes a setup back as flags to paste after ``run_pretrain.py`` or
``finetune_generation.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

from paddle_llm.estimator.memory import MemoryEstimate, TrainingSetup, estimate, shape_of

PRETRAIN_SCRIPT = "run_pretrain.py"
FINETUNE_SCRIPT = "finetune_generation.py"
SCRIPTS = (PRETRAIN_SCRIPT, FINETUNE_SCRIPT)


def parse_sharding(value: Any) -> tuple[int, bool]:
    """``"stage2 offload"`` -> ``(2, True)``; ``True`` means stage1 and empty/``False`` means no sharding.

    Raises:
        ValueError: an option other than stage1/stage2/stage3/offload.
    """
    if value is True:
        return 1, False
    if not value:
        return 0, False
    stage, offload = 0, False
    for option in str(value).replace(",", " ").split():
        if option in ("stage1", "stage2", "stage3"):
            stage = max(stage, int(option[-1]))
        elif option == "offload":
            offload = True
        else:
            raise ValueError(f"--sharding option {option!r} is not one of stage1, stage2, stage3, offload")
    if offload and stage == 0:
        raise ValueError("--sharding offload needs a stage: write --sharding 'stage2 offload'")
    return stage, offload


def _degree(value: Any) -> int | None:
    """PaddleNLP writes "off" as -1 (or leaves the flag out)."""
    return None if value is None or int(value) < 1 else int(value)


def _targets(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(value)


def setup_from_flags(flags: Mapping[str, Any]) -> TrainingSetup:
    """Build a setup from PaddleNLP-style flag values; keys the estimate does not need are ignored.

    Recognised keys: ``lora, lora_rank (or r), lora_target_modules, prefix_tuning, num_prefix_tokens, optim, fp16,
    bf16, fp16_opt_level, amp_master_grad, sharding, sharding_parallel_degree (or sharding_degree),
    tensor_parallel_degree, pipeline_parallel_degree, virtual_pp_degree, sequence_parallel, recompute,
    recompute_granularity, use_flash_attention, max_seq_length (or max_length), per_device_train_batch_size,
    gradient_accumulation_steps, num_gpus (devices per node), num_nodes, gpu_memory_gb, cpu_memory_gb, device,
    weight_quantize_algo, qlora_weight_blocksize, qlora_weight_double_quant, qlora_weight_double_quant_block_size``.

    Raises:
        ValueError: contradictory flags (both LoRA and prefix, both fp16 and bf16, O2 without either) or any
            :class:`TrainingSetup` check; the message names the flag to change.
    """
    get = flags.get
    if get("lora") and get("prefix_tuning"):
        raise ValueError("--lora and --prefix_tuning are exclusive; pick one")
    if get("fp16") and get("bf16"):
        raise ValueError("--fp16 and --bf16 are exclusive; pick one")
    amp_level = get("fp16_opt_level") or "O1"
    if amp_level == "O2" and not (get("fp16") or get("bf16")):
        raise ValueError("--fp16_opt_level O2 needs --fp16 or --bf16")
    stage, offload = parse_sharding(get("sharding"))
    lora_rank = get("lora_rank") or get("r") or 8
    sharding_degree = _degree(get("sharding_parallel_degree") or get("sharding_degree"))
    knobs = {
        "method": "lora" if get("lora") else "prefix" if get("prefix_tuning") else "full",
        "lora_rank": int(lora_rank),
        "lora_target_modules": _targets(get("lora_target_modules")),
        "num_prefix_tokens": int(get("num_prefix_tokens") or 128),
        "optimizer": get("optim") or "adamw",
        "precision": "bf16" if get("bf16") else "fp16" if get("fp16") else "fp32",
        "amp_level": amp_level,
        "amp_master_grad": bool(get("amp_master_grad")),
        "tensor_parallel_degree": _degree(get("tensor_parallel_degree")) or 1,
        "pipeline_parallel_degree": _degree(get("pipeline_parallel_degree")) or 1,
        "virtual_pp_degree": _degree(get("virtual_pp_degree")) or 1,
        "sharding_stage": stage,
        # Like PaddleNLP, a sharding degree of 1 turns sharding off.
        "sharding_parallel_degree": sharding_degree if stage else None,
        "sharding_offload": offload,
        "sequence_parallel": bool(get("sequence_parallel")),
        "recompute": bool(get("recompute")),
        "recompute_granularity": get("recompute_granularity") or "full",
        "use_flash_attention": bool(get("use_flash_attention")),
        "seq_length": int(get("max_seq_length") or get("max_length") or 2048),
        "micro_batch_size": int(get("per_device_train_batch_size") or 1),
        "gradient_accumulation_steps": int(get("gradient_accumulation_steps") or 1),
        "gpus_per_node": int(get("num_gpus") or 1),
        "num_nodes": int(get("num_nodes") or 1),
        "gpu_memory_gb": get("gpu_memory_gb", 80.0),
        "cpu_memory_gb": get("cpu_memory_gb"),
        "device": get("device") or "gpu",
        "weight_quantize_algo": get("weight_quantize_algo") or None,
        "weight_blocksize": int(get("qlora_weight_blocksize") or 64),
        "weight_double_quant": bool(get("qlora_weight_double_quant")),
        "weight_double_quant_block_size": int(get("qlora_weight_double_quant_block_size") or 256),
    }
    if stage and sharding_degree == 1:
        knobs.update(sharding_stage=0, sharding_parallel_degree=None, sharding_offload=False)
    return TrainingSetup(**knobs)


def default_script(setup: TrainingSetup) -> str:
    """Adapters and LOMO are fine-tuning; full training without them is pretraining."""
    return FINETUNE_SCRIPT if setup.method != "full" or setup.optimizer == "lomo" else PRETRAIN_SCRIPT


def flags_for_setup(setup: TrainingSetup, script: str) -> list[str]:
    """The flags that reproduce a setup, as command-line tokens, for ``script``.

    Raises:
        ValueError: an unknown script.
    """
    if script not in SCRIPTS:
        raise ValueError(f"script must be one of {', '.join(SCRIPTS)}; got {script!r}")
    flags: list[str] = []

    def add(name: str, value: Any = None) -> None:
        flags.append(f"--{name}")
        if value is not None:
            flags.append(str(value))

    if setup.mixed_precision:
        add(setup.precision, 1)
        add("fp16_opt_level", setup.amp_level)
        if setup.amp_master_grad:
            add("amp_master_grad", 1)
    if setup.optimizer != "adamw":
        add("optim", setup.optimizer)
    if setup.method == "lora":
        add("lora", 1)
        add("lora_rank", setup.lora_rank)
        if setup.lora_target_modules:
            add("lora_target_modules", ",".join(setup.lora_target_modules))
        if setup.weight_quantize_algo:
            add("weight_quantize_algo", setup.weight_quantize_algo)
            add("qlora_weight_blocksize", setup.weight_blocksize)
            if setup.weight_double_quant:
                add("qlora_weight_double_quant", 1)
                add("qlora_weight_double_quant_block_size", setup.weight_double_quant_block_size)
    elif setup.method == "prefix":
        add("prefix_tuning", 1)
        add("num_prefix_tokens", setup.num_prefix_tokens)
    add("tensor_parallel_degree", setup.tensor_parallel_degree)
    add("pipeline_parallel_degree", setup.pipeline_parallel_degree)
    if setup.virtual_pp_degree > 1:
        add("virtual_pp_degree", setup.virtual_pp_degree)
    if setup.sharding_stage:
        add("sharding", f'"stage{setup.sharding_stage}{" offload" if setup.sharding_offload else ""}"')
        add("sharding_parallel_degree", setup.sharding_degree)
    if setup.sequence_parallel:
        add("sequence_parallel", 1)
    if setup.recompute:
        add("recompute", 1)
        add("recompute_granularity", setup.recompute_granularity)
    if setup.use_flash_attention:
        add("use_flash_attention", 1)
    add("max_seq_length" if script == PRETRAIN_SCRIPT else "max_length", setup.seq_length)
    add("per_device_train_batch_size", setup.micro_batch_size)
    add("gradient_accumulation_steps", setup.gradient_accumulation_steps)
    return flags


def estimate_for_flags(model_config_fields: dict, flags: dict) -> MemoryEstimate:
    """The memory estimator's figure for a model config and PaddleNLP-style training flags.

    Args:
        model_config_fields: a preset dict or a parsed config.json.
        flags: flag name -> value (``max_seq_length``, ``per_device_train_batch_size``, ``fp16``, ``device``...);
            see :func:`paddle_llm.estimator.flags.setup_from_flags`. Capacities are left out: the doctor compares
            with the machine's own.

    Returns:
        The estimate for the most loaded device.

    Raises:
        ValueError: an unsupported model or contradictory flags.
    """
    setup = setup_from_flags({**flags, "gpu_memory_gb": None, "cpu_memory_gb": None})
    return estimate(shape_of(model_config_fields), setup)
