"""PaddleNLP's own ``llm/config`` argument files, unchanged, through ``paddle-llm check``, and a few of them through
real CPU training steps.

The files are PaddleNLP's, so this project does not commit them: the tests read them from
``$PADDLE_LLM_PADDLENLP_CONFIG``, else from ``shared/reference/paddlenlp-llm-config`` beside the checkout (the
steering repo's shared data), laid out as PaddleNLP's ``llm/config`` (``llama/lora_argument.json`` ...). Which files,
from which PaddleNLP commit, is ``tests/assets/paddlenlp_llm_config.md``; without the directory these tests skip,
saying so.

Each file is given as PaddleNLP's users give it, first on the command line; only stand-ins for what cannot exist
here follow it as flags: a tiny model of the file's family (8 heads, so every tensor-parallel degree in the files
divides it, and trained weights, for ``continue_training``), the shipped data, a scratch output directory and
``--device cpu``. The launcher's world size is the one the file's layout needs. Nothing may fail on a flag PaddleNLP
defines: every file is accepted, or refused with the reasons in ``REFUSED``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os

import numpy as np
import pytest

from tests.conftest import ROOT, run_script, save_tiny_models, train_losses

ARG_FILES = os.environ.get("PADDLE_LLM_PADDLENLP_CONFIG") or os.path.join(os.path.dirname(ROOT), "shared", "reference", "paddlenlp-llm-config")
FILES = sorted(os.path.relpath(path, ARG_FILES) for path in glob.glob(os.path.join(ARG_FILES, "**", "*.json"), recursive=True))
needs_arg_files = pytest.mark.skipif(
    not FILES,
    reason=f"PaddleNLP's llm/config argument files are not at {ARG_FILES} (set PADDLE_LLM_PADDLENLP_CONFIG; the list is "
    "tests/assets/paddlenlp_llm_config.md)",
)
# PaddleNLP's config directory -> our family
FAMILY = {"llama": "llama", "qwen": "qwen2", "chatglm": "chatglm", "chatglm2": "chatglm2"}
# 8 heads and KV heads (the files use tensor parallel up to 8), and room for the files' 8192-token sequences
STAND_IN_SHAPE = {
    "llama": {"num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 8192},
    "qwen": {"num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 8192, "seq_length": 8192},
    "chatglm": {"num_attention_heads": 8, "max_sequence_length": 8192},
    "chatglm2": {"num_attention_heads": 8, "kv_channels": 16, "multi_query_group_num": 8, "max_sequence_length": 8192},
}
INSTRUCTIONS = os.path.join(ROOT, "paddle_llm", "assets", "instructions")
PREFERENCES = os.path.join(ROOT, "paddle_llm", "assets", "preferences")

# file -> what its refusal must say (every line of it); files not listed are accepted
REFUSED = {
    "llama/flashmask/dpo.json": ["--greedy_zero_padding is not supported here (a row holds one pair"],
    "llama/flashmask/lora.json": ["--benchmark (PaddleNLP's throughput mode) is not supported here"],
    "llama/lokr_argument.json": ["--lokr: LoKr is not supported here", "--max_length 512 leaves no room for a reply after --src_length 512"],
    "llama/longlora_argument.json": ["--use_shift_sparse_attention: LongLoRA (shifted sparse attention) is not supported here"],
    "llama/vera_argument.json": ["--vera: VeRA is not supported here"],
}


def recipe_of(path: str) -> str:
    """The recipe PaddleNLP runs a file with, from its name: run_pretrain.py, run_dpo.py, else run_finetune.py."""
    name = os.path.basename(path)
    return "pretrain" if "pretrain" in name else "dpo" if "dpo" in name else "finetune"


def world_size_of(values: dict) -> int:
    degrees = [int(values.get(name, 1) or 1) for name in ("tensor_parallel_degree", "pipeline_parallel_degree", "sep_parallel_degree")]
    layout = degrees[0] * degrees[1] * degrees[2]
    return layout * max(1, int(values.get("sharding_parallel_degree", 1) or 1))


@pytest.fixture(scope="module")
def stand_in_models(tmp_path_factory) -> dict[str, str]:
    """The files' family directory name -> a tiny model of that family with weights, shaped by ``STAND_IN_SHAPE``."""
    saved = save_tiny_models(tmp_path_factory.mktemp("stand_ins"), {FAMILY[name]: shape for name, shape in STAND_IN_SHAPE.items()}, PYTHONPATH=ROOT)
    return {name: saved[family] for name, family in FAMILY.items()}


def stand_in_flags(relative: str, models: dict[str, str], data_prefix: str, output_dir: str) -> list[str]:
    model = models[relative.split("/")[0]]
    flags = ["--model_name_or_path", model, "--output_dir", output_dir, "--device", "cpu"]
    recipe = recipe_of(relative)
    if recipe == "pretrain":
        flags += ["--tokenizer_name_or_path", model, "--input_dir", data_prefix]
    elif recipe == "dpo":
        flags += ["--train_dataset_path", os.path.join(PREFERENCES, "train.jsonl"), "--dev_dataset_path", os.path.join(PREFERENCES, "dev.jsonl")]
    else:
        flags += ["--dataset_name_or_path", INSTRUCTIONS]
    return flags


def check_file(relative: str, models, data_prefix: str, output_dir: str) -> tuple[int, str, str, int]:
    from paddle_llm.tools import check

    path = os.path.join(ARG_FILES, relative)
    with open(path, encoding="utf-8") as f:
        world_size = world_size_of(json.load(f))
    out, err = io.StringIO(), io.StringIO()
    argv = ["--world_size", str(world_size), recipe_of(relative), path] + stand_in_flags(relative, models, data_prefix, output_dir)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = check.main(argv)
    return code, out.getvalue(), err.getvalue(), world_size


