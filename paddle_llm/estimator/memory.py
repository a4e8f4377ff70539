"""Training memory per device and per host: pure functions over a :class:`ModelShape` and a :class:`TrainingSetup`.

Model states, per parameter on a device (``P`` = parameters on the device, ``T`` = trainable ones among them):

* parameters: ``4*P`` in fp32 and under AMP O1 (weights stay fp32, ops cast on the fly); ``2*P`` under O2
  (weights stored in fp16/bf16).
* gradients, for trainable parameters only: ``4*T`` (fp32, O1, or O2 with ``--amp_master_grad``), else ``2*T``.
  They persist between steps: PaddleNLP's Trainer calls ``optimizer.clear_grad()``, which zeroes them in place.
  LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited Resources") fuses the
  update into the backward pass, so only the largest gradient tensor exists at a time.
* optimizer states: AdamW keeps two fp32 moments, ``8*T``; SGD and LOMO keep none; under O2 the optimizer also
  keeps fp32 master weights, ``4*T`` (``multi_precision``), except LOMO, which updates the 16-bit weights.
  So mixed-precision AdamW costs ``2 + 2 + 12 = 16`` bytes per parameter, the figure of Rajbhandari et al. 2020
  ("ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"), section 3.1.
* sharding (ZeRO) over ``N_d`` ranks divides the optimizer states (stage1), and the gradients (stage2), and the
  parameters (stage3) by ``N_d``; stage3 then gathers one module at a time, a buffer of the largest module.
  ``offload`` (stage2/3) moves optimizer states and master weights, plus an fp32 gradient shard, to host memory.
* tensor parallelism divides linear weights (and the vocabulary, when ``t`` divides it) by ``t``; pipeline
  parallelism gives each stage ``ceil(L/p)`` layers, the embedding to the first and the head to the last.
* QLoRA (Dettmers et al. 2023; ``--weight_quantize_algo``) stores the frozen weight of each LoRA-targeted linear
  layer quantized, as ``paddle_llm.peft.quantize`` does: nf4/fp4 half a byte per weight plus a float32 absmax per
  ``blocksize`` weights (double quantization: one int8 per block, a float32 per ``double_quant_blocksize`` blocks);
  int8 one byte and int4 half a byte per weight plus a float32 scale per output channel. Each such layer rebuilds
  its float weight inside forward and backward, one layer at a time, so no 16-bit copy of it is kept; the base is
  still read at the training dtype before it is quantized (``init``).
* LoRA (Hu et al. 2021) adds ``r*(in+out)`` trainable parameters per targeted linear layer and freezes the rest;
  prefix tuning (Li & Liang 2021; PaddleNLP's ``PrefixModelForCausalLM`` without projection) adds
  ``prefix_tokens * L * 2 * kv_hidden`` trainable parameters. Frozen weights get no gradient and no optimizer state.

Activations follow :mod:`paddle_llm.estimator.activations` (Korthikanti et al. 2022 and PaddleNLP's own kernels).
With 1F1B pipelining, stage ``i`` holds ``min(p - i, micro_batches)`` micro-batches of its layers, times
``1 + (p-1)/(p*v)`` with ``v`` virtual stages (Korthikanti et al. 2022, section 4.2.3).

Buffers are the persistent non-parameter tensors (Llama's rotary caches), the 16-bit weight copies AMP O1 casts and
keeps for the backward pass, the stage3 gather buffer, and the largest transient: the logits next to the loss
softmax at the end of the forward pass, or one layer's recomputed activations and gradient workspace during its
backward pass (when the loss's tensors are already freed, and LOMO's one gradient exists).

The device total is the sum, because PaddleNLP keeps gradients and optimizer states alive through the forward
pass of every step after the first. It is what the allocator hands out; the CUDA context, allocator fragmentation
and communication buffers come on top, so ``fits`` keeps :data:`HEADROOM` of the device free.

Host memory per process is the larger of model initialisation (the rank's share of the checkpoint, read into host
memory before it moves to the device) and the offloaded states; the host runs one process per device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from paddle_llm.config.validation import BLOCKWISE_ALGOS, WEIGHT_QUANTIZE_ALGOS
from paddle_llm.estimator.activations import (
    ActivationContext,
    backward_workspace_bytes,
    first_stage_bytes,
    last_stage_bytes,
    layer_activations,
    logits_transient_bytes,
    recompute_mask_bytes,
    rotary_cache_bytes,
)
from paddle_llm.estimator.shapes import LinearModule, ModelShape, format_count, shape_from_config
from paddle_llm.models.registry import family_of

GIB = 2**30
# Fraction of device memory the estimate may use: the rest is for the CUDA context, allocator fragmentation and
# NCCL buffers, which the allocator's own count does not include.
HEADROOM = 0.10

METHODS = ("full", "lora", "prefix")
OPTIMIZERS = ("adamw", "sgd", "lomo")
PRECISIONS = ("fp32", "fp16", "bf16")
AMP_LEVELS = ("O1", "O2")
RECOMPUTE_GRANULARITIES = ("full", "full_attn", "core_attn")
DEVICES = ("gpu", "cpu")
# Bytes alive per weight while a quantized layer rebuilds its float weight (paddle_llm.peft.quantize.dequantize):
# the unpacked uint8 codes (1), their int32 indices (4), the gathered float32 values (4) and the scaled result (4).
DEQUANTIZE_WORKSPACE_BYTES = 13


def quantized_weight_bytes(in_features: int, out_features: int, algo: str, blocksize: int = 64,
                           double_quant: bool = False, double_quant_blocksize: int = 256) -> int:
    """Bytes one ``[in, out]`` weight takes stored as ``algo`` (codes and scales), as ``peft.quantize`` stores it."""
    count = in_features * out_features
    if algo not in BLOCKWISE_ALGOS:
        return (count if algo == "weight_only_int8" else count // 2) + 4 * out_features
    blocks = count // blocksize
    scales = blocks + 4 * -(-blocks // double_quant_blocksize) + 4 if double_quant else 4 * blocks
    return count // 2 + scales


@dataclass(frozen=True)
class TrainingSetup:
    """Every knob the estimate depends on; field names follow PaddleNLP's flags where one exists.

    Attributes:
        method: ``full`` fine-tune or pretraining, ``lora`` or ``prefix`` tuning.
        lora_rank: LoRA ``r``.
        lora_target_modules: module names or PaddleNLP regexes; empty means every linear layer.
        num_prefix_tokens: prefix-tuning virtual tokens.
        optimizer: ``adamw``, ``sgd`` or ``lomo``.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        amp_level: ``O1`` (fp32 weights, per-op casts) or ``O2`` (16-bit weights, fp32 master weights).
        amp_master_grad: keep fp32 gradients under O2.
        tensor_parallel_degree, pipeline_parallel_degree, virtual_pp_degree: model parallel layout.
        sharding_stage: 0 (plain data parallel), 1, 2 or 3.
        sharding_parallel_degree: ranks the states are sharded over; ``None`` means all data-parallel ranks.
        sharding_offload: move optimizer states to host memory (stage2/3).
        sequence_parallel: split the tensors outside tensor-parallel regions along the sequence.
        recompute: recompute activations in the backward pass; ``recompute_granularity`` says which.
        use_flash_attention: flash attention (no ``s*s`` tensors).
        seq_length, micro_batch_size, gradient_accumulation_steps: tokens per micro-batch and micro-batches per step
            (PaddleNLP's pipeline runs the accumulation steps as micro-batches).
        gpus_per_node, num_nodes: devices per host and hosts.
        gpu_memory_gb, cpu_memory_gb: capacity per device and per host, in GiB (2**30 bytes); ``None`` is unknown.
        device: ``gpu``, or ``cpu`` when training on the host itself (device memory then is host memory).
        weight_quantize_algo: QLoRA's storage of the LoRA-targeted frozen weights (nf4, fp4, weight_only_int8,
            weight_only_int4), or None; ``weight_blocksize``, ``weight_double_quant`` and
            ``weight_double_quant_block_size`` as PaddleNLP's ``QuantizationConfig`` names them.
    """

    method: str = "full"
    lora_rank: int = 8
    lora_target_modules: tuple[str, ...] = ()
    num_prefix_tokens: int = 128
    optimizer: str = "adamw"
    precision: str = "fp32"
    amp_level: str = "O1"
    amp_master_grad: bool = False
    tensor_parallel_degree: int = 1
    pipeline_parallel_degree: int = 1
    virtual_pp_degree: int = 1
    sharding_stage: int = 0
    sharding_parallel_degree: int | None = None
    sharding_offload: bool = False
    sequence_parallel: bool = False
    recompute: bool = False
    recompute_granularity: str = "full"
    use_flash_attention: bool = False
    seq_length: int = 2048
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gpus_per_node: int = 1
    num_nodes: int = 1
    gpu_memory_gb: float | None = 80.0
    cpu_memory_gb: float | None = None
    device: str = "gpu"
    weight_quantize_algo: str | None = None
    weight_blocksize: int = 64
    weight_double_quant: bool = False
    weight_double_quant_block_size: int = 256

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("optimizer (--optim)", self.optimizer, OPTIMIZERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("--fp16_opt_level", self.amp_level, AMP_LEVELS)
        _check_choice("--recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        _check_choice("--device", self.device, DEVICES)
        if self.sharding_stage not in (0, 1, 2, 3):
            raise ValueError(f"--sharding stage must be stage1, stage2 or stage3, got stage{self.sharding_stage}")
        for name in (
            "lora_rank", "num_prefix_tokens", "tensor_parallel_degree", "pipeline_parallel_degree",
            "virtual_pp_degree", "seq_length", "micro_batch_size", "gradient_accumulation_steps",
            "gpus_per_node", "num_nodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.world_size % (self.tensor_parallel_degree * self.pipeline_parallel_degree):
            raise ValueError(
                f"{self.world_size} devices ({self.num_nodes} node(s) x {self.gpus_per_node}) are not divisible by "
                f"tensor_parallel_degree x pipeline_parallel_degree = "
                f"{self.tensor_parallel_degree} x {self.pipeline_parallel_degree}; change a degree or --num_gpus"
            )
        if self.sharding_stage == 0 and (self.sharding_offload or (self.sharding_parallel_degree or 1) > 1):
            raise ValueError("--sharding_parallel_degree/offload need --sharding stage1, stage2 or stage3")
        if self.sharding_parallel_degree is not None and self.data_parallel_ranks % self.sharding_parallel_degree:
            raise ValueError(
                f"--sharding_parallel_degree {self.sharding_parallel_degree} must divide the "
                f"{self.data_parallel_ranks} data-parallel ranks left after tensor and pipeline parallelism"
            )
        if self.pipeline_parallel_degree > 1 and self.sharding_stage in (2, 3):
            raise ValueError(
                "pipeline parallelism with sharding stage2/stage3 is not supported by PaddleNLP; "
                "use --sharding stage1 or --pipeline_parallel_degree 1"
            )
        if self.sharding_offload and self.sharding_stage == 1:
            raise ValueError("PaddleNLP offloads only with sharding stage2 or stage3; write --sharding 'stage2 offload'")
        if self.method == "prefix" and self.pipeline_parallel_degree > 1:
            raise ValueError("prefix tuning does not support pipeline parallelism; set --pipeline_parallel_degree 1")
        if self.amp_master_grad and not (self.mixed_precision and self.amp_level == "O2"):
            raise ValueError("--amp_master_grad needs --bf16 or --fp16 with --fp16_opt_level O2")
        if self.virtual_pp_degree > 1 and self.pipeline_parallel_degree == 1:
            raise ValueError("--virtual_pp_degree needs --pipeline_parallel_degree > 1")
        if self.sequence_parallel and self.tensor_parallel_degree == 1:
            raise ValueError("--sequence_parallel needs --tensor_parallel_degree > 1")
        if self.weight_quantize_algo is not None:
            _check_choice("--weight_quantize_algo", self.weight_quantize_algo, WEIGHT_QUANTIZE_ALGOS)
            if self.method != "lora":
                raise ValueError(f"--weight_quantize_algo {self.weight_quantize_algo} is QLoRA: add --lora")
            if self.tensor_parallel_degree > 1:
                raise ValueError("--weight_quantize_algo quantizes whole layers: use --tensor_parallel_degree 1")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def data_parallel_ranks(self) -> int:
        """Ranks left for data parallelism and sharding after tensor and pipeline parallelism."""
        return self.world_size // (self.tensor_parallel_degree * self.pipeline_parallel_degree)

    @property
    def sharding_degree(self) -> int:
        if self.sharding_stage == 0:
            return 1
        return self.sharding_parallel_degree or self.data_parallel_ranks

    @property
    def mixed_precision(self) -> bool:
        return self.precision in ("fp16", "bf16")

    @property
    def weights_in_16bit(self) -> bool:
        return self.mixed_precision and self.amp_level == "O2"

    @property
    def recompute_mode(self) -> str | None:
        return self.recompute_granularity if self.recompute else None


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one device, by kind."""

    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers


