"""Layout planner: every layout that fits the hardware, fastest first, with the flags to launch it.

Candidates vary what a user may change without changing the training itself: tensor-parallel degree ``t`` (a
divisor of the GPUs per node, so tensor parallelism stays on NVLink, that also divides the attention and key/value
heads), pipeline degree ``p`` (dividing the rest), sharding stage 0-3 over the remaining ``d`` ranks (stage2/3
not with ``p > 1``, as PaddleNLP requires), offload (stage2/3), and recompute granularity. Sequence parallelism is
switched on whenever ``t > 1`` and the family supports it: it removes replicated activations at no extra
communication (Korthikanti et al. 2022). Method, precision, sequence length, micro-batch and accumulation stay as
given. Layouts whose estimate does not fit (see :mod:`paddle_llm.estimator.memory`) are dropped.

Cost model, per device and step, without overlap of communication and compute (pessimistic, but it ranks layouts
the way practice does: data parallel over sharding over tensor parallel within a node over pipeline, no offload
and no recompute when memory allows):

* compute: ``flops_per_token * s*b*m / (t*p) / (peak * mfu)``, with ``flops_per_token = 2N + 4*L*h*s`` forward
  (Kaplan et al. 2020; the attention term as in nanoGPT's ``estimate_mfu``) and twice that backward, or once when
  the base weights are frozen (LoRA, prefix: no weight gradients); recompute adds the recomputed share of the
  forward pass. A 1F1B pipeline idles ``(p-1)/(m*v)`` of the time (Narayanan et al. 2021).
* tensor parallel: 4 all-reduces of ``s*b*h`` activations per layer and micro-batch (2 forward, 2 backward;
  Shoeybi et al. 2019), 2 more with full recompute and 1 with ``full_attn``; a ring all-reduce moves
  ``2*(t-1)/t`` of the buffer per device.
* data parallel / sharding: gradients all-reduced (or reduce-scattered and parameters all-gathered, the same bytes
  for stage1/2) once per step, ``2*(d-1)/d`` of the trainable gradients; stage3 also all-gathers every parameter in
  the forward and backward pass of every micro-batch (``2*(d-1)/d`` of the weights, times ``m``).
* pipeline: each micro-batch sends one activation and receives one gradient of ``s*b*h`` per (virtual) stage.
* offload: the gradient shard goes to the host and the updated weights come back over PCIe, and the host's
  optimizer updates the shard.

A group is intra-node when it fits in a node given PaddleNLP's rank order (tensor parallel innermost, then
sharding, then pipeline, then data parallel). Bandwidths and speeds are :class:`CostModel`'s, A100-class defaults.
Layouts are ranked by tokens per second over the whole cluster, since data parallelism changes the tokens per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from paddle_llm.estimator.flags import default_script, flags_for_setup
from paddle_llm.estimator.memory import MemoryEstimate, TrainingSetup, estimate, format_bytes, format_estimate
from paddle_llm.estimator.shapes import ModelShape

RECOMPUTE_CHOICES: tuple[str | None, ...] = (None, "core_attn", "full_attn", "full")


@dataclass(frozen=True)
class CostModel:
    """Hardware speeds the planner ranks layouts with (defaults: A100 80GB nodes, 100 Gb/s per GPU between nodes).

    Attributes:
        peak_tflops_16bit, peak_tflops_fp32: dense peak per GPU.
        mfu: the fraction of peak a well-tuned step achieves.
        intra_node_gb_per_s: all-reduce bus bandwidth per GPU inside a node (NVLink).
        inter_node_gb_per_s: per GPU between nodes.
        host_link_gb_per_s: device-host copies (PCIe 4.0 x16).
        host_optimizer_params_per_s: parameters a host process updates per second when offloading.
    """

    peak_tflops_16bit: float = 312.0
    peak_tflops_fp32: float = 19.5
    mfu: float = 0.4
    intra_node_gb_per_s: float = 150.0
    inter_node_gb_per_s: float = 12.5
    host_link_gb_per_s: float = 16.0
    host_optimizer_params_per_s: float = 1e9


@dataclass(frozen=True)
class LayoutCost:
    """Estimated time of one step on one device.

    Attributes:
        compute_s: matmul time including recompute and pipeline bubble.
        communication_bytes: bytes each device sends per step (tensor, data and pipeline parallel).
        communication_s: their time at the bandwidth of the link each group uses.
        offload_s: host copies and host optimizer.
        tokens_per_step: tokens the whole cluster trains per step.
    """

    compute_s: float
    communication_bytes: float
    communication_s: float
    offload_s: float
    tokens_per_step: int

    @property
    def step_s(self) -> float:
        return self.compute_s + self.communication_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


@dataclass(frozen=True)
class Plan:
    """A layout that fits, its estimate, its cost and the command to launch it."""

    setup: TrainingSetup
    estimate: MemoryEstimate
    cost: LayoutCost
    command: str


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_setups(shape: ModelShape, base: TrainingSetup) -> list[TrainingSetup]:
    """Every layout of ``base``'s hardware the planner considers (see the module docstring)."""
    candidates = []
    world = base.world_size
    for t in _divisors(base.gpus_per_node):
        if shape.num_attention_heads % t or shape.num_key_value_heads % t or (t > 1 and base.weight_quantize_algo):
            continue  # a quantized (QLoRA) base is not split over tensor-parallel ranks
        for p in _divisors(world // t):
            if p > shape.num_layers or (p > 1 and base.method == "prefix"):
                continue
            d = world // (t * p)
            stages = [0] + ([1, 2, 3] if d > 1 else [])
            for stage in stages:
                if p > 1 and stage in (2, 3):
                    continue
                for offload in (False, True) if stage in (2, 3) else (False,):
                    for granularity in RECOMPUTE_CHOICES:
                        if granularity == "core_attn" and base.use_flash_attention:
                            continue  # flash attention keeps no s*s tensors to drop
                        candidates.append(
                            replace(
                                base,
                                tensor_parallel_degree=t,
                                pipeline_parallel_degree=p,
                                virtual_pp_degree=base.virtual_pp_degree if p > 1 else 1,
                                sharding_stage=stage,
                                sharding_parallel_degree=None,
                                sharding_offload=offload,
                                sequence_parallel=t > 1 and shape.supports_sequence_parallel,
                                recompute=granularity is not None,
                                recompute_granularity=granularity or base.recompute_granularity,
                            )
                        )
    return candidates


def _forward_flops_per_token(shape: ModelShape, seq_length: int) -> float:
    return 2 * shape.num_params + 4 * shape.num_layers * shape.hidden_size * seq_length


def _recomputed_flops_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    if not setup.recompute:
        return 0.0
    attention_core = 4 * shape.num_layers * shape.hidden_size * setup.seq_length
    if setup.recompute_granularity == "core_attn":
        return attention_core
    if setup.recompute_granularity == "full_attn":
        attention_params = sum(m.params for m in shape.linear_modules if not m.in_mlp)
        return 2 * shape.num_layers * attention_params + attention_core
    return _forward_flops_per_token(shape, setup.seq_length)


def layout_cost(shape: ModelShape, setup: TrainingSetup, estimate_: MemoryEstimate, model: CostModel) -> LayoutCost:
    """Time one step of a layout under the cost model (see the module docstring)."""
    t, p, v = setup.tensor_parallel_degree, setup.pipeline_parallel_degree, setup.virtual_pp_degree
    d = setup.data_parallel_ranks
    m = setup.gradient_accumulation_steps
    g = setup.gpus_per_node
    tokens_per_microbatch = setup.seq_length * setup.micro_batch_size
    activation_bytes = 2 if setup.mixed_precision else 4

    forward = _forward_flops_per_token(shape, setup.seq_length)
    backward = forward * (2 if setup.method == "full" else 1)
    flops = (forward + backward + _recomputed_flops_per_token(shape, setup)) * tokens_per_microbatch * m / (t * p)
    peak = model.peak_tflops_16bit if setup.mixed_precision else model.peak_tflops_fp32
    bubble = (p - 1) / (m * v)
    compute_s = flops / (peak * 1e12 * model.mfu) * (1 + bubble)

    intra, inter = model.intra_node_gb_per_s * 1e9, model.inter_node_gb_per_s * 1e9
    sharding = setup.sharding_degree
    links = []  # (bytes, bandwidth)
    if t > 1:
        extra = {"full": 2, "full_attn": 1}.get(setup.recompute_mode or "", 0)
        all_reduces = m * shape.num_layers / p * (4 + extra)
        size = tokens_per_microbatch * shape.hidden_size * activation_bytes
        links.append((all_reduces * 2 * (t - 1) / t * size, intra if t <= g else inter))
    # PaddleNLP orders ranks tensor parallel innermost, then sharding, then pipeline, then data parallel: a group
    # stays in a node when the ranks it spans do.
    sharding_only = setup.sharding_stage and sharding == d
    if d > 1:
        grad_bytes = 4 if (not setup.weights_in_16bit or setup.amp_master_grad) else 2
        param_bytes = 2 if setup.weights_in_16bit else 4
        data_bytes = 2 * (d - 1) / d * estimate_.details.trainable_on_device * grad_bytes
        if setup.sharding_stage == 3:
            data_bytes += m * 2 * (d - 1) / d * estimate_.details.params_on_device * param_bytes
        span = t * sharding if sharding_only else setup.world_size
        links.append((data_bytes, intra if span <= g else inter))
    if p > 1:
        pipeline_bytes = m * v * 2 * tokens_per_microbatch * shape.hidden_size * activation_bytes
        links.append((pipeline_bytes, intra if t * sharding * p <= g else inter))
    communication_bytes = sum(b for b, _ in links)
    communication_s = sum(b / bw for b, bw in links)

    offload_s = 0.0
    if setup.sharding_offload:
        shard = estimate_.details.trainable_on_device / sharding
        moved = shard * (4 + (2 if setup.weights_in_16bit else 4))
        offload_s = moved / (model.host_link_gb_per_s * 1e9) + shard / model.host_optimizer_params_per_s
    return LayoutCost(compute_s, communication_bytes, communication_s, offload_s, tokens_per_microbatch * m * d)


def launch_command(setup: TrainingSetup, model_name_or_path: str, script: str) -> str:
    """``python -u -m paddle.distributed.launch --gpus ... <script> --model_name_or_path ... <flags>``.

    Multi-node runs need the master's address, left as ``MASTER_IP:PORT`` to fill in; run the same command on every
    node.
    """
    gpus = ",".join(str(i) for i in range(setup.gpus_per_node))
    nodes = f" --nnodes {setup.num_nodes} --master MASTER_IP:PORT" if setup.num_nodes > 1 else ""
    flags = " ".join(flags_for_setup(setup, script))
    return (
        f'python -u -m paddle.distributed.launch --gpus "{gpus}"{nodes} {script} '
        f"--model_name_or_path {model_name_or_path} {flags}"
    )


def plan_layouts(
    shape: ModelShape,
    base: TrainingSetup,
    model_name_or_path: str,
    script: str | None = None,
    cost_model: CostModel = CostModel(),
) -> list[Plan]:
    """The layouts that fit, fastest first (ties: fewer communication bytes).

    Args:
        shape: the model.
        base: method, precision, batch and hardware; its layout fields are what the planner varies.
        model_name_or_path: written into the commands.
        script: ``run_pretrain.py`` or ``finetune_generation.py``; by default the one the method implies.
        cost_model: hardware speeds.

    Returns:
        Plans in ranking order; empty when nothing fits.
    """
    script = script or default_script(base)
    plans = []
    for setup in candidate_setups(shape, base):
        result = estimate(shape, setup)
        if result.fits is False:
            continue
        cost = layout_cost(shape, setup, result, cost_model)
        plans.append(Plan(setup, result, cost, launch_command(setup, model_name_or_path, script)))
    plans.sort(key=lambda plan: (-plan.cost.tokens_per_s, plan.cost.communication_bytes))
    return plans


def describe_layout(setup: TrainingSetup) -> str:
    """Short layout label: ``tp2 pp1 stage2x4 offload sp recompute=full_attn``."""
    parts = [f"tp{setup.tensor_parallel_degree}", f"pp{setup.pipeline_parallel_degree}"]
    if setup.virtual_pp_degree > 1:
        parts.append(f"vpp{setup.virtual_pp_degree}")
    d = setup.data_parallel_ranks
    if setup.sharding_stage:
        parts.append(f"sharding-stage{setup.sharding_stage}x{setup.sharding_degree}")
        if setup.sharding_offload:
            parts.append("offload")
    elif d > 1:
        parts.append(f"dp{d}")
    if setup.sequence_parallel:
        parts.append("sp")
    parts.append(f"recompute={setup.recompute_granularity if setup.recompute else 'off'}")
    return " ".join(parts)


def startup_report(shape: ModelShape, setup: TrainingSetup, model_name_or_path: str, script: str | None = None) -> str:
    """What a training run prints before its first step: the estimate and, when it does not fit, a warning that
    names the planner's fastest layout that does (or says none does).

    Args:
        shape: the model (``memory.shape_of(config_fields)``).
        setup: the run's knobs (``flags.setup_from_flags(vars(args))`` with the real devices and their memory).
        model_name_or_path: written into the suggested command.
        script: the entry script for the suggestion; by default the one the method implies.
    """
    result = estimate(shape, setup)
    report = format_estimate(result)
    if result.fits is not False:
        return report
    plans = plan_layouts(shape, setup, model_name_or_path, script)
    if not plans:
        return f"{report}\nWARNING: this run will likely run out of memory, and no layout of this hardware fits."
    best = plans[0]
    return (
        f"{report}\nWARNING: this run will likely run out of memory. The planner's fastest layout that fits is "
        f"{describe_layout(best.setup)} ({format_bytes(best.estimate.per_device.total)} per device):\n  {best.command}"
    )