@needs_arg_files
def test_every_paddlenlp_argument_file_is_accepted_or_refused_by_name(stand_in_models, demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")  # check sets it for the recipe; restored after the test
    before = {relative: open(os.path.join(ARG_FILES, relative), "rb").read() for relative in FILES}
    table, problems = [], []
    for relative in FILES:
        code, out, err, world_size = check_file(relative, stand_in_models, demo_data, str(tmp_path / "out"))
        errors = [line.removeprefix("paddle-llm check: error: ") for line in err.splitlines() if line.startswith("paddle-llm check: error: ")]
        table.append(f"{relative:36} {recipe_of(relative):8} {world_size:2} proc  " + ("accepted" if code == 0 else "refused: " + " | ".join(errors)))
        if any("not a known flag" in e or "unknown flag" in e for e in errors):
            problems.append(f"{relative}: a PaddleNLP flag does not parse: {errors}")
        expected = REFUSED.get(relative)
        if expected is None and code != 0:
            problems.append(f"{relative}: expected OK, got {errors}")
        elif expected is not None and (code != 2 or sorted(expected) != sorted(next((e for e in errors if e.startswith(want)), want + " (missing)")[: len(want)] for want in expected) or len(errors) != len(expected)):
            problems.append(f"{relative}: expected exactly {expected}, got {errors}")
        elif expected is None and f"OK ({recipe_of(relative)})" not in out:
            problems.append(f"{relative}: no OK line in {out!r}")
    print("\n".join(["", "PaddleNLP llm/config file              recipe   world    check"] + table))
    assert not problems, "\n".join(problems)
    assert {relative: open(os.path.join(ARG_FILES, relative), "rb").read() for relative in FILES} == before  # inputs untouched
    assert len(FILES) == 33 and len(REFUSED) == 5


def test_run_finetune_py_is_paddlenlps_current_name_for_fine_tuning(tmp_path):
    result = run_script(["run_finetune.py", "--output_dir", str(tmp_path), "--device", "cpu", "--lazy", "true", "--eval_with_do_generation", "true"],
                        check=False, PYTHONPATH=ROOT)
    assert result.returncode == 2 and "paddle-llm finetune: error: --lazy keeps no records in memory" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# The files whose layout fits one process, each trained a few CPU steps: fine-tuning (full, LoRA, prefix) and
# LoRA DPO with --rslora_plus and --flash_mask (packed single-row pairs, through an explicit mask).
RUNS = ["qwen/sft_argument_0p5b.json", "llama/lora_argument.json", "chatglm2/pt_argument.json", "llama/dpo_lora_argument.json"]


@pytest.mark.slow
@needs_arg_files
@pytest.mark.parametrize("relative", RUNS)
def test_a_paddlenlp_argument_file_trains_on_cpu(relative, stand_in_models, demo_data, tmp_path):
    output_dir = str(tmp_path / "out")
    script = {"finetune": "run_finetune.py", "dpo": "run_dpo.py", "pretrain": "run_pretrain.py"}[recipe_of(relative)]
    flags = stand_in_flags(relative, stand_in_models, demo_data, output_dir)
    # a few steps, short rows and no per-step checkpoint: the file's own schedule is hours of GPU time
    steps = ["--max_steps", "2", "--save_strategy", "no", "--evaluation_strategy", "no", "--load_best_model_at_end", "false", "--do_eval", "false"]
    lengths = ["--max_seq_len", "256", "--max_prompt_len", "128"] if recipe_of(relative) == "dpo" else ["--src_length", "128", "--max_length", "256"]
    result = run_script([script, os.path.join(ARG_FILES, relative)] + flags + steps + lengths, PYTHONPATH=ROOT)
    losses = train_losses(output_dir)
    assert sorted(losses) == [1, 2], losses
    if relative == "llama/dpo_lora_argument.json":
        assert "--flash_mask: each pair is one row" in result.stdout + result.stderr  # PaddleNLP's packed pairs
        with open(os.path.join(output_dir, "lora_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        assert (config["rslora"], config["lora_plus_scale"], config["lora_alpha"], config["r"]) == (True, 4.0, 4, 64)


@pytest.mark.slow
@needs_arg_files
def test_a_pissa_run_of_a_paddlenlp_file_merges_onto_the_original_base(stand_in_models, demo_data, tmp_path):
    """PaddleNLP's LoRA file with ``--pissa true``: the saved adapter is an ordinary LoRA of rank 2r on the user's
    base, and ``paddle-llm merge-lora`` gives the same weights as ``--merge_weights`` at the end of training."""
    import paddle

    relative, output_dir = "qwen/lora_argument_0p5b.json", str(tmp_path / "out")
    flags = stand_in_flags(relative, stand_in_models, demo_data, output_dir)
    steps = ["--max_steps", "2", "--save_strategy", "no", "--evaluation_strategy", "no", "--load_best_model_at_end", "false", "--do_eval", "false"]
    run_script(["run_finetune.py", os.path.join(ARG_FILES, relative)] + flags + steps + ["--src_length", "128", "--max_length", "256", "--pissa", "true", "--merge_weights", "true"], PYTHONPATH=ROOT)
    with open(os.path.join(output_dir, "lora_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["pissa"]) == (16, 16, False)  # the file's rank 8, doubled
    merged = str(tmp_path / "merged")
    run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", stand_in_models["qwen"], "--lora_path", output_dir, "--output_path", merged], PYTHONPATH=ROOT)
    weights = [paddle.load(os.path.join(directory, "model_state.pdparams")) for directory in (merged, os.path.join(output_dir, "merged"))]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_allclose(weights[0][name].numpy(), weights[1][name].numpy(), atol=1e-5, err_msg=name)