@dataclass(frozen=True)
class EstimateDetails:
    """How the per-device numbers came about, for reports and the planner.

    Attributes:
        pipeline_stage: the stage reported (the most loaded one).
        total_params, trainable_params: whole model.
        params_on_device, trainable_on_device: on the reported device, before sharding divides them.
        layers_on_device: decoder layers of the reported stage.
        microbatch_layers_held: layer activations held at once (layers x micro-batches in flight).
        layer_activation_bytes: kept per layer and micro-batch.
        persistent_buffer_bytes: buffers that live as long as the model (rotary caches), part of the buffers.
        between_steps_bytes: what stays allocated between steps: parameters, optimizer states, gradients (except
            LOMO's, which live only in the backward pass) and persistent buffers.
        offloaded_bytes: states on the host per process (sharding offload).
        init_bytes: host memory per process while loading the checkpoint.
        device_capacity: usable bytes per device (after headroom), or None when unknown.
        host_capacity: usable bytes per host, or None when unknown.
        notes: assumptions worth reading.
    """

    pipeline_stage: int
    total_params: int
    trainable_params: int
    params_on_device: int
    trainable_on_device: int
    layers_on_device: int
    microbatch_layers_held: float
    layer_activation_bytes: int
    persistent_buffer_bytes: int
    between_steps_bytes: int
    offloaded_bytes: int
    init_bytes: int
    device_capacity: int | None
    host_capacity: int | None
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class MemoryEstimate:
    """The answer: bytes per device and per host, and whether they fit."""

    shape: ModelShape
    setup: TrainingSetup
    per_device: DeviceMemory
    per_host_cpu: int
    fits: bool | None
    details: EstimateDetails

    def to_json_dict(self) -> dict:
        """The ``--json`` object: ``per_device.{params,grads,optimizer,activations,buffers,total}``, ``per_host_cpu``
        and ``fits`` in bytes, plus the model, the setup and the details."""
        per_device = asdict(self.per_device)
        per_device["total"] = self.per_device.total
        return {
            "per_device": per_device,
            "per_host_cpu": self.per_host_cpu,
            "fits": self.fits,
            "model": {
                "family": self.shape.family,
                "num_params": self.shape.num_params,
                "num_layers": self.shape.num_layers,
                "hidden_size": self.shape.hidden_size,
                "num_attention_heads": self.shape.num_attention_heads,
                "num_key_value_heads": self.shape.num_key_value_heads,
                "intermediate_size": self.shape.intermediate_size,
                "vocab_size": self.shape.vocab_size,
                "guessed": list(self.shape.guessed),
            },
            "setup": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.setup).items()},
            "details": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.details).items()},
        }


