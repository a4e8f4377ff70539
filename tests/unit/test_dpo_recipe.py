"""The DPO recipe's own rules: PaddleNLP run_dpo.py's adjustments, said out loud, and its checks."""

from __future__ import annotations

from paddle_llm.config.parser import parse_flags
from paddle_llm.trainer.dpo import _dataclass_types, adjust_like_run_dpo, check_dpo


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
    errors = check_dpo(values("--tensor_parallel_degree", "2", "--prefix_tuning", "True", "--ref_model_update_steps", "10"))
    assert any(e.startswith("--tensor_parallel_degree 2: DPO runs with data parallel and sharding here") for e in errors)
    assert "--prefix_tuning does not run with DPO: use --lora True, or full DPO" in errors
    assert any(e.startswith("--ref_model_update_steps is not supported here") for e in errors)
    assert check_dpo(values()) == []


def test_paddle_llm_check_runs_the_dpo_recipes_own_checks(capsys, monkeypatch):
    from paddle_llm.parallel.check import main

    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")  # check sets it for the recipe; restored after the test

    assert main(["--nproc_per_node", "2", "run_dpo.py", "--output_dir", "out", "--tensor_parallel_degree", "2", "--device", "cpu"]) == 2
    assert "paddle-llm check: error: --tensor_parallel_degree 2: DPO runs with data parallel and sharding here" in capsys.readouterr().err
    assert main(["--nproc_per_node", "2", "run_dpo.py", "--output_dir", "out", "--sharding", "stage2", "--device", "cpu"]) == 0
    assert "OK (dpo)" in capsys.readouterr().out
