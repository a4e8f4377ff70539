"""``paddle-llm estimate``: will it fit, and what should I run? Answered before anyone rents GPUs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from paddle_llm.config.validation import WEIGHT_QUANTIZE_ALGOS
from paddle_llm.estimator import deepspeed_compat
from paddle_llm.estimator.flags import SCRIPTS, setup_from_flags
from paddle_llm.estimator.memory import (
    AMP_LEVELS,
    DEVICES,
    OPTIMIZERS,
    RECOMPUTE_GRANULARITIES,
    MemoryEstimate,
    estimate,
    format_bytes,
    format_estimate,
    shape_of,
)
from paddle_llm.estimator.planner import Plan, describe_layout, plan_layouts
from paddle_llm.estimator.shapes import ModelShape, parse_count, shape_from_num_params
from paddle_llm.models.registry import resolve_model

DESCRIPTION = """\
Estimate training memory per GPU and per host, say whether it fits, and (with --plan) list the layouts that fit,
fastest first, with the command to launch each.

Counted per device: parameters, gradients, optimizer states (AdamW 8 bytes per trainable parameter, plus 4 for
fp32 master weights under O2), activations (what autograd keeps: Korthikanti et al. 2022 for generic GPT shapes,
PaddleNLP's own kernels for llama/chatglm/chatglm2, measured on CPU), and buffers (rotary caches, the logits, a
recomputed layer, AMP O1 weight casts, the ZeRO-3 gather buffer). Sharding, tensor, pipeline and sequence
parallelism, recompute, flash attention, LoRA, prefix tuning and LOMO change each of them.
"""

EPILOG = """\
examples:
  # does a LoRA fine-tune of a local Llama-2-7B fit one 24 GB GPU?
  paddle-llm estimate --model_name_or_path ./llama-2-7b --lora --lora_rank 8 --bf16 --fp16_opt_level O2 \\
      --max_seq_length 2048 --num_gpus 1 --gpu_memory_gb 24 --plan

  # a bare parameter count with shape hints, on 2 nodes of 8 x 80 GB, ZeRO-3 with offload
  paddle-llm estimate --num_params 13B --hidden_size 5120 --num_layers 40 --bf16 --fp16_opt_level O2 \\
      --sharding "stage3 offload" --num_gpus 8 --num_nodes 2

  # DeepSpeed's own estimator, reproduced (model states only)
  paddle-llm estimate --num_params 2851598336 --largest_layer_params 32899072 --num_gpus 8 --model_states_only

notes:
  GB means GiB (2**30 bytes) throughout, as GPU vendors and DeepSpeed use it. "fits" keeps 10% of the device free for
  the CUDA context, fragmentation and NCCL buffers. Gradients are counted as living between steps, as PaddleNLP's
  Trainer keeps them (clear_grad zeroes them in place). --num_gpus is the number of GPUs per node.
