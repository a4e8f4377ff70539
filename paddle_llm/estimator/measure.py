"""Check the estimator against reality: run a few real training steps on CPU and read the host allocator.

Paddle's host allocator counts every byte it hands out (``paddle.base.core.host_memory_stat_*_value("Allocated",
0)``), so on CPU the measured numbers are exact, with no CUDA context or cache in the way. Each case runs in its own
subprocess (``python -m paddle_llm.estimator.measure '<case json>'``) so that peaks never mix.

The training loop is PaddleNLP's in miniature: ``loss = model(input_ids, labels)``, ``loss.backward()``,
``optimizer.step()``, ``optimizer.clear_grad()`` (which keeps the gradients, zeroed, as PaddleNLP's Trainer does);
for LOMO, backward hooks update each parameter and free its gradient as soon as it is accumulated.

Two numbers are compared with the estimate:

* model states: allocated bytes after the last step minus before the model was built, against the estimate's
  ``between_steps_bytes``: parameters, gradients (not LOMO's) and optimizer states, plus persistent buffers (Llama's
  rotary caches);
* total: the peak over the steps minus the same baseline, against the estimate's device total.

A case with ``tensor_parallel_degree`` > 1 runs that many processes under ``paddle.distributed.launch`` (with the
CPU collectives of ``paddle_llm.parallel``) and reports rank 0's numbers.

Only this module imports Paddle; the estimator itself stays pure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from paddle_llm.config.presets import preset
from paddle_llm.estimator.memory import MemoryEstimate, estimate_training_memory, shape_of
from paddle_llm.models.registry import ModelSource, build_config, build_model, family_of

# Knobs of :class:`TrainingSetup` a measured case may set; the rest keep their defaults (fp32, one CPU process).
MEASURABLE_KNOBS = (
    "method", "lora_rank", "lora_target_modules", "num_prefix_tokens", "optimizer",
    "recompute", "recompute_granularity", "seq_length", "micro_batch_size", "tensor_parallel_degree", "sequence_parallel",
)


@dataclass(frozen=True)
class MeasureCase:
    """One configuration to train for a few steps.

    Attributes:
        name: a label for tables.
        model_config: PaddleNLP config fields including ``model_type`` (a preset dict works).
        knobs: :class:`TrainingSetup` fields among :data:`MEASURABLE_KNOBS`.
        steps: training steps; the peak is reached from the second step on, when states exist.
    """

    name: str
    model_config: dict
    knobs: dict = field(default_factory=dict)
    steps: int = 3

    def __post_init__(self):
        unknown = set(self.knobs) - set(MEASURABLE_KNOBS)
        if unknown:
            raise ValueError(f"cannot measure knobs {sorted(unknown)} on one CPU; measurable: {', '.join(MEASURABLE_KNOBS)}")

    def estimate(self) -> MemoryEstimate:
        processes = self.knobs.get("tensor_parallel_degree", 1)
        return estimate_training_memory(self.model_config, device="cpu", gpu_memory_gb=None, gpus_per_node=processes, **self.knobs)


@dataclass(frozen=True)
class Comparison:
    """Estimated and measured bytes for one case."""

    name: str
    estimated_states: int
    measured_states: int
    estimated_total: int
    measured_total: int

    @property
    def states_error(self) -> float:
        """Relative error of the model states, (estimated - measured) / measured."""
        return (self.estimated_states - self.measured_states) / self.measured_states

    @property
    def total_error(self) -> float:
        return (self.estimated_total - self.measured_total) / self.measured_total


# A ~48M-parameter Llama (hidden 512, 8 layers, grouped-query attention with 4 key/value heads, 24k vocabulary):
# big enough that the layers, not the embeddings or small buffers, dominate, small enough for a CPU.
LLAMA_48M = {
    "model_type": "llama", "vocab_size": 24000, "hidden_size": 512, "intermediate_size": 1408,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

_METHODS = {
    "full-adamw": {},
    "sgd": {"optimizer": "sgd"},
    "lora": {"method": "lora", "lora_rank": 8},
    "prefix": {"method": "prefix", "num_prefix_tokens": 16},
    "lomo": {"optimizer": "lomo"},
    "recompute-full": {"recompute": True, "recompute_granularity": "full"},
    "recompute-full_attn": {"recompute": True, "recompute_granularity": "full_attn"},
    "recompute-core_attn": {"recompute": True, "recompute_granularity": "core_attn"},
}


def standard_cases() -> list[MeasureCase]:
    """Every method on the tiny preset (sequence 128 x batch 2) and on the 48M Llama (sequence 256 x batch 2)."""
    models = (("tiny-llama", preset("tiny-llama"), 128), ("llama-48m", LLAMA_48M, 256))
    return [
        MeasureCase(f"{model_name}/{method}", config, {"seq_length": seq_length, "micro_batch_size": 2, **knobs})
        for model_name, config, seq_length in models
        for method, knobs in _METHODS.items()
    ]


def compare(case: MeasureCase, timeout_s: float = 900) -> Comparison:
    """Measure a case in a subprocess and pair it with its estimate.

    Raises:
        RuntimeError: the subprocess failed; the message carries its stderr tail.
    """
    measured = _run_subprocess(case, timeout_s)
    estimate = case.estimate()
    states = estimate.details.between_steps_bytes
    return Comparison(case.name, states, measured["states"], estimate.per_device.total, measured["peak"])


def _run_subprocess(case: MeasureCase, timeout_s: float) -> dict:
    payload = json.dumps(asdict(case))
    processes = case.knobs.get("tensor_parallel_degree", 1)
    if processes == 1:
        done = subprocess.run([sys.executable, "-m", "paddle_llm.estimator.measure", payload], capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {case.name!r} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as logs:
        launch = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(processes), "--log_dir", logs, os.path.abspath(__file__)]
        done = subprocess.run([sys.executable, *launch, payload], capture_output=True, text=True, timeout=timeout_s)
        with open(os.path.join(logs, "workerlog.0"), encoding="utf-8", errors="replace") as f:
            rank_zero = f.read()
    if done.returncode != 0:
        raise RuntimeError(f"measuring {case.name!r} failed:\n{rank_zero[-3000:]}")
    return json.loads(rank_zero.strip().splitlines()[-1])


def _build_model(case: MeasureCase):
    """The PaddleNLP model, wrapped for LoRA or prefix tuning, with recompute switched on if asked.

    Raises:
        ValueError: prefix tuning on a family other than Llama (only its past-key-value layout is wired here).
    """
    knobs = case.knobs
    fields = dict(case.model_config)
    source = ModelSource("measure", family_of(fields), fields, None, False)
    overrides = {}
    if knobs.get("recompute"):
        overrides = {"recompute": True, "recompute_granularity": knobs.get("recompute_granularity", "full")}
    if knobs.get("tensor_parallel_degree", 1) > 1:
        from paddle.distributed import fleet

        overrides |= {
            "tensor_parallel_degree": knobs["tensor_parallel_degree"],
            "tensor_parallel_rank": fleet.get_hybrid_communicate_group().get_model_parallel_rank(),
            "tensor_parallel_output": True,
            "sequence_parallel": bool(knobs.get("sequence_parallel")),
            "seq_length": knobs.get("seq_length", 2048),  # sequence parallel reshapes by it
        }
    config = build_config(source, **overrides)
    model = build_model(source, config, load_weights=False)
    if knobs.get("recompute"):
        model.recompute_enable()
    method = knobs.get("method", "full")
    if method == "lora":
        from paddlenlp.peft import LoRAConfig, LoRAModel

        rank = knobs.get("lora_rank", 8)
        # The same modules the estimate counts, as PaddleNLP full-match regexes.
        modules = shape_of(fields).lora_targets(tuple(knobs.get("lora_target_modules", ())))
        targets = [f".*{module.name}" for module in modules]
        model = LoRAModel(model, LoRAConfig(target_modules=targets, r=rank, lora_alpha=2 * rank))
        model.mark_only_lora_as_trainable()
    elif method == "prefix":
        if source.family.name != "llama":
            raise ValueError(f"prefix tuning is measured for llama models only, not {source.family.name}")
        from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM
        from paddlenlp.peft.prefix import llama_postprocess_past_key_value

        prefix_config = PrefixConfig(
            num_prefix_tokens=knobs.get("num_prefix_tokens", 128),
            num_attention_heads=config.num_attention_heads,
            multi_query_group_num=config.num_key_value_heads,
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
        )
        model = PrefixModelForCausalLM(model, prefix_config, llama_postprocess_past_key_value)
    model.train()
    return model


LEARNING_RATE = 1e-5


def _optimizer_step(knobs: dict, trainable: list):
    """AdamW or SGD; ``clear_grad()`` keeps the gradients allocated (zeroed), as PaddleNLP's Trainer does."""
    import paddle

    optimizer_class = {"adamw": paddle.optimizer.AdamW, "sgd": paddle.optimizer.SGD}[knobs.get("optimizer", "adamw")]
    optimizer = optimizer_class(learning_rate=LEARNING_RATE, parameters=trainable)

    def step() -> None:
        optimizer.step()
        optimizer.clear_grad()

    return step