def shape_of(model_config_fields: dict) -> ModelShape:
    """The shape of a preset dict or parsed config.json, its family found by the model registry.

    Raises:
        ValueError: unsupported ``model_type`` or inconsistent heads.
    """
    return shape_from_config(model_config_fields, family_of(model_config_fields))


def estimate_training_memory(model_config_fields: dict | ModelShape, **knobs) -> MemoryEstimate:
    """Estimate training memory for a model config and training knobs.

    This is what the trainer calls to print an estimate before the first step.

    Args:
        model_config_fields: a preset dict or parsed ``config.json`` (the family is found from ``model_type``), or a
            :class:`ModelShape` already built (e.g. from ``--num_params``).
        **knobs: :class:`TrainingSetup` fields, e.g. ``method="lora", precision="bf16", amp_level="O2",
            seq_length=2048, micro_batch_size=1, gpus_per_node=8, sharding_stage=2``.

    Returns:
        The estimate for the most loaded device.

    Raises:
        ValueError: a knob is invalid or the layout does not fit the model (the message says what to change).
    """
    shape = model_config_fields if isinstance(model_config_fields, ModelShape) else shape_of(model_config_fields)
    return estimate(shape, TrainingSetup(**knobs))


def estimate(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Estimate memory for a shape and setup (see the module docstring for every formula).

    Raises:
        ValueError: the tensor-parallel degree does not divide the heads, or the pipeline has more stages than layers.
    """
    _check_layout_fits_model(shape, setup)
    last = setup.pipeline_parallel_degree - 1
    stages = [_stage_estimate(shape, setup, stage) for stage in sorted({0, last})]
    return max(stages, key=lambda e: e.per_device.total)


def _check_layout_fits_model(shape: ModelShape, setup: TrainingSetup) -> None:
    t = setup.tensor_parallel_degree
    if shape.num_attention_heads % t or shape.num_key_value_heads % t:
        raise ValueError(
            f"--tensor_parallel_degree {t} must divide the {shape.num_attention_heads} attention heads and the "
            f"{shape.num_key_value_heads} key/value heads; choose a divisor"
        )
    if setup.pipeline_parallel_degree > shape.num_layers:
        raise ValueError(
            f"--pipeline_parallel_degree {setup.pipeline_parallel_degree} exceeds the {shape.num_layers} layers"
        )
    if setup.sequence_parallel and not shape.supports_sequence_parallel:
        raise ValueError(f"PaddleNLP's {shape.family} models do not implement --sequence_parallel; drop it")


def _vocab_params_per_rank(shape: ModelShape, params: int, t: int) -> int:
    # PaddleNLP splits the vocabulary over tensor-parallel ranks only when t divides it.
    return params // t if shape.vocab_size % t == 0 else params


def _layer_params_per_rank(shape: ModelShape, t: int) -> int:
    if shape.declared_num_params is None:
        return sum(m.params_per_rank(t) for m in shape.linear_modules) + shape.norm_params_per_layer
    # A declared count: split everything but the norms, as the linear layers are.
    return (shape.layer_params - shape.norm_params_per_layer) // t + shape.norm_params_per_layer


def _lora_params_per_rank(module: LinearModule, rank: int, t: int) -> int:
    """PaddleNLP's parallel LoRA layers: column-parallel splits B's output, row-parallel splits A's input."""
    if module.parallel_style == "column":
        return module.in_features * rank + rank * module.out_features // t
    return module.in_features // t * rank + rank * module.out_features


@dataclass(frozen=True)
class _StageParams:
    """Parameters on one rank of one pipeline stage."""

    trainable: int
    frozen: int
    largest_trainable_tensor: int
    matmul_weights: int  # weights AMP O1 casts to 16-bit
    quantized: int = 0  # frozen weights stored quantized (QLoRA), counted in ``frozen``
    quantized_bytes: int = 0  # what they take stored
    widest_quantized: int = 0  # the largest of them, rebuilt in float one layer at a time


def _stage_params(shape: ModelShape, setup: TrainingSetup, stage: int, layers: int) -> _StageParams:
    t = setup.tensor_parallel_degree
    first = stage == 0
    last = stage == setup.pipeline_parallel_degree - 1
    embedding = _vocab_params_per_rank(shape, shape.embedding_params, t)
    head = _vocab_params_per_rank(shape, shape.vocab_size * shape.hidden_size, t)
    linear = sum(m.params_per_rank(t) for m in shape.linear_modules)
    base = layers * _layer_params_per_rank(shape, t)
    if first:
        base += embedding
    if last:
        # A tied head on a later stage keeps its own copy of the shared weight.
        base += shape.final_norm_params + (head if (not shape.tie_word_embeddings or not first) else 0)
    matmul_weights = layers * linear + (head if last else 0)
    widest_linear = max(m.params_per_rank(t) for m in shape.linear_modules)
    largest_weight = max(embedding if first else 0, head if last else 0, widest_linear)

    if setup.method == "full":
        return _StageParams(base, 0, largest_weight, matmul_weights)
    if setup.method == "lora":
        targets = shape.lora_targets(setup.lora_target_modules)
        adapters = layers * sum(_lora_params_per_rank(m, setup.lora_rank, t) for m in targets)
        largest = max(max(m.in_features, m.out_features) * setup.lora_rank for m in targets)
        if not setup.weight_quantize_algo:
            return _StageParams(adapters, base, largest, matmul_weights)
        quantized = layers * sum(m.in_features * m.out_features for m in targets)
        stored = layers * sum(
            quantized_weight_bytes(m.in_features, m.out_features, setup.weight_quantize_algo, setup.weight_blocksize,
                                   setup.weight_double_quant, setup.weight_double_quant_block_size)
            for m in targets
        )
        widest = max(m.in_features * m.out_features for m in targets)
        return _StageParams(adapters, base, largest, matmul_weights - quantized, quantized, stored, widest)
    # Prefix tuning: one embedding of num_prefix_tokens x (L * 2 * kv_hidden), split over heads, on stage 0.
    prefix = setup.num_prefix_tokens * shape.num_layers * 2 * shape.kv_hidden_size // t if first else 0
    return _StageParams(prefix, base, prefix, matmul_weights)


def _stage_estimate(shape: ModelShape, setup: TrainingSetup, stage: int) -> MemoryEstimate:
    p = setup.pipeline_parallel_degree
    layers = math.ceil(shape.num_layers / p)
    params = _stage_params(shape, setup, stage, layers)
    shards = setup.sharding_degree
    stage3 = setup.sharding_stage == 3

    param_bytes = 2 if setup.weights_in_16bit else 4
    grad_bytes = 4 if (not setup.weights_in_16bit or setup.amp_master_grad) else 2
    moment_bytes = 8 if setup.optimizer == "adamw" else 0
    master_bytes = 4 if (setup.weights_in_16bit and setup.optimizer != "lomo") else 0

    params_on_device = (params.frozen - params.quantized + params.trainable) * param_bytes + params.quantized_bytes
    if stage3:
        params_on_device //= shards
    if setup.optimizer == "lomo":
        grads = params.largest_trainable_tensor * grad_bytes
    else:
        grads = params.trainable * grad_bytes // (shards if setup.sharding_stage >= 2 else 1)
    optimizer_states = params.trainable * (moment_bytes + master_bytes) // shards
    offloaded = 0
    if setup.sharding_offload:
        # The host keeps the moments, the fp32 master weights (fp32 training: the weights themselves) and an fp32
        # gradient shard the host optimizer reads (DeepSpeed's offload_optimizer counts the same 16 bytes).
        offloaded = params.trainable * (moment_bytes + 4 + 4) // shards
        optimizer_states = 0

    ctx = ActivationContext(
        seq_length=setup.seq_length,
        micro_batch_size=setup.micro_batch_size,
        prefix_tokens=setup.num_prefix_tokens if setup.method == "prefix" else 0,
        mixed_precision=setup.mixed_precision,
        tensor_parallel_degree=setup.tensor_parallel_degree,
        sequence_parallel=setup.sequence_parallel,
        flash_attention=setup.use_flash_attention,
        recompute_granularity=setup.recompute_mode,
        adapter_width=_lora_adapter_width(shape, setup),
        frozen_embedding=setup.method != "full",
    )
    in_flight = min(p - stage, setup.gradient_accumulation_steps)
    interleave = 1 + (p - 1) / (p * setup.virtual_pp_degree) if setup.virtual_pp_degree > 1 else 1.0
    layer = layer_activations(shape, ctx)
    held = layers * in_flight * interleave
    activations = (layer.kept * held) + recompute_mask_bytes(shape, ctx) * in_flight
    if stage == 0:
        activations += first_stage_bytes(shape, ctx) * in_flight
    is_last = stage == p - 1
    last_stage = last_stage_bytes(shape, ctx) * in_flight if is_last else 0.0
    activations += last_stage

    # Two moments compete for the peak: the end of the forward pass, when the logits sit next to the loss softmax,
    # and a layer's backward pass, when its recomputed activations and its gradients exist but the loss's tensors
    # are already freed.
    # LOMO's single gradient exists only during the backward pass, so it shares that moment's peak.
    backward_only_grads = grads if setup.optimizer == "lomo" else 0
    end_of_forward = logits_transient_bytes(shape, ctx) if is_last else 0.0
    during_backward = layer.rebuilt + backward_workspace_bytes(shape, ctx) - last_stage + backward_only_grads
    transient = max(end_of_forward, during_backward, 0.0) - backward_only_grads
    cast_weights = params.matmul_weights * 2 * in_flight if (setup.mixed_precision and setup.amp_level == "O1") else 0
    gather = shape.largest_layer_params // setup.tensor_parallel_degree * param_bytes if stage3 else 0
    persistent = rotary_cache_bytes(shape, layers)
    dequantize = params.widest_quantized * DEQUANTIZE_WORKSPACE_BYTES
    buffers = persistent + cast_weights + gather + transient + dequantize

    per_device = DeviceMemory(
        params=int(params_on_device),
        grads=int(grads),
        optimizer=int(optimizer_states),
        activations=int(activations),
        buffers=int(buffers),
    )
    init = (params.frozen + params.trainable) * param_bytes
    processes_per_host = setup.gpus_per_node
    if setup.device == "cpu":
        per_host = processes_per_host * (per_device.total + offloaded)
    else:
        per_host = processes_per_host * max(init, offloaded)

    device_capacity = _usable(setup.cpu_memory_gb if setup.device == "cpu" else setup.gpu_memory_gb)
    host_capacity = _usable(setup.cpu_memory_gb)
    checks = []
    if device_capacity is not None:
        checks.append(per_device.total <= device_capacity)
    if host_capacity is not None:
        checks.append(per_host <= host_capacity)
    fits = all(checks) if checks else None

    details = EstimateDetails(
        pipeline_stage=stage,
        total_params=shape.num_params,
        trainable_params=_whole_model_trainable(shape, setup),
        params_on_device=params.frozen + params.trainable,
        trainable_on_device=params.trainable,
        layers_on_device=layers,
        microbatch_layers_held=held,
        layer_activation_bytes=int(layer.kept),
        persistent_buffer_bytes=persistent,
        between_steps_bytes=int(per_device.model_states - backward_only_grads + persistent),
        offloaded_bytes=int(offloaded),
        init_bytes=int(init),
        device_capacity=device_capacity,
        host_capacity=host_capacity,
        notes=_notes(shape, setup),
    )
    return MemoryEstimate(shape, setup, per_device, int(per_host), fits, details)


def _lora_adapter_width(shape: ModelShape, setup: TrainingSetup) -> int:
    if setup.method != "lora":
        return 0
    return setup.lora_rank * len(shape.lora_targets(setup.lora_target_modules))


def _whole_model_trainable(shape: ModelShape, setup: TrainingSetup) -> int:
    """Trainable parameters of the whole model: one stage holding everything, unsplit."""
    single = replace(
        setup, tensor_parallel_degree=1, pipeline_parallel_degree=1, virtual_pp_degree=1, sequence_parallel=False
    )
    return _stage_params(shape, single, 0, shape.num_layers).trainable


def _usable(capacity_gb: float | None) -> int | None:
    return None if capacity_gb is None else int(capacity_gb * GIB * (1 - HEADROOM))


def _notes(shape: ModelShape, setup: TrainingSetup) -> tuple[str, ...]:
    notes = []
    if shape.guessed:
        notes.append(f"guessed {', '.join(shape.guessed)} from the parameter count; pass them to be exact")
    if setup.mixed_precision:
        notes.append("mixed-precision activation bytes follow PaddleNLP's code; only fp32 on CPU is measured")
    if setup.optimizer == "lomo":
        notes.append("LOMO: gradients are the largest tensor only; no optimizer state, no master weights")
    if setup.pipeline_parallel_degree > 1:
        notes.append("pipeline: 1F1B schedule, the most loaded stage is reported")
    if setup.weight_quantize_algo:
        notes.append(f"QLoRA: the LoRA-targeted base weights are stored as {setup.weight_quantize_algo}; embeddings, norms and the head stay in the training dtype")
    notes.append(
        f"fits keeps {HEADROOM:.0%} of each device free for the CUDA context, fragmentation and communication buffers"
    )
    return tuple(notes)


def format_bytes(count: float) -> str:
    """Binary units: ``1536`` -> ``1.50 KiB``; GiB is 2**30 bytes."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def describe_setup(setup: TrainingSetup) -> str:
    """One line: method, optimizer, precision, layout, recompute and batch."""
    lora = f"QLoRA {setup.weight_quantize_algo}" if setup.weight_quantize_algo else "LoRA"
    method = {"full": "full", "lora": f"{lora} r={setup.lora_rank}", "prefix": f"prefix {setup.num_prefix_tokens} tokens"}
    precision = setup.precision if not setup.mixed_precision else f"{setup.precision} {setup.amp_level}"
    if setup.amp_master_grad:
        precision += " master-grad"
    data_parallel = setup.data_parallel_ranks // setup.sharding_degree
    if setup.sharding_stage:
        offload = " offload" if setup.sharding_offload else ""
        sharding = f", sharding stage{setup.sharding_stage}{offload} over {setup.sharding_degree}"
    else:
        sharding = ""
    recompute = setup.recompute_granularity if setup.recompute else "off"
    return (
        f"{method[setup.method]}, {setup.optimizer}, {precision}; {setup.num_nodes}x{setup.gpus_per_node} "
        f"{setup.device}(s): tp {setup.tensor_parallel_degree}, pp {setup.pipeline_parallel_degree}"
        f"{f' (vpp {setup.virtual_pp_degree})' if setup.virtual_pp_degree > 1 else ''}{sharding}, data parallel "
        f"{data_parallel}{', sequence parallel' if setup.sequence_parallel else ''}; recompute {recompute}"
        f"{', flash attention' if setup.use_flash_attention else ''}; seq {setup.seq_length} x micro-batch "
        f"{setup.micro_batch_size} x accumulation {setup.gradient_accumulation_steps}"
    )


def format_estimate(estimate: MemoryEstimate) -> str:
    """A text table of the estimate, as ``paddle-llm estimate`` and the trainer print it."""
    d, details = estimate.per_device, estimate.details
    stage = f", pipeline stage {details.pipeline_stage}" if estimate.setup.pipeline_parallel_degree > 1 else ""
    rows = [
        ("parameters", d.params),
        ("gradients", d.grads),
        ("optimizer", d.optimizer),
        ("activations", d.activations),
        ("buffers", d.buffers),
        ("total", d.total),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"model:  {estimate.shape.describe()}",
        f"setup:  {describe_setup(estimate.setup)}",
        f"trainable parameters: {format_count(details.trainable_params)} of {format_count(details.total_params)}",
        f"per {estimate.setup.device} (most loaded{stage}):",
        *(f"  {name.ljust(width)}  {format_bytes(value):>12}" for name, value in rows),
        f"per host CPU RAM: {format_bytes(estimate.per_host_cpu)}"
        f" ({estimate.setup.gpus_per_node} process(es); init {format_bytes(details.init_bytes)}, "
        f"offloaded {format_bytes(details.offloaded_bytes)} each)",
    ]
    if estimate.fits is None:
        lines.append("fits: unknown (give --gpu_memory_gb / --cpu_memory_gb)")
    else:
        capacity = details.device_capacity
        usable = f" (usable {format_bytes(capacity)} per device)" if capacity is not None else ""
        lines.append(f"fits: {'yes' if estimate.fits else 'NO'}{usable}")
    lines.extend(f"note: {note}" for note in details.notes)
    return "\n".join(lines)