"""


def _positive_int(text: str) -> int:
    """A count or size flag: a memory estimate for 0 GPUs or a negative width is a number with no meaning."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0/true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paddle-llm estimate",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def flag(group, *names, help):
        # PaddleNLP booleans: a bare flag means true, and 1/0/true/false are accepted.
        group.add_argument(*names, type=_boolean, nargs="?", const=True, default=False, help=help)

    model = parser.add_argument_group("model (one of --model_name_or_path or --num_params)")
    model.add_argument("--model_name_or_path", help="a built-in preset (tiny-llama...) or a local dir with config.json")
    model.add_argument("--num_params", help="a parameter count instead of a model: 7e9, 7B, 2851M, 2851598336")
    model.add_argument("--hidden_size", type=_positive_int, help="shape hint for --num_params (else guessed as 128 x layers)")
    model.add_argument("--num_layers", type=_positive_int, help="shape hint for --num_params")
    model.add_argument("--num_attention_heads", type=_positive_int, help="shape hint for --num_params (else hidden / 128)")
    model.add_argument("--vocab_size", type=_positive_int, help="shape hint for --num_params (else 32000)")
    model.add_argument("--largest_layer_params", help="parameters of the largest module (ZeRO-3 gathers one at a time)")

    method = parser.add_argument_group("method")
    flag(method, "--lora", help="LoRA: train low-rank adapters, freeze the model")
    method.add_argument("--lora_rank", "--r", dest="lora_rank", type=_positive_int, default=8, help="LoRA rank r (default 8)")
    method.add_argument(
        "--lora_target_modules", help="comma-separated module names or PaddleNLP regexes (default: every linear layer)"
    )
    method.add_argument("--weight_quantize_algo", choices=WEIGHT_QUANTIZE_ALGOS,
                        help="QLoRA (with --lora): store the frozen LoRA-targeted weights quantized")
    method.add_argument("--qlora_weight_blocksize", "--weight_blocksize", dest="qlora_weight_blocksize", type=_positive_int,
                        default=64, help="nf4/fp4: weights per absmax block (default 64)")
    flag(method, "--qlora_weight_double_quant", "--weight_double_quant", help="nf4/fp4: 8-bit block scales")
    method.add_argument("--qlora_weight_double_quant_block_size", "--weight_double_quant_block_size", type=_positive_int,
                        dest="qlora_weight_double_quant_block_size", default=256,
                        help="scales per double-quantization block (default 256)")
    flag(method, "--prefix_tuning", help="prefix tuning: train virtual key/value tokens per layer")
    method.add_argument("--num_prefix_tokens", type=_positive_int, default=128, help="prefix tokens (default 128)")
    method.add_argument("--optim", choices=OPTIMIZERS, default="adamw", help="adamw (8 B/param of state), sgd (none), "
                        "lomo (none, and only one gradient tensor at a time)")

    precision = parser.add_argument_group("precision (fp32 unless --fp16/--bf16)")
    flag(precision, "--fp16", help="fp16 mixed precision")
    flag(precision, "--bf16", help="bf16 mixed precision")
    precision.add_argument("--fp16_opt_level", choices=AMP_LEVELS, default="O1",
                           help="O1: fp32 weights cast per op; O2: 16-bit weights with fp32 master weights")
    flag(precision, "--amp_master_grad", help="keep fp32 gradients under O2")

    layout = parser.add_argument_group("layout")
    layout.add_argument("--sharding", default="", help='ZeRO-style sharding: "stage1", "stage2", "stage3", "stage2 offload"')
    layout.add_argument("--sharding_parallel_degree", "--sharding_degree", dest="sharding_parallel_degree", type=_positive_int,
                        default=-1, help="ranks to shard over (default: every data-parallel rank; 1 turns sharding off)")
    layout.add_argument("--tensor_parallel_degree", type=_positive_int, default=1, help="tensor (model) parallel degree")
    layout.add_argument("--pipeline_parallel_degree", type=_positive_int, default=1, help="pipeline stages (1F1B schedule)")
    layout.add_argument("--virtual_pp_degree", type=_positive_int, default=1, help="interleaved virtual stages per device")
    flag(layout, "--sequence_parallel", help="split norm/dropout activations along the sequence (needs tp > 1)")

    memory = parser.add_argument_group("activation memory")
    flag(memory, "--recompute", help="recompute activations in the backward pass")
    memory.add_argument("--recompute_granularity", choices=RECOMPUTE_GRANULARITIES, default="full",
                        help="full: keep each layer's input; full_attn: recompute attention; core_attn: only softmax")
    flag(memory, "--use_flash_attention", help="flash attention: no seq x seq tensors")

    batch = parser.add_argument_group("batch")
    batch.add_argument("--max_seq_length", "--max_length", dest="max_seq_length", type=_positive_int, default=2048,
                       help="tokens per sequence (default 2048)")
    batch.add_argument("--per_device_train_batch_size", type=_positive_int, default=1, help="micro-batch size (default 1)")
    batch.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                       help="micro-batches per step (pipeline micro-batches too)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--num_gpus", type=_positive_int, default=1, help="GPUs per node (default 1)")
    hardware.add_argument("--num_nodes", type=_positive_int, default=1, help="nodes (default 1)")
    hardware.add_argument("--gpu_memory_gb", type=_positive_float, default=80.0, help="memory per GPU in GiB (default 80)")
    hardware.add_argument("--cpu_memory_gb", type=_positive_float, help="host RAM per node in GiB (checked when given)")
    hardware.add_argument("--device", choices=DEVICES, default="gpu", help="cpu: train on the host itself")

    output = parser.add_argument_group("output")
    flag(output, "--json", help="print one JSON object (all sizes in bytes)")
    flag(output, "--plan", help="list the layouts that fit, fastest first, with the command to paste")
    output.add_argument("--plan_limit", type=_positive_int, default=10, help="layouts to show with --plan (default 10)")
    output.add_argument("--script", choices=SCRIPTS, help="entry script for --plan commands (default: by method)")
    flag(output, "--model_states_only", help="DeepSpeed compatibility: its ZeRO-2/ZeRO-3 model-states tables")
    output.add_argument("--zero_stage", type=_positive_int, choices=(2, 3), help="with --model_states_only: one table only")
    output.add_argument("--additional_buffer_factor", type=float, default=1.5,
                        help="with --model_states_only: DeepSpeed's safety factor (default 1.5)")
    return parser


