"""The training report: ``OUTPUT_DIR/report.html``, one self-contained page a browser opens without a server.

It holds the loss and learning-rate curves with eval loss and perplexity (from ``metrics.jsonl``), tokens/s, the
configuration used, and the memory estimator's figure next to the measured peak. Plots are matplotlib figures
(drawn without pyplot, so no global backend state) inlined as SVG; nothing is loaded from the network.

Written at the end of training by :class:`ReportCallback`, and on demand by ``paddle-llm report OUTPUT_DIR``.

Files read from the output directory:

* ``metrics.jsonl``: written by :class:`~paddle_llm.trainer.callbacks.MetricsFileCallback` (required);
* ``run_summary.json``: written by :class:`ReportCallback`: the run's flags (and which of them the user gave),
  PaddleNLP's training arguments, and the memory estimate and measured peak;
* ``config.json`` (the model's), ``train_results.json`` and ``eval_results.json`` (PaddleNLP's), when present;
  at train end they do not exist yet, and the summary's copies of the model config and train metrics stand in.
"""

from __future__ import annotations

import argparse
import datetime
import html
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import paddle
from paddle.base import core
from paddlenlp.trainer import TrainerCallback

from paddle_llm.estimator.flags import estimate_for_flags
from paddle_llm.estimator.memory import format_bytes
from paddle_llm.trainer.callbacks import METRICS_FILE

