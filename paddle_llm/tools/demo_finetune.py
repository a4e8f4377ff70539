"""The demo's fine-tuning stage: LoRA-tune the demo's pretrained tiny Llama on the shipped instruction task.

The task (``paddle_llm/assets/instructions``, written by ``scripts/make_instruction_data.py``) is reading
comprehension in the demo corpus's story world: "At noon, Kai went to the harbor with a goat. There Kai found a map
and felt brave. Where did Kai go?" -> "the harbor". The 50 dev stories never appear in training, so the model has to
read each story to answer. Accuracy is exact match of greedy replies on the same held-out prompts before and after
fine-tuning, run with the flags ``finetune_generation.py`` takes (``--lora True --eval_with_do_generation``).

Measured on 2 CPU cores: 0% before, 100% after 600 LoRA steps (about 20 s). The learning rate is 0.003: at 0.01 the
result swung between 46% and 100% with the last bits of the floating-point rounding (thread count, CPU model, kernel
choice), while 0.003 and 0.005 gave 100% on five differently-rounded pretrained models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from paddle_llm import ASSETS_DIR
from paddle_llm.recipes import finetune

INSTRUCTIONS_DIR = os.path.join(ASSETS_DIR, "instructions")
ACCURACY_TARGET = 0.9
SHOWN_EXAMPLES = 4


def _exact_match(output_dir: str) -> tuple[float, list[dict]]:
    from paddle_llm.trainer.finetune_trainer import GENERATIONS_FILE

    with open(os.path.join(output_dir, "eval_results.json"), encoding="utf-8") as f:
        accuracy = json.load(f)["eval_exact_match"]
    with open(os.path.join(output_dir, GENERATIONS_FILE), encoding="utf-8") as f:
        predictions = [json.loads(line) for line in f]
    return accuracy, predictions


def _flags(model_dir: str, output_dir: str, show_progress: bool) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--dataset_name_or_path", INSTRUCTIONS_DIR, "--output_dir", output_dir,
        "--overwrite_output_dir", "--device", "cpu", "--eval_with_do_generation",
        "--src_length", "96", "--tgt_length", "8", "--per_device_eval_batch_size", "25",
        "--disable_tqdm", str(not show_progress), "--report_to", "none", "--seed", "42", "--do_eval",
    ]


def run_finetune_demo(model_dir: str, output_dir: str, max_steps: int = 400, show_progress: bool = False) -> dict:
    """Measure held-out exact match, LoRA-tune ``model_dir`` on the instruction task, measure again.

    Args:
        model_dir: a trained model directory with its tokenizer (``paddle-llm demo`` writes ``OUTPUT/pretrain``).
        output_dir: where the adapter, metrics and predictions go (``before/`` and ``lora/`` inside).
        max_steps: LoRA training steps.

    Returns:
        ``accuracy_before``, ``accuracy_after``, ``target``, a few ``examples`` (prompt number, reference,
        prediction), ``seconds`` and ``adapter_dir``.

    Raises:
        SystemExit: a fine-tuning run failed (its error is already printed).
    """
    started = time.perf_counter()
    before_dir = os.path.join(output_dir, "before")
    code = finetune.RECIPE.main(_flags(model_dir, before_dir, show_progress))
    if code:
        raise SystemExit(code)
    accuracy_before, _ = _exact_match(before_dir)

    adapter_dir = os.path.join(output_dir, "lora")
    training = [
        "--do_train", "--lora", "True", "--r", "8", "--learning_rate", "0.003", "--lr_scheduler_type", "linear",
        "--warmup_steps", "20", "--max_steps", str(max_steps), "--per_device_train_batch_size", "16",
        "--logging_steps", "50", "--save_steps", str(max_steps), "--eval_steps", str(max_steps), "--weight_decay", "0.0",
    ]
    code = finetune.RECIPE.main(_flags(model_dir, adapter_dir, show_progress) + training)
    if code:
        raise SystemExit(code)
    accuracy_after, predictions = _exact_match(adapter_dir)
    return {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "target": ACCURACY_TARGET,
        "examples": [{"reference": p["reference"], "prediction": p["prediction"]} for p in predictions[:SHOWN_EXAMPLES]],
        "seconds": round(time.perf_counter() - started, 1),
        "adapter_dir": adapter_dir,
    }


def print_report(result: dict) -> bool:
    """Print the before/after lines; return whether the target was met."""
    print(f"held-out exact match before LoRA: {result['accuracy_before']:.0%}")
    print(f"held-out exact match after LoRA:  {result['accuracy_after']:.0%}   (target >= {result['target']:.0%})")
    for example in result["examples"]:
        print(f"  expected {example['reference']!r:<16} got {example['prediction']!r}")
    print(f"fine-tuning time:                 {result['seconds']} s; adapter saved in {result['adapter_dir']}")
    return result["accuracy_after"] >= result["target"]


def stage_main(argv: list[str] | None, prog: str, description: str, stage: str, title: str, run, report, max_steps: int) -> int:
    """The command line of one demo stage on the pretrained demo model: run it, print its report, exit 1 below target.

    Args:
        stage: the stage's name in the default output directory (``finetune``, ``dpo``); title: in the messages.
        run: ``(model_dir, output_dir, max_steps) -> result``; report: ``result -> reached the target``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="the pretrained demo model (paddle-llm demo's OUTPUT/pretrain)")
    parser.add_argument("--output_dir", default=f"demo_output/{stage}", help=f"where the adapter goes (default: demo_output/{stage})")
    parser.add_argument("--max_steps", type=int, default=max_steps, help=f"training steps (default: {max_steps})")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not report(run(args.model_dir, args.output_dir, args.max_steps)):
        print(f"{title} demo FAILED: held-out accuracy below target", file=sys.stderr)
        return 1
    print(f"{title} demo OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, "python -m paddle_llm.tools.demo_finetune", __doc__, "finetune", "fine-tuning", run_finetune_demo, print_report, max_steps=400)


if __name__ == "__main__":
    sys.exit(main())
