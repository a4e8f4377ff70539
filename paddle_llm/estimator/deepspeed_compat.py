"""DeepSpeed's model-states estimators, reproduced to the byte, for comparing with numbers people quote.

DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (``deepspeed/runtime/zero/stage_1_and_2.py``) and
``estimate_zero3_model_states_mem_needs`` (``deepspeed/runtime/zero/stage3.py``) count parameters, gradients and
optimizer states only, for mixed-precision Adam (16 bytes per parameter), scaled by ``additional_buffer_factor``.
With ``P`` total parameters, ``L`` parameters of the largest layer, ``g`` GPUs per node, ``n`` nodes, ``N = g*n``,
``f`` the buffer factor, DeepSpeed computes (``int()`` truncates, as in its source)::

    ZeRO-2, offload_optimizer=cpu    gpu = 2*P                        cpu = P * max(4*N, 16) * f
    ZeRO-2, offload_optimizer=none   gpu = 4*P + int(16*P / N)        cpu = P * 4 * g * f

    ZeRO-3 (largest layer memory M = 4*L)
      offload_param=cpu,  offload_optimizer=cpu    gpu = M
          zero_init=1  cpu = P * 18 / n * f        zero_init=0  cpu = P * max(4*g, 18/n) * f
      offload_param=none, offload_optimizer=cpu    gpu = M + int(2*P / N)
          zero_init=1  cpu = P * 16 / n * f        zero_init=0  cpu = P * max(4*g, 16/n) * f
      offload_param=none, offload_optimizer=none   gpu = M + int(18*P / N)
          zero_init=1  cpu = L * 4 * g * f         zero_init=0  cpu = P * 4 * g * f

and prints each row as ``{cpu/2**30:7.2f}GB | {gpu/2**30:6.2f}GB | options``, with the counts in the header
truncated to millions (``int(P/1e6)``). That truncation is why the seed's "2851M total params, 32M largest layer"
example reproduces only from t5-3b's exact counts, 2851598336 and 32899072 (its shared 32128 x 1024 embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 2**30  # DeepSpeed's "GB"


@dataclass(frozen=True)
class DeepSpeedRow:
    """One line of DeepSpeed's table."""

    zero_stage: int
    options: str
    per_cpu_bytes: int
    per_gpu_bytes: int

    def format(self) -> str:
        return f" {self.per_cpu_bytes / GB:7.2f}GB | {self.per_gpu_bytes / GB:6.2f}GB | {self.options}"


def zero2_model_states(
    total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1, cpu_offload: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int]:
    """``(cpu_bytes, gpu_bytes)`` exactly as DeepSpeed's ``estimate_zero2_model_states_mem_needs``."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 4 * total_params + int(16 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def zero3_model_states(
    total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
    cpu_offload: bool = True, cpu_offload_params: bool = True, zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int]:
    """``(cpu_bytes, gpu_bytes)`` exactly as DeepSpeed's ``estimate_zero3_model_states_mem_needs``."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        optimizer_bytes = 18 if cpu_offload_params else 16
        gpu_mem = largest_layer_memory + (0 if cpu_offload_params else int(2 * total_params / total_gpus))
        if zero_init:
            cpu_mem = total_params * optimizer_bytes * gpus_factor * additional_buffer_factor
        else:
            cpu_mem = total_params * max(4 * num_gpus_per_node, optimizer_bytes * gpus_factor) * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        params_on_cpu = largest_layer_params if zero_init else total_params
        cpu_mem = params_on_cpu * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def zero2_table(
    total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> list[DeepSpeedRow]:
    """DeepSpeed's ZeRO-2 rows, in its order: optimizer offload first."""
    rows = []
    for cpu_offload in (True, False):
        cpu, gpu = zero2_model_states(total_params, num_gpus_per_node, num_nodes, cpu_offload, additional_buffer_factor)
        rows.append(DeepSpeedRow(2, f"offload_optimizer={'cpu ' if cpu_offload else 'none'}", cpu, gpu))
    return rows


def zero3_table(
    total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> list[DeepSpeedRow]:
    """DeepSpeed's six ZeRO-3 rows, in its order."""
    rows = []
    for cpu_offload in (True, False):
        for cpu_offload_params in (True, False):
            if cpu_offload_params and not cpu_offload:
                continue  # DeepSpeed cannot offload parameters while keeping the optimizer on the GPU
            for zero_init in (True, False):
                cpu, gpu = zero3_model_states(
                    total_params, largest_layer_params, num_gpus_per_node, num_nodes,
                    cpu_offload, cpu_offload_params, zero_init, additional_buffer_factor,
                )
                options = (
                    f"offload_param={'cpu ' if cpu_offload_params else 'none'}, "
                    f"offload_optimizer={'cpu ' if cpu_offload else 'none'}, zero_init={int(zero_init)}"
                )
                rows.append(DeepSpeedRow(3, options, cpu, gpu))
    return rows


def format_table(
    rows: list[DeepSpeedRow], total_params: int, largest_layer_params: int | None, num_gpus_per_node: int, num_nodes: int
) -> str:
    """DeepSpeed's printout: header, hardware, model and one line per row."""
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    largest = f", {int(largest_layer_params / 1e6)}M largest layer params" if largest_layer_params is not None else ""
    lines = [
        "Estimated memory needed for params, optim states and gradients for a:",
        f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.",
        f"SW: Model with {int(total_params / 1e6)}M total params{largest}.",
        "  per CPU  |  per GPU |   Options",
        *(row.format() for row in rows),
    ]
    return "\n".join(lines)
