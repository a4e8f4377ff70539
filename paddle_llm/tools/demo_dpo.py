"""The demo's optional DPO stage (``paddle-llm demo --dpo``): LoRA-DPO the demo's pretrained tiny Llama on the
shipped preference task.

The task (``paddle_llm/assets/preferences``, written by ``scripts/make_preference_data.py``) asks a question about
a story and offers two answers from it, the one that answers the question preferred: "... Where did Kai go?" ->
chosen "the harbor", rejected "a map". Reward accuracy is the share of the 100 held-out pairs whose chosen reply
gains more log-probability over the reference than the rejected one. Before training it is measured reference-free
(how often the starting model already prefers the chosen reply: near chance), since against a reference every
reward starts at exactly 0. Run with the flags PaddleNLP's run_dpo.py takes (``--lora True --beta 0.1``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from paddle_llm import ASSETS_DIR
from paddle_llm.tools.demo_finetune import stage_main
from paddle_llm.recipes import dpo

PREFERENCES_DIR = os.path.join(ASSETS_DIR, "preferences")
ACCURACY_TARGET = 0.9


def _eval_results(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "eval_results.json"), encoding="utf-8") as f:
        return json.load(f)


def _flags(model_dir: str, output_dir: str, show_progress: bool) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--output_dir", output_dir, "--overwrite_output_dir", "--device", "cpu",
        "--train_dataset_path", os.path.join(PREFERENCES_DIR, "train.jsonl"),
        "--dev_dataset_path", os.path.join(PREFERENCES_DIR, "dev.jsonl"),
        "--max_seq_len", "128", "--max_prompt_len", "96", "--per_device_eval_batch_size", "25",
        "--disable_tqdm", str(not show_progress), "--report_to", "none", "--seed", "42", "--do_eval",
    ]


def run_dpo_demo(model_dir: str, output_dir: str, max_steps: int = 100, show_progress: bool = False) -> dict:
    """Measure held-out reward accuracy, LoRA-DPO ``model_dir``, measure again.

    Returns:
        ``accuracy_before``, ``accuracy_after``, ``margin_after``, ``target``, ``seconds`` and ``adapter_dir``.

    Raises:
        SystemExit: a DPO run failed (its error is already printed).
    """

    started = time.perf_counter()
    before_dir = os.path.join(output_dir, "before")
    code = dpo.RECIPE.main(_flags(model_dir, before_dir, show_progress) + ["--reference_free", "True"])
    if code:
        raise SystemExit(code)
    adapter_dir = os.path.join(output_dir, "lora")
    training = [
        "--do_train", "--lora", "True", "--lora_rank", "8", "--beta", "0.1", "--learning_rate", "0.003",
        "--warmup_steps", "10", "--max_steps", str(max_steps), "--per_device_train_batch_size", "8",
        "--logging_steps", "20", "--save_steps", str(max_steps), "--eval_steps", str(max_steps),
    ]
    code = dpo.RECIPE.main(_flags(model_dir, adapter_dir, show_progress) + training)
    if code:
        raise SystemExit(code)
    after = _eval_results(adapter_dir)
    return {
        "accuracy_before": _eval_results(before_dir)["eval_rewards/accuracies"],
        "accuracy_after": after["eval_rewards/accuracies"],
        "margin_after": after["eval_rewards/margins"],
        "target": ACCURACY_TARGET,
        "seconds": round(time.perf_counter() - started, 1),
        "adapter_dir": adapter_dir,
    }


def print_report(result: dict) -> bool:
    """Print the before/after lines; return whether the target was met."""
    print(f"held-out reward accuracy before DPO: {result['accuracy_before']:.0%}   (the starting model's own preference)")
    print(f"held-out reward accuracy after DPO:  {result['accuracy_after']:.0%}   (target >= {result['target']:.0%}; reward margin {result['margin_after']:.2f})")
    print(f"DPO time:                            {result['seconds']} s; adapter saved in {result['adapter_dir']}")
    return result["accuracy_after"] >= result["target"]


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, "python -m paddle_llm.tools.demo_dpo", __doc__, "dpo", "DPO", run_dpo_demo, print_report, max_steps=100)


if __name__ == "__main__":
    sys.exit(main())
