"""Parity check: the exported graph must decode like the dygraph checkpoint it came from.

The graph runs the way serving runs it: all prompts in one left-padded batch, a KV cache, one step per token. The
reference is the plain PaddleNLP model (LoRA unmerged, prefix through PaddleNLP's prefix model) recomputing the full
sequence of each prompt alone at every step, with the registry's causal-LM inputs. So the check covers the
merge, the cache, the padding and the export at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import paddle

from paddle_llm.cpu import features as cpu_features
from paddle_llm.inference.manifest import FORMAT_STATIC, load_manifest
from paddle_llm.inference.load import load_checkpoint_tokenizer, load_model, load_prefix_model
from paddle_llm.inference.runtime import best_program, open_export_decoder, runnable_programs
from paddle_llm.models.registry import resolve_model

DEFAULT_PROMPTS = (
    "Hello",
    "The quick brown fox jumps over",
    "Once upon a time, in a small village by the sea, there lived",
    "1 2 3 4 5 6",
)


@dataclass
class ParityReport:
    """Outcome of a parity check.

    Attributes:
        passed: logits within ``atol`` at every compared step and identical greedy tokens.
        max_abs_diff: the largest logit difference seen.
        atol: the tolerance.
        prompts, new_tokens: how much was compared.
        mismatches: one line per prompt whose tokens differ.
        skipped: why the check did not run (e.g. half precision on a CPU), else None.
        programs: the step graph's programs checked (every one this CPU can run).
        not_checked: ``{program: CPU features it needs and this CPU lacks}``.
    """

    passed: bool
    max_abs_diff: float
    atol: float
    prompts: int
    new_tokens: int
    mismatches: list[str] = field(default_factory=list)
    skipped: str | None = None
    programs: list[str] = field(default_factory=list)
    not_checked: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.skipped:
            return f"parity check skipped: {self.skipped}"
        verdict = "PASSED" if self.passed else "FAILED"
        checked = f" ({', '.join(self.programs)})" if len(self.programs) > 1 else ""
        lines = [
            f"parity {verdict}{checked}: {self.prompts} prompts x {self.new_tokens} greedy tokens, "
            f"max |logit diff| {self.max_abs_diff:.2e} (tolerance {self.atol:.0e})"
        ]
        lines += [f"  {line}" for line in self.mismatches]
        lines += [f"  {program} not checked: this CPU lacks {', '.join(missing)}"
                  for program, missing in self.not_checked.items()]
        return "\n".join(lines)


def encode_prompts(tokenizer, prompts, bos_token_id: int | None) -> list[list[int]]:
    """Encode without special tokens (as ``paddle-llm preprocess`` does); an empty encoding becomes ``[bos]``."""
    encoded = []
    for text in prompts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        encoded.append(ids or [bos_token_id if bos_token_id is not None else 0])
    return encoded


def reference_logits(model, family, ids: list[int]) -> np.ndarray:
    """Last-position logits of a full forward over ``ids`` (no cache), in float32."""
    input_ids = np.asarray([ids], dtype="int64")
    extra = {name: paddle.to_tensor(value) for name, value in family.causal_lm_inputs(input_ids).items()}
    with paddle.no_grad():
        outputs = model(input_ids=paddle.to_tensor(input_ids), return_dict=False, **extra)
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return logits[0, -1].astype("float32").numpy()


def compare(decoder, reference_model, family, prompt_ids: list[list[int]], new_tokens: int, atol: float) -> ParityReport:
    """Greedy-decode ``prompt_ids`` with ``decoder`` (batched, cached) and with the reference; compare both ways.

    Args:
        decoder: a ``StepDecoder`` around the exported graph.
        reference_model: the dygraph model (or PaddleNLP PEFT wrapper) to match.
        family: the registry ``ModelFamily`` (gives the reference its masks and positions).
    """
    decoder.resize(len(prompt_ids))
    logits = decoder.prefill(list(range(len(prompt_ids))), prompt_ids)
    graph_tokens: list[list[int]] = [[] for _ in prompt_ids]
    graph_logits: list[list[np.ndarray]] = [[row] for row in logits]
    for step in range(new_tokens):
        next_tokens = [int(np.argmax(row)) for row in logits]
        for row, token in enumerate(next_tokens):
            graph_tokens[row].append(token)
        if step + 1 < new_tokens:
            logits = decoder.decode(next_tokens)
            for row, row_logits in enumerate(logits):
                graph_logits[row].append(row_logits)

    max_diff, mismatches = 0.0, []
    for row, prompt in enumerate(prompt_ids):
        sequence = list(prompt)
        for step in range(new_tokens):
            expected = reference_logits(reference_model, family, sequence)
            max_diff = max(max_diff, float(np.max(np.abs(expected - graph_logits[row][step]))))
            expected_token = int(np.argmax(expected))
            if expected_token != graph_tokens[row][step]:
                mismatches.append(
                    f"prompt {row}: token {step} is {graph_tokens[row][step]} in the graph but {expected_token} in dygraph"
                )
                break
            sequence.append(expected_token)
    passed = max_diff <= atol and not mismatches
    return ParityReport(passed, max_diff, atol, len(prompt_ids), new_tokens, mismatches)


def check_export(
    export_dir: str,
    model_name_or_path: str,
    lora_path: str | None = None,
    prefix_path: str | None = None,
    prompts=DEFAULT_PROMPTS,
    new_tokens: int = 8,
    atol: float = 1e-4,
) -> ParityReport:
    """Check an export directory against its checkpoint (runnable alone: ``paddle-llm export --check_only``).

    Raises:
        FileNotFoundError, ValueError: a bad export directory or checkpoint (named in the message).
    """
    manifest = load_manifest(export_dir)
    if manifest.format != FORMAT_STATIC:
        return ParityReport(False, 0.0, atol, 0, 0, skipped=f"a {manifest.format!r} export has no step graph to check")
    if manifest.dtype != "float32" and not paddle.device.is_compiled_with_cuda():
        return ParityReport(
            False, 0.0, atol, 0, 0,
            skipped=f"{manifest.dtype} kernels exist only on GPU in this Paddle build; check float32 exports on CPU",
        )
    source = resolve_model(model_name_or_path)
    if source.family.name != manifest.family:
        raise ValueError(f"{model_name_or_path} is a {source.family.name} model but {export_dir} holds {manifest.family}")
    reference = load_model(source, lora_path, merge_lora=False)
    if prefix_path:
        reference = load_prefix_model(reference, source, prefix_path)
    programs, not_checked = runnable_programs(export_dir, manifest, cpu_features.detect())
    if not programs:
        best_program(export_dir, manifest)  # raises, naming what each program needs
    tokenizer = load_checkpoint_tokenizer(source)
    prompt_ids = encode_prompts(tokenizer, prompts, getattr(tokenizer, "bos_token_id", None))
    # A prompt and its greedy tokens must fit the export's context (a sliding-window model's is its window).
    room = max(1, manifest.max_context_length - new_tokens)
    prompt_ids = [ids[:room] for ids in prompt_ids]
    reports = {program: compare(open_export_decoder(export_dir, manifest, program), reference, source.family,
                                prompt_ids, new_tokens, atol) for program in programs}
    mismatches = [f"{program}: {line}" if len(programs) > 1 else line
                  for program, report in reports.items() for line in report.mismatches]
    return ParityReport(
        passed=all(report.passed for report in reports.values()),
        max_abs_diff=max(report.max_abs_diff for report in reports.values()),
        atol=atol, prompts=len(prompt_ids), new_tokens=new_tokens, mismatches=mismatches,
        programs=programs, not_checked=not_checked,
    )

