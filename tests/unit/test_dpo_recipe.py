"""The DPO recipe's own rules: PaddleNLP run_dpo.py's adjustments, said out loud, and its checks."""

from __future__ import annotations

from paddle_llm.config.parser import parse_flags
from paddle_llm.recipes.dpo import _dataclass_types, adjust_like_run_dpo, check_dpo


def values(*flags: str) -> dict:
    return parse_flags(["--output_dir", "out", *flags], _dataclass_types()).as_dict()


def test_orpo_is_the_or_loss_with_the_sft_loss_and_no_reference():
    flags = values("--loss_type", "orpo")
    assert adjust_like_run_dpo(flags) == []  # orpo's reference_free is part of its definition, not a correction
    assert (flags["loss_type"], flags["reference_free"], flags["sft_loss_ratio"]) == ("or", True, 1.0)


def test_simpo_without_reference_free_is_corrected_with_a_warning():
    flags = values("--loss_type", "simpo")
    warnings = adjust_like_run_dpo(flags)
    assert flags["reference_free"] is True
    assert warnings == ["--loss_type simpo needs no reference model: --reference_free set to True (as PaddleNLP's run_dpo.py does)"]
    assert adjust_like_run_dpo(values("--loss_type", "sigmoid")) == []


def test_paddlenlp_defaults_lora_rank_8_and_lora_alpha_minus_one_mean_twice_the_rank():
    flags = values("--lora", "True", "--lora_alpha", "-1")
    assert flags["r"] == 8 and (flags["beta"], flags["max_seq_len"], flags["max_prompt_len"]) == (0.1, 4096, 2048)
    adjust_like_run_dpo(flags)
    assert flags["lora_alpha"] is None  # apply_lora's default: 2 x rank
    assert values("--lora_rank", "4")["r"] == 4


def test_parallel_layouts_dpo_cannot_run_are_refused_before_launch():
    errors = check_dpo(values("--pipeline_parallel_degree", "2", "--prefix_tuning", "True", "--ref_model_update_steps", "10", "--lora", "True"))
    assert "--pipeline_parallel_degree 2: DPO's micro-batches are cut by rows, so each pair must be one row: add --flash_mask True (packed pairs)" in errors
    assert any(e.startswith("--lora does not run with DPO under --pipeline_parallel_degree 2") for e in errors)
    assert check_dpo(values("--pipeline_parallel_degree", "2", "--flash_mask", "True")) == []
    assert check_dpo(values("--tensor_parallel_degree", "2")) == []  # proven equal to one process (test_parallel_equivalence.py)
    assert "--prefix_tuning does not run with DPO: use --lora True, or full DPO" in errors
    assert any(e.startswith("--ref_model_update_steps is not supported here") for e in errors)
    assert check_dpo(values()) == []


def test_paddle_llm_check_runs_the_dpo_recipes_own_checks(capsys, monkeypatch):
    from paddle_llm.tools.check import main

    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")  # check sets it for the recipe; restored after the test

    assert main(["--nproc_per_node", "2", "run_dpo.py", "--output_dir", "out", "--pipeline_parallel_degree", "2", "--device", "cpu"]) == 2
    assert "paddle-llm check: error: --pipeline_parallel_degree 2: DPO's micro-batches are cut by rows" in capsys.readouterr().err
    assert main(["--nproc_per_node", "2", "run_dpo.py", "--output_dir", "out", "--tensor_parallel_degree", "2", "--device", "cpu"]) == 0
    assert "OK (dpo)" in capsys.readouterr().out
    assert main(["--nproc_per_node", "2", "run_dpo.py", "--output_dir", "out", "--sharding", "stage2", "--device", "cpu"]) == 0
    assert "OK (dpo)" in capsys.readouterr().out


def test_paddlenlp_llama_dpo_args_file_parses_and_names_what_to_change_for_cpu(tmp_path, monkeypatch):
    """The fields of PaddleNLP's llm/config/llama/dpo_argument.json: every one is known; what cannot run here is
    named (the 8B model and the GPU-only switches), nothing else."""
    import json

    import pytest

    from paddle_llm.config.parser import ArgumentError
    from paddle_llm.recipes.dpo import setup

    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")
    paddlenlp_file = {
        "model_name_or_path": "tiny-llama", "train_dataset_path": "./data/train.jsonl", "dev_dataset_path": "./data/dev.jsonl",
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
        "per_device_eval_batch_size": 1, "num_train_epochs": 1, "max_steps": 100, "learning_rate": 1e-06, "warmup_steps": 10,
        "logging_steps": 1, "evaluation_strategy": "steps", "save_strategy": "steps", "eval_steps": 100, "save_steps": 500,
        "max_seq_len": 4096, "max_prompt_len": 2048, "bf16": True, "fp16_opt_level": "O2", "do_train": True, "do_eval": True,
        "disable_tqdm": True, "load_best_model_at_end": True, "tensor_parallel_degree": 8, "sharding": "stage1",
        "use_flash_attention": True, "flash_mask": True, "recompute": False, "recompute_granularity": "full", "beta": 0.1,
        "benchmark": False, "loss_type": "sigmoid", "label_smoothing": 0.0, "unified_checkpoint": True,
        "autotuner_benchmark": False, "lazy": False, "seed": 42,
    }
    args_file = tmp_path / "dpo_argument.json"
    args_file.write_text(json.dumps(paddlenlp_file))
    with pytest.raises(ArgumentError) as raised:
        setup([str(args_file), "--device", "cpu"])
    errors = str(raised.value).splitlines()
    assert not any("unknown" in e for e in errors), errors
    assert not any("DPO under tensor parallel" in e for e in errors), errors
    assert not any("flash_mask" in e for e in errors), errors  # on CPU it falls back to explicit masks, with a warning
    assert any(e.startswith("--train_dataset_path ./data/train.jsonl: no such file") for e in errors)