def _shape(args: argparse.Namespace) -> tuple[ModelShape, str]:
    """The model's shape and the name to write into commands."""
    if bool(args.model_name_or_path) == bool(args.num_params):
        raise ValueError("pass exactly one of --model_name_or_path (a preset or a local dir) and --num_params")
    largest = parse_count(args.largest_layer_params) if args.largest_layer_params else None
    if args.num_params:
        num_params = parse_count(args.num_params)
        if num_params <= 0:
            raise ValueError(f"--num_params {args.num_params}: a model has at least one parameter")
        shape = shape_from_num_params(
            num_params,
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            vocab_size=args.vocab_size,
            largest_layer_params=largest,
        )
        return shape, "<your model dir>"
    source = resolve_model(args.model_name_or_path, estimating=True)
    if source.family.estimate_only is not None:
        print(f"note: {source.family.estimate_only(source.config_fields)}", file=sys.stderr if args.json else sys.stdout)
    shape = shape_of(source.config_fields)
    if largest is not None:
        shape = replace(shape, declared_largest_layer_params=largest)
    return shape, args.model_name_or_path


def _model_states_only(args: argparse.Namespace, shape: ModelShape) -> str:
    total, largest = shape.num_params, shape.largest_layer_params
    gpus, nodes, factor = args.num_gpus, args.num_nodes, args.additional_buffer_factor
    tables = []
    if args.zero_stage in (None, 2):
        tables.append((deepspeed_compat.zero2_table(total, gpus, nodes, factor), None))
    if args.zero_stage in (None, 3):
        tables.append((deepspeed_compat.zero3_table(total, largest, gpus, nodes, factor), largest))
    if args.json:
        rows = [
            {"zero_stage": r.zero_stage, "options": r.options.replace(" ,", ",").strip(), "per_cpu": r.per_cpu_bytes,
             "per_gpu": r.per_gpu_bytes}
            for table, _ in tables for r in table
        ]
        return json.dumps({"total_params": total, "largest_layer_params": largest, "rows": rows}, indent=2)
    return "\n\n".join(
        deepspeed_compat.format_table(table, total, header_largest, gpus, nodes) for table, header_largest in tables
    )


def _plan_json(plan: Plan) -> dict:
    return {
        "layout": describe_layout(plan.setup),
        "per_device_total": plan.estimate.per_device.total,
        "per_host_cpu": plan.estimate.per_host_cpu,
        "tokens_per_s": plan.cost.tokens_per_s,
        "step_s": plan.cost.step_s,
        "communication_bytes_per_step": plan.cost.communication_bytes,
        "command": plan.command,
    }


def _format_plans(plans: list[Plan], limit: int, result: MemoryEstimate) -> str:
    if not plans:
        return (
            "\nplan: no layout fits this hardware. Try --lora, --optim lomo, a shorter --max_seq_length, a smaller "
            "--per_device_train_batch_size, --bf16 --fp16_opt_level O2, or more --num_gpus/--num_nodes."
        )
    lines = [
        f"\nplan: {len(plans)} layout(s) fit on {result.setup.num_nodes} x {result.setup.gpus_per_node} GPU(s); "
        f"fastest first (cost model: compute + communication + offload time per step, see "
        f"paddle_llm/estimator/planner.py). Showing {min(limit, len(plans))}.",
    ]
    for rank, plan in enumerate(plans[:limit], 1):
        cost = plan.cost
        lines.append(
            f"\n{rank}. {describe_layout(plan.setup)}\n"
            f"   per GPU {format_bytes(plan.estimate.per_device.total)}, ~{cost.tokens_per_s:,.0f} tokens/s, "
            f"{format_bytes(cost.communication_bytes)} sent per GPU per step"
            f"{', offload ' + f'{cost.offload_s:.2f}s/step' if cost.offload_s else ''}\n"
            f"   {plan.command}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run ``paddle-llm estimate``; returns the exit code (2 for bad flags or models)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shape, model_name = _shape(args)
        if args.model_states_only:
            print(_model_states_only(args, shape))
            return 0
        setup = setup_from_flags(vars(args))
        result = estimate(shape, setup)
        plans = plan_layouts(shape, setup, model_name, args.script) if args.plan else None
    except (ValueError, FileNotFoundError) as err:
        print(f"paddle-llm estimate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        payload = result.to_json_dict()
        if plans is not None:
            payload["plans"] = [_plan_json(p) for p in plans[: args.plan_limit]]
        print(json.dumps(payload, indent=2))
        return 0
    print(format_estimate(result))
    if plans is not None:
        print(_format_plans(plans, args.plan_limit, result))
    return 0
