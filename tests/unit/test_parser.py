"""Flag parsing: PaddleNLP's flag names, JSON args files, booleans, aliases and unknown flags."""

import json
import os
import shlex

import pytest

from paddle_llm.config.parser import ArgumentError, parse_flags


def pretrain_types() -> tuple[type, ...]:
    """run_pretrain.py's argument dataclasses; imported when a test runs (they load PaddleNLP), not at collection."""
    from paddle_llm.config.arguments import DataArguments, ModelArguments, PretrainingArguments

    return ModelArguments, DataArguments, PretrainingArguments


SEED_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "seed_run_pretrain.sh")


def seed_pretrain_args() -> list[str]:
    """The seed's run_pretrain.py flags exactly as bash would pass them (line continuations joined)."""
    with open(SEED_SCRIPT, encoding="utf-8") as f:
        text = f.read().replace("\\\n", "")
    line = next(line for line in text.splitlines() if "run_pretrain.py" in line)
    tokens = shlex.split(line)
    return tokens[tokens.index("run_pretrain.py") + 1 :]


def test_seed_command_parses_with_every_flag():
    parsed = parse_flags(seed_pretrain_args(), pretrain_types())
    assert parsed.value("sharding") == "stage2"
    assert parsed.value("fp16") is True and parsed.value("fp16_opt_level") == "O2"
    assert parsed.value("use_flash_attention") is True and parsed.value("use_fused_rms_norm") is False
    assert parsed.value("continue_training") is True and parsed.value("recompute") is True
    assert parsed.value("disable_tqdm") is True
    assert parsed.value("report_to") == ["visualdl"]
    assert parsed.value("max_steps") == 10000 and parsed.value("learning_rate") == pytest.approx(1e-5)
    # "--logging_steps 20\" + newline + "--dataloader_num_workers" reaches us as one token; both flags survive
    assert parsed.value("logging_steps") == 20 and parsed.value("dataloader_num_workers") == 1


def test_json_args_file_with_command_line_overrides(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"output_dir": "out", "max_steps": 5, "learning_rate": 0.1, "do_train": True}))
    parsed = parse_flags([str(args_file), "--max_steps", "7"], pretrain_types())
    assert parsed.value("max_steps") == 7  # the command line wins
    assert parsed.value("learning_rate") == pytest.approx(0.1)
    assert parsed.value("do_train") is True
    assert {"max_steps", "learning_rate", "do_train", "output_dir"} <= parsed.explicit


@pytest.mark.parametrize("word, expected", [("1", True), ("0", False), ("true", True), ("False", False), ("True", True)])
def test_boolean_words(word, expected):
    assert parse_flags(["--output_dir", "o", "--recompute", word], pretrain_types()).value("recompute") is expected


def test_bare_boolean_flag_means_true_and_equals_form():
    parsed = parse_flags(["--output_dir=o", "--do_train", "--fp16", "--max_steps=3"], pretrain_types())
    assert parsed.value("do_train") is True and parsed.value("fp16") is True and parsed.value("max_steps") == 3


def test_aliases_map_to_paddlenlp_names():
    parsed = parse_flags(["--output_dir", "o", "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2", "--sharding_degree", "2"], pretrain_types())
    assert parsed.value("tensor_parallel_degree") == 2 and parsed.value("pipeline_parallel_degree") == 2
    assert parsed.value("sharding_degree") == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", "o", "--learning_rte", "1"], "unknown flag --learning_rte; did you mean --learning_rate?"),
        (["--output_dir", "o", "--max_steps", "abc"], "--max_steps takes an integer, got 'abc'"),
        (["--output_dir", "o", "--fp16", "maybe"], "--fp16 takes a boolean"),
        (["--output_dir", "o", "--max_steps", "1", "2"], "--max_steps takes one value"),
        (["--do_train"], "--output_dir is required"),
        (["stray", "--output_dir", "o"], "unexpected argument 'stray'"),
    ],
)
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(ArgumentError, match=message.replace("?", r"\?").replace("(", r"\(")):
        parse_flags(argv, pretrain_types())


def test_bad_args_file_names_file_and_line(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text('{\n  "output_dir": "o",\n  "max_steps": ,\n}')
    with pytest.raises(ArgumentError, match=rf"{args_file}:3: not valid JSON"):
        parse_flags([str(args_file)], pretrain_types())
    args_file.write_text('{"output_dir": "o", "max_stpes": 3}')
    with pytest.raises(ArgumentError, match="'max_stpes' is not a known flag; did you mean --max_steps"):
        parse_flags([str(args_file)], pretrain_types())


def test_help_lists_every_flag_with_its_default():
    from paddle_llm.config.parser import format_help

    text = format_help(pretrain_types(), "usage: x")
    for flag in ("--input_dir (str, default None)", "--split (str, default 949,50,1)", "--max_steps", "--sharding", "--use_flash_attention"):
        assert flag in text, flag
