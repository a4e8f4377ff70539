"""The training report: built from a synthetic output directory, and once from a real Trainer run on CPU."""

from __future__ import annotations

import json
import math
import os
from html.parser import HTMLParser

import numpy as np
import pytest

from paddle_llm import cli
from paddle_llm.estimator.memory import estimate_training_memory

ALL_PLOTS = ("loss", "eval_ppl", "learning_rate", "tokens_per_second", "grad_norm")
MEASURED_PEAK = 48 * 2**20


def synthetic_loss(step: int, offset: float = 0.5) -> float:
    return round(6.9 * math.exp(-step / 20) + offset, 4)


def write_synthetic_run(directory, steps: int = 40, with_summary: bool = True, with_eval: bool = True) -> str:
    """An output directory as a 40-step tiny-llama run leaves it: metrics.jsonl, config.json, results, and the
    run_summary.json of ReportCallback with the real estimator's figure and a measured peak."""
    from paddle_llm.trainer.report import RUN_SUMMARY_FILE
    from paddle_llm.config.presets import preset

    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    rows = []
    for step in range(5, steps + 1, 5):
        rows.append({
            "step": step,
            "loss": synthetic_loss(step),
            "learning_rate": 3e-3 * (1 - step / (steps + 1)),
            "grad_norm": 2.0 + step / 10,
            "tokens_per_second": 1500.0 + step,
        })
        if with_eval and step % 20 == 0:
            eval_loss = synthetic_loss(step, offset=0.7)
            rows.append({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
    with open(os.path.join(directory, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    config = preset("tiny-llama")
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "train_results.json"), "w", encoding="utf-8") as f:
        json.dump({"train_runtime": 12.5, "train_tokens_per_second": 1512.25}, f)
    if with_summary:
        estimate = estimate_training_memory(config, device="cpu", gpu_memory_gb=None, seq_length=64, micro_batch_size=4)
        summary = {
            "flags": {"model_name_or_path": "tiny-llama", "max_seq_length": 64, "per_device_train_batch_size": 4, "seed": 42},
            "explicit_flags": ["max_seq_length", "model_name_or_path"],
            "training_arguments": {"learning_rate": 3e-3, "max_steps": steps, "device": "cpu"},
            "memory": {
                "estimate": estimate.to_json_dict(),
                "measured": {"device": "cpu", "peak_allocated_bytes": MEASURED_PEAK, "source": "synthetic"},
            },
        }
        with open(os.path.join(directory, RUN_SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f)
    return directory


class ReportStructure(HTMLParser):
    """The parts of report.html the tests look at: figures with their SVGs, table rows, outside references."""

    def __init__(self):
        super().__init__()
        self.figures: dict[str, int] = {}  # figure id -> number of <path> elements inside its SVG
        self.external: list[str] = []
        self.cells: list[str] = []
        self._figure = None
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = attrs.get("id")
            self.figures[self._figure] = 0
        elif tag == "path" and self._figure:
            self.figures[self._figure] += 1
        if tag in ("script", "link", "img", "iframe") or any(k in attrs for k in ("src", "href")):
            self.external.append(f"<{tag} {attrs}>")
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data.strip())


def parse(html_text: str) -> ReportStructure:
    structure = ReportStructure()
    structure.feed(html_text)
    return structure


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory) -> tuple[str, str]:
    """(output directory, report.html text) of the synthetic run, rendered once for the tests that only read it."""
    from paddle_llm.trainer.report import REPORT_FILE, write_report

    directory = write_synthetic_run(tmp_path_factory.mktemp("report") / "run")
    path = write_report(directory)
    assert path == os.path.join(directory, REPORT_FILE)
    with open(path, encoding="utf-8") as f:
        return directory, f.read()


def test_report_holds_every_curve_the_numbers_memory_and_config(synthetic_report):
    structure = parse(synthetic_report[1])
    assert set(structure.figures) == {f"plot-{name}" for name in ALL_PLOTS}
    assert all(paths > 5 for paths in structure.figures.values()), structure.figures  # axes, ticks and the lines
    cells = structure.cells
    assert f"{synthetic_loss(5):.4g} → {synthetic_loss(40):.4g}" in cells  # first and last train loss
    assert cells[cells.index("last eval perplexity") + 1] == f"{math.exp(synthetic_loss(40, offset=0.7)):.4g}"
    assert cells[cells.index("tokens/s over the whole run") + 1] == "1512.25"
    assert "measured / estimated" in cells
    assert '"tiny-llama"' in cells and "max_seq_length" in cells


def test_the_flags_given_come_first_and_every_value_is_folded(synthetic_report):
    html_text = synthetic_report[1]
    given = html_text[html_text.index("<h3>Flags given</h3>"):html_text.index("<details><summary>Every flag value")]
    assert "model_name_or_path" in given and "seed" not in given
    assert "<th>seed</th>" in html_text[html_text.index("<details><summary>Every flag value"):]


def test_memory_rows_put_the_estimate_next_to_the_measured_peak(synthetic_report):
    from paddle_llm.trainer.report import RUN_SUMMARY_FILE

    directory, html_text = synthetic_report
    with open(os.path.join(directory, RUN_SUMMARY_FILE), encoding="utf-8") as f:
        estimated = json.load(f)["memory"]["estimate"]["per_device"]["total"]
    assert "48.00 MiB" in html_text
    assert f"{MEASURED_PEAK / estimated:.2f}" in html_text


def test_report_is_self_contained(synthetic_report):
    html_text = synthetic_report[1]
    assert parse(html_text).external == []
    assert "<?xml" not in html_text and "<!DOCTYPE svg" not in html_text  # SVG prologs are invalid inside HTML


def test_nan_losses_are_left_out_of_the_curves_but_listed(tmp_path):
    from paddle_llm.trainer.report import load_run, render_report

    directory = write_synthetic_run(tmp_path / "run")
    with open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 45, "loss": float("nan"), "learning_rate": 1e-4, "grad_norm": None, "tokens_per_second": 1500.0}) + "\n")
        f.write('{"step": 50, "loss": 0.4')  # a run killed mid-write leaves half a line
    record = load_run(directory)
    assert [row["step"] for row in record.train_rows][-1] == 45
    structure = parse(render_report(record))
    assert "plot-loss" in structure.figures and "nan" in structure.cells