REPORT_FILE = "report.html"
RUN_SUMMARY_FILE = "run_summary.json"
EXIT_NO_METRICS = 2
# (metrics.jsonl key, axis label, figure title); figures whose key holds no value are left out.
TRAIN_CURVES = (
    ("learning_rate", "learning rate", "Learning rate"),
    ("tokens_per_second", "tokens / s", "Throughput"),
    ("grad_norm", "gradient norm", "Gradient norm (before clipping)"),
)
# DPO's grouped metrics (figure name, title, axis label, metrics.jsonl keys): each key's training curve and its
# eval_ twin share one figure; figures whose keys hold no value are left out.
GROUPED_CURVES = (
    ("rewards", "Rewards (beta x log-ratio to the reference)", "reward", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("reward_accuracy", "Reward accuracy (chosen above rejected)", "fraction of pairs", ("rewards/accuracies",)),
)


@dataclass
class RunRecord:
    """What the report shows, read from an output directory.

    Attributes:
        output_dir: the directory.
        train_rows: ``metrics.jsonl`` training rows (``step, loss, learning_rate, grad_norm, tokens_per_second``).
        eval_rows: ``metrics.jsonl`` evaluation rows (``step, eval_loss, eval_ppl``).
        summary: ``run_summary.json``, or empty.
        model_config: the model's ``config.json``, or empty.
        results: PaddleNLP's ``train_results.json`` and ``eval_results.json`` merged, or empty.
    """

    output_dir: str
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def _read_json(path: str) -> dict:
    """A JSON object file, or ``{}`` when it is missing or unreadable (a report is better than none)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: str, value: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(temporary, path)  # readers never see half a file


def load_run(output_dir: str) -> RunRecord:
    """Read everything the report shows from ``output_dir``.

    Raises:
        FileNotFoundError: ``metrics.jsonl`` is missing (the directory is not a training output directory).
    """
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(
            f"{metrics_path} not found: pass the --output_dir of a `paddle-llm pretrain` / run_pretrain.py run"
        )
    record = RunRecord(output_dir)
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write
            if "loss" in row:
                record.train_rows.append(row)
            elif "eval_loss" in row:
                record.eval_rows.append(row)
    record.summary = _read_json(os.path.join(output_dir, RUN_SUMMARY_FILE))
    # At train end the final model (config.json) and PaddleNLP's results files are not written yet; the summary
    # holds the same values, recorded by ReportCallback.
    record.model_config = _read_json(os.path.join(output_dir, "config.json")) or record.summary.get("model_config") or {}
    record.results.update(record.summary.get("train_metrics") or {})
    for name in ("train_results.json", "eval_results.json"):
        record.results.update(_read_json(os.path.join(output_dir, name)))
    return record


# ----------------------------------------------------------------------------------------------------------------
# Memory: the estimate for the run, and the allocator's measured peak
# ----------------------------------------------------------------------------------------------------------------


def measure_peak_memory(device: str) -> dict | None:
    """The allocator's peak for this process: device memory on GPU, host memory on CPU.

    Args:
        device: ``cpu`` or ``gpu`` (``gpu:0`` works too).

    Returns:
        ``{"device", "peak_allocated_bytes", "source"}``, or None on other devices.
    """
    if device.startswith("gpu"):
        return {
            "device": "gpu",
            "peak_allocated_bytes": int(paddle.device.cuda.max_memory_allocated()),
            "source": "paddle.device.cuda.max_memory_allocated()",
        }
    if device.startswith("cpu"):
        return {
            "device": "cpu",
            "peak_allocated_bytes": int(core.host_memory_stat_peak_value("Allocated", 0)),
            "source": 'paddle.base.core.host_memory_stat_peak_value("Allocated", 0)',
        }
    return None


def estimator_flags(training_arguments: Mapping[str, Any], run_flags: Mapping[str, Any] | None, model_config: Mapping) -> dict:
    """The flags :func:`paddle_llm.estimator.flags.setup_from_flags` reads, from what a finished run knows.

    PaddleNLP's ``TrainingArguments.to_dict()`` holds the precision, batch and parallel flags; the run's own flags
    (when the recipe passes them) add ``max_seq_length`` and adapter flags, and win where both have a value.
    """
    flags = {k: v for k, v in training_arguments.items() if v is not None}
    flags.update({k: v for k, v in (run_flags or {}).items() if v is not None})
    if isinstance(flags.get("sharding"), (list, tuple)):
        flags["sharding"] = " ".join(str(option) for option in flags["sharding"])  # ["stage2", "offload"]
    if not (flags.get("max_seq_length") or flags.get("max_length")):  # pretraining or fine-tuning's name
        flags["max_seq_length"] = model_config.get("seq_length")
    # Every rank counted as on one host: per-device figures are right; the per-host one is for a single node.
    flags["num_gpus"] = int(training_arguments.get("world_size") or 1)
    flags["device"] = "cpu" if str(flags.get("device", "gpu")).startswith("cpu") else "gpu"
    return flags


def estimate_run_memory(model_config: Mapping, flags: Mapping[str, Any]) -> dict:
    """The estimator's answer as JSON (``MemoryEstimate.to_json_dict()``), or ``{"error": why}``."""
    try:
        return estimate_for_flags(dict(model_config), dict(flags)).to_json_dict()
    except (ValueError, KeyError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}


# ----------------------------------------------------------------------------------------------------------------
# Rendering: pure functions of a RunRecord
# ----------------------------------------------------------------------------------------------------------------


def _finite_points(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _svg(figure, name: str) -> str:
    """A matplotlib figure as an inline ``<svg>`` element (text kept as text, ids unique per figure)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE, which are invalid inside HTML


def _line_figure(name: str, title: str, ylabel: str, series: list[tuple[str, list, list, str]], log_y: bool = False) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5.2, 3.0), dpi=100)
    axes = figure.add_subplot()
    for label, steps, values, style in series:
        axes.plot(steps, values, style, label=label, linewidth=1.6, markersize=5)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    every_value = [v for _, _, values, _ in series for v in values]
    # A log axis only helps when the values span orders of magnitude (perplexity early in a run).
    if log_y and min(every_value) > 0 and max(every_value) / min(every_value) > 20:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    return _svg(figure, name)


def plot_figures(record: RunRecord) -> dict[str, str]:
    """``{figure name: inline SVG}`` for every curve with data: loss (train and eval), perplexity,
    :data:`TRAIN_CURVES`, then :data:`GROUPED_CURVES`. Empty when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    figures = {}
    loss_series = []
    for label, rows, key, style in (("train", record.train_rows, "loss", "-"), ("eval", record.eval_rows, "eval_loss", "o--")):
        steps, values = _finite_points(rows, key)
        if steps:
            loss_series.append((label, steps, values, style))
    if loss_series:
        figures["loss"] = _line_figure("loss", "Loss", "loss (nats/token)", loss_series)
    steps, values = _finite_points(record.eval_rows, "eval_ppl")
    if steps:
        figures["eval_ppl"] = _line_figure("eval_ppl", "Eval perplexity", "perplexity", [("eval", steps, values, "o-")], log_y=True)
    for key, ylabel, title in TRAIN_CURVES:
        steps, values = _finite_points(record.train_rows, key)
        if steps:
            figures[key] = _line_figure(key, title, ylabel, [(key, steps, values, "-")])
    for name, title, ylabel, keys in GROUPED_CURVES:
        series = []
        for key in keys:
            for label, rows, style in ((key, record.train_rows, "-"), (f"eval_{key}", record.eval_rows, "o--")):
                steps, values = _finite_points(rows, label)
                if steps:
                    series.append((label, steps, values, style))
        if series:
            figures[name] = _line_figure(name, title, ylabel, series)
    return figures


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def _table(rows: list[tuple[str, str]], css_class: str = "facts") -> str:
    """Rows of (label, already-escaped HTML cell)."""
    body = "".join(f"<tr><th>{html.escape(label)}</th><td>{cell}</td></tr>" for label, cell in rows)
    return f'<table class="{css_class}">{body}</table>'


def _mapping_table(values: Mapping[str, Any]) -> str:
    return _table([(str(k), html.escape(json.dumps(v, default=str))) for k, v in sorted(values.items())])


def summary_rows(record: RunRecord) -> list[tuple[str, str]]:
    """The headline numbers: steps, losses, perplexity, throughput, runtime."""
    _, losses = _finite_points(record.train_rows, "loss")
    _, throughput = _finite_points(record.train_rows, "tokens_per_second")
    last_eval = record.eval_rows[-1] if record.eval_rows else {}
    steps = [row["step"] for row in record.train_rows + record.eval_rows]
    rows = [
        ("steps logged", _number(max(steps)) if steps else "–"),
        ("first / last train loss", f"{_number(losses[0])} → {_number(losses[-1])}" if losses else "–"),
        ("last eval loss", _number(last_eval.get("eval_loss"))),
        ("last eval perplexity", _number(last_eval.get("eval_ppl"))),
        ("mean tokens/s (logged intervals)", _number(_mean(throughput), 6)),
    ]
    for key, label in (
        ("train_tokens_per_second", "tokens/s over the whole run"),
        ("train_samples_per_second", "samples/s over the whole run"),
        ("train_runtime", "train runtime (s)"),
    ):
        if key in record.results:
            rows.append((label, _number(record.results[key], 6)))
    return rows


def memory_section(record: RunRecord) -> str:
    """Estimated against measured memory, or why either is missing."""
    memory = record.summary.get("memory") or {}
    estimate, measured = memory.get("estimate") or {}, memory.get("measured")
    if not memory:
        return f"<p>No memory record: {RUN_SUMMARY_FILE} is written by the trainer's ReportCallback.</p>"
    rows = []
    per_device = estimate.get("per_device") or {}
    if "error" in estimate:
        rows.append(("estimate", html.escape(f"not available ({estimate['error']})")))
    elif per_device:
        kinds = ("params", "grads", "optimizer", "activations", "buffers")
        parts = ", ".join(f"{kind} {format_bytes(per_device[kind])}" for kind in kinds)
        rows.append(("estimated peak per device", f"<b>{format_bytes(per_device['total'])}</b> ({html.escape(parts)})"))
    if measured:
        rows.append((
            f"measured peak ({measured['device']})",
            f"<b>{format_bytes(measured['peak_allocated_bytes'])}</b> <small>{html.escape(measured['source'])}</small>",
        ))
        if per_device.get("total"):
            rows.append(("measured / estimated", f"{measured['peak_allocated_bytes'] / per_device['total']:.2f}"))
    else:
        rows.append(("measured peak", "not recorded (the run did not reach its end)"))
    note = (
        "<p class=note>The measurement is the allocator's peak for the whole process (rank 0): it also counts "
        "tensors outside training, such as the data loader's. The estimate counts parameters, gradients, optimizer "
        "states, activations and buffers of the most loaded device.</p>"
    )
    return _table(rows) + note


def config_section(record: RunRecord) -> str:
    """The flags of the run, then PaddleNLP's full training arguments and the model config, folded."""
    parts = []
    flags = record.summary.get("flags") or {}
    given = [name for name in record.summary.get("explicit_flags") or () if name in flags]
    if given:
        parts.append("<h3>Flags given</h3>" + _mapping_table({name: flags[name] for name in given}))
    elif flags:
        parts.append("<h3>Run flags</h3>" + _mapping_table(flags))
    else:
        parts.append("<p>The run's flags were not recorded (pass run_flags to ReportCallback).</p>")
    folded = (
        ("Every flag value, defaults included", flags if given else None),
        ("Training arguments (PaddleNLP)", record.summary.get("training_arguments")),
        ("Model config", record.model_config),
    )
    for title, values in folded:
        if values:
            parts.append(f"<details><summary>{html.escape(title)}</summary>{_mapping_table(values)}</details>")
    return "".join(parts)


def metrics_table(record: RunRecord) -> str:
    keys = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss", "eval_ppl")
    rows = sorted(record.train_rows + record.eval_rows, key=lambda row: (row["step"], "eval_loss" in row))
    header = "".join(f"<th>{key}</th>" for key in keys)
    body = "".join("<tr>" + "".join(f"<td>{_number(row.get(key))}</td>" for key in keys) + "</tr>" for row in rows)
    return f'<details><summary>Every metrics.jsonl row</summary><table class="metrics"><tr>{header}</tr>{body}</table></details>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } th, td { padding: .2em .8em; text-align: left; vertical-align: top; }
table.facts th { font-weight: normal; color: #555; } table.metrics td { font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(26em, 1fr)); gap: 1em; }
figure.plot { margin: 0; } figure.plot svg { width: 100%; height: auto; }
.note { color: #666; font-size: .9em; } details { margin: .6em 0; } summary { cursor: pointer; }
"""


def render_report(record: RunRecord, generated_at: str | None = None) -> str:
    """The report page for a run, as a complete HTML document.

    Args:
        record: what :func:`load_run` read.
        generated_at: the timestamp shown; now when None.

    Returns:
        The HTML text, with every plot inlined.
    """
    generated_at = generated_at or datetime.datetime.now().isoformat(timespec="seconds")
    figures = plot_figures(record)
    if figures:
        figure_elements = (f'<figure class="plot" id="plot-{name}">{svg}</figure>' for name, svg in figures.items())
        plots = f'<div class="plots">{"".join(figure_elements)}</div>'
    elif record.train_rows or record.eval_rows:
        plots = "<p>matplotlib is not installed, so there are no plots; the numbers are in the table below.</p>"
    else:
        plots = "<p>metrics.jsonl holds no rows yet: the run had not logged a step.</p>"
    title = f"Training report: {os.path.basename(os.path.abspath(record.output_dir))}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>'
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="note">{html.escape(os.path.abspath(record.output_dir))} · generated {html.escape(generated_at)}</p>'
        f"<h2>Summary</h2>{_table(summary_rows(record))}"
        f"<h2>Curves</h2>{plots}{metrics_table(record)}"
        f"<h2>Memory</h2>{memory_section(record)}"
        f"<h2>Configuration</h2>{config_section(record)}"
        "</body></html>\n"
    )


def write_report(output_dir: str) -> str:
    """Write ``OUTPUT_DIR/report.html`` from what the run left in ``output_dir``.

    Returns:
        The report's path.

    Raises:
        FileNotFoundError: ``output_dir`` has no ``metrics.jsonl``.
    """
    html_text = render_report(load_run(output_dir))
    path = os.path.join(output_dir, REPORT_FILE)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(html_text)
    os.replace(temporary, path)
    return path


class ReportCallback(TrainerCallback):
    """Record the run's configuration and memory in ``run_summary.json``, and write ``report.html`` at train end.

    At train begin (rank 0): the flags, PaddleNLP's training arguments and the memory estimate, so a run that dies
    still leaves its configuration for ``paddle-llm report``. At train end: the measured peak, then the report. An
    evaluation after training (the recipe's final ``--do_eval``) rewrites the report to include it.

    Args:
        run_flags: the run's effective flag values (model, data and training groups merged); optional, but they
            carry what the training arguments lack (``max_seq_length``, ``input_dir``, LoRA settings).
        explicit_flags: the names of the flags the user gave (the rest are defaults); the report lists them first.
    """

    def __init__(self, run_flags: Mapping[str, Any] | None = None, explicit_flags: Iterable[str] | None = None):
        self.run_flags = dict(run_flags) if run_flags else None
        self.explicit_flags = sorted(explicit_flags) if explicit_flags else None
        self._training_ended = False
        self._train_metrics: dict = {}

    def _summary_path(self, args) -> str:
        return os.path.join(args.output_dir, RUN_SUMMARY_FILE)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        training_arguments = args.to_dict()
        model_config = model.config.to_dict() if getattr(model, "config", None) is not None else {}
        if model_config:
            estimate = estimate_run_memory(model_config, estimator_flags(training_arguments, self.run_flags, model_config))
        else:
            estimate = {"error": "the model has no config"}
        os.makedirs(args.output_dir, exist_ok=True)
        _write_json(self._summary_path(args), {
            "flags": self.run_flags,
            "explicit_flags": self.explicit_flags,
            "training_arguments": training_arguments,
            "model_config": model_config,
            "memory": {"estimate": estimate, "measured": None},
        })

    def on_log(self, args, state, control, logs=None, **kwargs):
        # PaddleNLP logs the whole run's speed just before on_train_end; the results files come only later.
        if logs and "train_runtime" in logs:
            self._train_metrics = {k: v for k, v in logs.items() if k.startswith("train_")}

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        summary = _read_json(self._summary_path(args))
        summary.setdefault("memory", {})["measured"] = measure_peak_memory(str(args.device))
        summary["train_metrics"] = self._train_metrics
        _write_json(self._summary_path(args), summary)
        write_report(args.output_dir)
        self._training_ended = True

    def on_evaluate(self, args, state, control, **kwargs):
        if self._training_ended and state.is_world_process_zero:
            write_report(args.output_dir)  # the eval row is already in metrics.jsonl: logged before on_evaluate


def main(argv: list[str] | None = None) -> int:
    """``paddle-llm report OUTPUT_DIR``: write the report and print its path."""
    parser = argparse.ArgumentParser(
        prog="paddle-llm report", description="Write OUTPUT_DIR/report.html from a training run's output."
    )
    parser.add_argument("output_dir", help="the --output_dir of a training run (holds metrics.jsonl)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        path = write_report(args.output_dir)
    except FileNotFoundError as err:
        print(f"paddle-llm report: error: {err}", file=sys.stderr)
        return EXIT_NO_METRICS
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