def _lomo_step(trainable: list):
    """LOMO (Lv et al. 2023): each parameter takes its SGD update as soon as its gradient is accumulated, and the
    gradient is freed at once, so the backward pass never holds more than the gradients in flight."""
    import paddle

    def update_and_free(param):
        def hook() -> None:
            with paddle.no_grad():
                param.subtract_(param.grad * LEARNING_RATE)
            param.clear_gradient(False)

        return hook

    for param in trainable:
        param._register_backward_hook(update_and_free(param))
    return lambda: None


def _measure_in_this_process(case: MeasureCase) -> dict:
    """Train the case and return ``{"states": bytes, "peak": bytes}`` relative to the pre-model baseline."""
    import paddle
    from paddle.base import core

    def allocated() -> int:
        return core.host_memory_stat_current_value("Allocated", 0)

    paddle.set_device("cpu")
    knobs = case.knobs
    if knobs.get("tensor_parallel_degree", 1) > 1:
        from paddle.distributed import fleet

        from paddle_llm.parallel.cpu_collectives import install_cpu_collectives

        install_cpu_collectives("cpu")
        strategy = fleet.DistributedStrategy()
        strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": knobs["tensor_parallel_degree"], "pp_degree": 1}
        fleet.init(is_collective=True, strategy=strategy)
    paddle.seed(0)
    seq_length, batch = knobs.get("seq_length", 2048), knobs.get("micro_batch_size", 1)
    vocab = case.model_config.get("vocab_size") or case.model_config.get("padded_vocab_size")
    input_ids = paddle.randint(0, vocab, [batch, seq_length])
    baseline = allocated()
    core.host_memory_stat_reset_peak_value("Allocated", 0)

    model = _build_model(case)
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    step = _lomo_step(trainable) if knobs.get("optimizer") == "lomo" else _optimizer_step(knobs, trainable)
    for _ in range(case.steps):
        loss = model(input_ids=input_ids, labels=input_ids)[0]
        loss.backward()
        step()
        del loss
    peak = core.host_memory_stat_peak_value("Allocated", 0) - baseline
    return {"states": allocated() - baseline, "peak": peak}


if __name__ == "__main__":
    case = MeasureCase(**json.loads(sys.argv[1]))
    print(json.dumps(_measure_in_this_process(case)))