def test_dpo_reward_metrics_get_their_own_plots_train_and_eval(tmp_path):
    from paddle_llm.trainer.report import load_run, render_report

    directory = write_synthetic_run(tmp_path / "run")
    with open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8") as f:
        for step in (45, 50):
            f.write(json.dumps({"step": step, "loss": 0.5, "rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step,
                                "rewards/margins": 0.2 * step, "rewards/accuracies": 0.9}) + "\n")
        f.write(json.dumps({"step": 50, "eval_loss": 0.4, "eval_rewards/chosen": 4.0, "eval_rewards/accuracies": 0.95}) + "\n")
    structure = parse(render_report(load_run(directory)))
    assert {"plot-rewards", "plot-reward_accuracy"} <= set(structure.figures)
    html_text = render_report(load_run(directory))
    for label in ("rewards/margins", "eval_rewards/chosen", "eval_rewards/accuracies"):  # legends name each curve
        assert label in html_text, label


def test_paddle_llm_report_command_on_a_run_without_eval_or_summary(tmp_path, capsys):
    from paddle_llm.trainer.report import REPORT_FILE

    directory = write_synthetic_run(tmp_path / "run", with_summary=False, with_eval=False)
    assert cli.main(["report", directory]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(directory, REPORT_FILE)
    with open(path, encoding="utf-8") as f:
        html_text = f.read()
    assert set(parse(html_text).figures) == {"plot-loss", "plot-learning_rate", "plot-tokens_per_second", "plot-grad_norm"}
    assert "No memory record" in html_text and "flags were not recorded" in html_text


def test_paddle_llm_report_on_a_directory_without_metrics_says_what_to_pass(tmp_path, capsys):
    from paddle_llm.trainer.report import EXIT_NO_METRICS

    assert cli.main(["report", str(tmp_path / "empty")]) == EXIT_NO_METRICS
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_estimator_flags_merge_training_arguments_with_the_run_flags():
    from paddle_llm.trainer.report import estimator_flags

    training_arguments = {"sharding": ["stage2", "offload"], "fp16": False, "world_size": 8, "device": "gpu", "max_seq_length": None}
    flags = estimator_flags(training_arguments, {"max_seq_length": 2048, "fp16": True, "lora": None}, {"seq_length": 64})
    assert flags["sharding"] == "stage2 offload"
    assert flags["fp16"] is True and flags["max_seq_length"] == 2048 and "lora" not in flags
    assert flags["num_gpus"] == 8 and flags["device"] == "gpu"
    assert estimator_flags({"device": "cpu"}, None, {"seq_length": 64})["max_seq_length"] == 64
    assert "max_seq_length" not in estimator_flags({}, {"max_length": 512}, {"seq_length": 64})  # fine-tuning's name


def test_report_callback_through_the_real_trainer_records_estimate_and_measured_peak(tmp_path):
    import paddle
    from paddlenlp.trainer import TrainingArguments
    from paddle_llm.trainer.callbacks import MetricsFileCallback
    from paddle_llm.trainer.report import REPORT_FILE, RUN_SUMMARY_FILE, ReportCallback
    from paddle_llm.trainer.trainer import LLMTrainer
    from paddle_llm.models.registry import build_config, build_model, resolve_model

    paddle.set_device("cpu")
    paddle.seed(0)
    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source), load_weights=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1024, (16, 17)).astype("int64")
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in tokens]
    output_dir = str(tmp_path / "run")
    args = TrainingArguments(
        output_dir=output_dir, max_steps=4, per_device_train_batch_size=2, logging_steps=2, save_steps=10_000,
        report_to=["none"], disable_tqdm=True, device="cpu", seed=0,
    )
    run_flags = {"model_name_or_path": "tiny-llama", "max_seq_length": 16}
    callbacks = [MetricsFileCallback(output_dir, tokens_per_sample=16), ReportCallback(run_flags, explicit_flags={"max_seq_length"})]
    LLMTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()

    with open(os.path.join(output_dir, RUN_SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["flags"] == run_flags and summary["explicit_flags"] == ["max_seq_length"]
    assert summary["training_arguments"]["max_steps"] == 4
    estimate, measured = summary["memory"]["estimate"], summary["memory"]["measured"]
    assert estimate["setup"]["seq_length"] == 16 and estimate["setup"]["device"] == "cpu"
    assert estimate["per_device"]["total"] > 0 and measured["device"] == "cpu"
    # The process's peak includes the model's weights, gradients and AdamW moments at the least.
    assert measured["peak_allocated_bytes"] >= estimate["per_device"]["params"] * 4
    assert summary["model_config"]["model_type"] == "llama" and summary["train_metrics"]["train_runtime"] > 0
    with open(os.path.join(output_dir, REPORT_FILE), encoding="utf-8") as f:
        structure = parse(f.read())
    assert {"plot-loss", "plot-learning_rate"} <= set(structure.figures)
    assert "samples/s over the whole run" in structure.cells and "num_hidden_layers" in structure.cells


def test_run_shorter_than_logging_steps_still_gets_a_report(tmp_path):
    # The README's 2-process tour command (20 steps, PaddleNLP's default --logging_steps) used to exit 2 here.
    import paddle
    from paddlenlp.trainer import TrainingArguments
    from paddle_llm.trainer.callbacks import MetricsFileCallback
    from paddle_llm.trainer.report import REPORT_FILE, ReportCallback
    from paddle_llm.trainer.trainer import LLMTrainer
    from paddle_llm.models.registry import build_config, build_model, resolve_model

    paddle.set_device("cpu")
    paddle.seed(0)
    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source), load_weights=False)
    tokens = np.random.default_rng(0).integers(0, 1024, (4, 17)).astype("int64")
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in tokens]
    output_dir = str(tmp_path / "run")
    args = TrainingArguments(output_dir=output_dir, max_steps=2, per_device_train_batch_size=2, logging_steps=500,
                             save_steps=10_000, report_to=["none"], disable_tqdm=True, device="cpu", seed=0)
    callbacks = [MetricsFileCallback(output_dir, tokens_per_sample=16), ReportCallback()]
    LLMTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()

    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        assert f.read() == ""
    with open(os.path.join(output_dir, REPORT_FILE), encoding="utf-8") as f:
        assert "the run had not logged a step" in f.read()
