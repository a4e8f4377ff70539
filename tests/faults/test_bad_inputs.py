"""Bad configs, data and checkpoint files: each ends with one clear message (the file and line, the flag, the field
or the tensor named, and what to do), a non-zero exit and no traceback, and leaves every input file as it was."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

from tests.conftest import DEMO_CORPUS, ROOT, run_script

FINETUNE = os.path.join(ROOT, "finetune_generation.py")


@pytest.fixture(autouse=True)
def launcher_environment(monkeypatch):
    """``paddle-llm check`` sets PADDLE_TRAINERS_NUM for the recipe it checks; restored after each test."""
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")


def hashes(*paths) -> dict[str, str]:
    """sha256 of every file at or under ``paths``: an input that a command wrote to shows up as a changed hash."""
    files = []
    for path in map(str, paths):
        if os.path.isdir(path):
            files += [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
        else:
            files.append(path)
    return {path: hashlib.sha256(open(path, "rb").read()).hexdigest() for path in sorted(files)}


def one_error_line(err: str, program: str) -> str:
    """The single ``paddle-llm <cmd>: error: ...`` line of a failed command's stderr; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{program}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def write_lines(path, *lines: bytes) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    return str(path)


# --- data files --------------------------------------------------------------------------------------------------

def test_preprocess_non_utf8_byte_names_file_line_and_column(tmp_path, capsys):
    from paddle_llm.data.preprocess import main

    corpus = write_lines(tmp_path / "corpus.jsonl", b'{"text": "fine"}', '{"text": "caf\u00e9"}'.encode("latin-1"))
    before = hashes(corpus)
    assert main(["--input_path", corpus, "--output_prefix", str(tmp_path / "out"), "--tokenizer_name_or_path", "tiny-llama", "--disable_tqdm"]) == 1
    line = one_error_line(capsys.readouterr().err, "paddle-llm preprocess")
    assert f"{corpus}:2: not UTF-8 text (byte 0xe9 at column 14); convert the file to UTF-8" in line
    assert hashes(corpus) == before and not os.path.exists(tmp_path / "out.bin")


def test_preprocess_walks_a_directory_like_paddlenlp(tmp_path, capsys):
    """Every .jsonl file in and below the directory, in sorted order; other files are skipped, each named."""
    from paddle_llm.data.indexed import read_indexed_dataset
    from paddle_llm.data.preprocess import main

    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    write_lines(corpus / "b" / "2.jsonl", b'{"text": "second"}', b'{"text": "third"}')
    write_lines(corpus / "a.jsonl", b'{"text": "first"}')
    write_lines(corpus / "notes.txt", b"not data")
    before = hashes(corpus)
    out = str(tmp_path / "data")
    assert main(["--input_path", str(corpus), "--output_prefix", out, "--tokenizer_name_or_path", "tiny-llama", "--disable_tqdm"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out.splitlines()[-1])["documents"] == 3
    assert f"preprocess: skipped {corpus / 'notes.txt'}: not a .jsonl file" in printed.err
    single = str(tmp_path / "single")
    assert main(["--input_path", str(corpus / "a.jsonl"), "--output_prefix", single, "--tokenizer_name_or_path", "tiny-llama", "--disable_tqdm"]) == 0
    assert list(read_indexed_dataset(out)[0]) == list(read_indexed_dataset(single)[0])  # a.jsonl comes first
    assert hashes(corpus) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--input_path", str(empty), "--output_prefix", str(tmp_path / "nothing"), "--tokenizer_name_or_path", "tiny-llama"]) == 1
    assert "a directory with no .jsonl file in it" in one_error_line(capsys.readouterr().err, "paddle-llm preprocess")


def test_dpo_preference_file_non_utf8_byte_names_file_and_line(tmp_path):
    from paddle_llm.data.jsonl import DataError
    from paddle_llm.data.preference import read_preferences

    pairs = write_lines(tmp_path / "train.jsonl", b'{"prompt": "q", "chosen": "a", "rejected": "b"}', b'{"prompt": "\xff"}')
    before = hashes(pairs)
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 text \(byte 0xff at column 13\)"):
        read_preferences(pairs)
    assert hashes(pairs) == before


@pytest.mark.slow  # a training process of its own
def test_finetune_non_utf8_record_is_one_line_without_traceback_end_to_end(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "train.json", b'{"src": "1+1=", "tgt": "2"}', '{"src": "2+2=", "tgt": "\u56db"}'.encode("gbk"))
    write_lines(data / "dev.json", b'{"src": "1+1=", "tgt": "2"}')
    before = hashes(data)
    result = run_script([FINETUNE, "--model_name_or_path", "tiny-llama", "--dataset_name_or_path", str(data), "--output_dir",
                         str(tmp_path / "out"), "--do_train", "--device", "cpu", "--max_steps", "1"], check=False)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "paddle-llm finetune")
    assert f"{data}/train.json:2: not UTF-8 text" in line
    assert hashes(data) == before


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """Three documents preprocessed with the shipped tokenizer: a data prefix."""
    from paddle_llm.data.preprocess import preprocess

    directory = tmp_path_factory.mktemp("small_data")
    corpus = write_lines(directory / "corpus.jsonl", b'{"text": "one two"}', b'{"text": "three"}', b'{"text": "four five six"}')
    return preprocess(corpus, str(directory / "data"), "tiny-llama", show_progress=False)["output_prefix"]


def damaged_copy(prefix: str, directory, damage) -> str:
    """A copy of ``prefix``'s .bin and .idx in ``directory``, its .idx bytes passed through ``damage``."""
    copy = str(directory / "damaged")
    with open(prefix + ".bin", "rb") as source, open(copy + ".bin", "wb") as target:
        target.write(source.read())
    with open(prefix + ".idx", "rb") as source, open(copy + ".idx", "wb") as target:
        target.write(damage(source.read()))
    return copy


@pytest.mark.parametrize("damage", [
    pytest.param(lambda index: index[:-5], id="truncated"),
    pytest.param(lambda index: index[:18] + (10**6).to_bytes(8, "little") + index[26:], id="corrupted-count"),
])
def test_damaged_idx_names_the_file_and_says_re_run_preprocess(small_data, tmp_path, damage):
    from paddle_llm.data.jsonl import DataError
    from paddle_llm.data.pretraining import check_data_prefixes

    prefix = damaged_copy(small_data, tmp_path, damage)
    before = hashes(tmp_path)
    with pytest.raises(DataError, match=rf"^{prefix}.idx: \d+ bytes, but its header describes .* the index is truncated or corrupt; re-run preprocess$"):
        check_data_prefixes([prefix], vocab_size=32000)
    assert hashes(tmp_path) == before


# --- model configs -----------------------------------------------------------------------------------------------

def model_dir_with(tmp_path, **fields) -> str:
    """A copy of tiny-llama's config.json (no weights) with ``fields`` changed."""
    from paddle_llm.config.presets import preset

    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**preset("tiny-llama"), **fields}, indent=2))
    return str(directory)


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": -128}, "hidden_size is -128; it must be a positive integer"),
    ({"hidden_size": "128"}, 'hidden_size is "128"; it must be a positive integer'),
    ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be a positive integer"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3}, "num_attention_heads 3 does not divide hidden_size 128"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
], ids=["negative", "string", "zero-heads", "heads-not-dividing", "kv-heads-not-dividing"])
def test_bad_config_sizes_are_refused_naming_the_config_file_and_field(tmp_path, capsys, fields, message):
    """Checked in resolve_model, which every command that reads a model goes through: estimate, check (and the
    training recipes), export, serve and merge-lora."""
    from paddle_llm.estimator.command import main as estimate
    from paddle_llm.tools.check import main as check

    model = model_dir_with(tmp_path, **fields)
    before = hashes(model)
    assert estimate(["--model_name_or_path", model]) == 2
    assert f"paddle-llm estimate: error: {model}/config.json: {message}" in one_error_line(capsys.readouterr().err, "paddle-llm estimate")
    assert check(["run_pretrain.py", "--model_name_or_path", model, "--output_dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert f"{model}/config.json: {message}" in one_error_line(capsys.readouterr().err, "paddle-llm check")
    assert hashes(model) == before


@pytest.mark.parametrize("flag, value", [("--num_gpus", "0"), ("--hidden_size", "-128"), ("--per_device_train_batch_size", "0"), ("--gpu_memory_gb", "0")])
def test_estimate_refuses_sizes_that_are_not_positive(capsys, flag, value):
    from paddle_llm.estimator.command import main as estimate

    with pytest.raises(SystemExit) as exited:
        estimate(["--num_params", "7B", flag, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"paddle-llm estimate: error: argument {flag}: {value} is not a positive" in err and "Traceback" not in err


# --- training flags ----------------------------------------------------------------------------------------------

def refused_by_check_and_pretrain(data: str, flags: list[str], capsys) -> tuple[str, str]:
    """``paddle-llm check run_pretrain.py FLAGS`` and ``paddle-llm pretrain FLAGS``: both exit 2 before anything
    trains; returns their error lines."""
    from paddle_llm.recipes.pretrain import RECIPE
    from paddle_llm.tools.check import main as check

    flags = ["--model_name_or_path", "tiny-llama", "--input_dir", data, "--max_steps", "1", "--device", "cpu", "--do_train", *flags]
    assert check(["run_pretrain.py", *flags]) == 2
    checked = one_error_line(capsys.readouterr().err, "paddle-llm check")
    assert RECIPE.main(flags) == 2
    err = capsys.readouterr().err
    assert "model: llama" not in err  # refused before the model was built
    return checked, one_error_line(err, "paddle-llm pretrain")


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "-1e-4"], "--learning_rate -0.0001: a learning rate cannot be negative"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be 1 or more"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be 1 or more"),
    (["--resume_from_checkpoint", ""], "--resume_from_checkpoint is empty: pass a checkpoint directory"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "--resume_from_checkpoint /nonexistent/checkpoint-5: no such directory"),
], ids=["negative-lr", "batch-0", "accumulation-0", "empty-resume", "missing-resume"])
def test_bad_training_numbers_are_refused_by_check_and_by_the_recipe(small_data, tmp_path, capsys, flags, message):
    checked, trained = refused_by_check_and_pretrain(small_data, ["--output_dir", str(tmp_path / "out"), *flags], capsys)
    assert message in checked and message in trained
    assert not os.path.exists(tmp_path / "out")


def test_empty_resume_directory_is_refused(small_data, tmp_path, capsys):
    empty = tmp_path / "checkpoint-5"
    empty.mkdir()
    checked, _ = refused_by_check_and_pretrain(small_data, ["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(empty)], capsys)
    assert f"--resume_from_checkpoint {empty}: the directory is empty, so there is nothing to resume" in checked


def test_output_dir_that_is_a_file_is_refused_and_left_alone(small_data, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("the user's notes")
    before = hashes(taken)
    checked, trained = refused_by_check_and_pretrain(small_data, ["--output_dir", str(taken)], capsys)
    assert f"--output_dir {taken}: is a file, not a directory" in checked and trained.endswith(checked.split("error: ", 1)[1])
    _, below = refused_by_check_and_pretrain(small_data, ["--output_dir", str(taken / "run")], capsys)
    assert f"--output_dir {taken / 'run'}: {taken} is a file, so the directory cannot be created there" in below
    assert hashes(taken) == before


def test_read_only_output_dir_is_refused(small_data, capsys):
    """/proc/sys is mounted read-only, for root too (the tests may run as root, for whom chmod changes nothing)."""
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    checked, _ = refused_by_check_and_pretrain(small_data, ["--output_dir", "/proc/sys/paddle_llm_run"], capsys)
    assert "--output_dir /proc/sys/paddle_llm_run: /proc/sys is read-only for this user; pass a directory you can write" in checked


# --- checkpoint files --------------------------------------------------------------------------------------------

HF_LLAMA3 = os.path.join(ROOT, "tests", "assets", "hf", "llama3")


def hf_copy(tmp_path, damage=None, **config_changes) -> str:
    """A copy of the Hugging Face llama3 fixture, its model.safetensors bytes passed through ``damage`` and its
    config.json fields changed."""
    directory = tmp_path / "hf"
    directory.mkdir()
    for name in os.listdir(HF_LLAMA3):
        with open(os.path.join(HF_LLAMA3, name), "rb") as f:
            data = f.read()
        if name == "model.safetensors" and damage:
            data = damage(data)
        if name == "config.json" and config_changes:
            data = json.dumps({**json.loads(data), **config_changes}).encode()
        (directory / name).write_bytes(data)
    return str(directory)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "past the end of the file (190088 bytes): the file is truncated"),
    (lambda data: (2**40).to_bytes(8, "little") + data[8:], "its header says it is 1099511627776 bytes long, but the file has 380176 bytes"),
], ids=["truncated", "header-length-2**40"])
def test_damaged_safetensors_is_refused_naming_the_file(tmp_path, capsys, damage, message):
    """Refused as the model is resolved, so before anything is built, by estimate and check alike."""
    from paddle_llm.estimator.command import main as estimate

    model = hf_copy(tmp_path, damage)
    before = hashes(model)
    assert estimate(["--model_name_or_path", model]) == 2
    line = one_error_line(capsys.readouterr().err, "paddle-llm estimate")
    assert f"{model}/model.safetensors: " in line and message in line
    assert hashes(model) == before


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    """tiny-llama with random weights, saved in PaddleNLP's layout (model_state.pdparams)."""
    import paddle

    from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model

    paddle.set_device("cpu")
    directory = str(tmp_path_factory.mktemp("saved") / "llama")
    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source), load_weights=False)
    model.save_pretrained(directory, safe_serialization=False)
    load_tokenizer("tiny-llama").save_pretrained(directory)
    assert os.path.isfile(os.path.join(directory, "model_state.pdparams"))
    return directory


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
    pytest.param(lambda data: os.urandom(len(data)), id="random"),
])
def test_damaged_pdparams_is_refused_naming_the_file(saved_llama, tmp_path, capsys, damage):
    from paddle_llm.peft.merge import main as merge_lora

    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(saved_llama):
        data = open(os.path.join(saved_llama, name), "rb").read()
        (model / name).write_bytes(damage(data) if name == "model_state.pdparams" else data)
    before = hashes(model)
    assert merge_lora(["--model_name_or_path", str(model), "--lora_path", str(tmp_path / "lora"), "--output_path", str(tmp_path / "merged")]) == 2
    line = one_error_line(capsys.readouterr().err, "paddle-llm merge-lora")
    assert f"{model}/model_state.pdparams: not a readable Paddle state dict, it is truncated or not a checkpoint" in line
    assert hashes(model) == before and not os.path.exists(tmp_path / "merged")


@pytest.mark.slow  # a training process of its own
def test_hf_tensor_of_the_wrong_shape_is_one_line_without_traceback_end_to_end(tmp_path):
    """The recipes' boundary (the spine's run_recipe) prints a checkpoint error as one line, exit code 2."""
    model = hf_copy(tmp_path, intermediate_size=96)
    data = tmp_path / "data"
    data.mkdir()
    write_lines(data / "train.json", b'{"src": "1+1=", "tgt": "2"}')
    write_lines(data / "dev.json", b'{"src": "1+1=", "tgt": "2"}')
    before = hashes(model, data)
    result = run_script([FINETUNE, "--model_name_or_path", model, "--dataset_name_or_path", str(data), "--output_dir",
                         str(tmp_path / "out"), "--do_train", "--device", "cpu", "--max_steps", "1"], check=False)
    assert result.returncode == 2
    line = one_error_line(result.stderr, "paddle-llm finetune")
    assert f"{model}/model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape [128, 64], but config.json makes 'llama.layers.0.mlp.down_proj.weight' [96, 64]" in line
    assert hashes(model, data) == before


def test_tokenizer_directory_without_its_model_file_names_the_missing_file(tmp_path, capsys):
    from paddle_llm.data.preprocess import main

    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    corpus = write_lines(tmp_path / "corpus.jsonl", b'{"text": "hello"}')
    before = hashes(tokenizer, corpus)
    assert main(["--input_path", corpus, "--output_prefix", str(tmp_path / "out"), "--tokenizer_name_or_path", str(tokenizer)]) == 1
    line = one_error_line(capsys.readouterr().err, "paddle-llm preprocess")
    assert f"{tokenizer}: the tokenizer is incomplete: missing sentencepiece.bpe.model, which LlamaTokenizer reads" in line
    assert hashes(tokenizer, corpus) == before


# --- records that read fine but teach nothing --------------------------------------------------------------------

def test_empty_sft_replies_are_counted_in_one_line_and_refused_with_strict_data(tmp_path):
    from paddle_llm.data.jsonl import DataError
    from paddle_llm.data.sft import read_records

    rows = [b'{"src": "1+1=", "tgt": "2"}'] + [b'{"src": "q", "tgt": " "}'] * 7
    path = write_lines(tmp_path / "train.json", *rows)
    before = hashes(path)
    read = read_records(path)
    assert len(read.records) == 8
    shown = ", ".join(f"{path}:{line}" for line in range(2, 7))
    assert read.questionable == (f"{path}: 7 records with an empty reply, which train only the end-of-reply token ({shown}, ...); "
                                 "pass --strict_data to make this an error")
    with pytest.raises(DataError, match=r"7 records with an empty reply.*; fix or remove them, or drop --strict_data"):
        read_records(path, strict_data=True)
    assert read_records(write_lines(tmp_path / "fine.json", rows[0])).questionable is None
    assert hashes(path) == before


def test_dpo_pairs_with_chosen_equal_to_rejected_are_counted_and_refused_with_strict_data(tmp_path):
    from paddle_llm.data.jsonl import DataError
    from paddle_llm.data.preference import read_preferences

    path = write_lines(tmp_path / "train.jsonl", b'{"prompt": "q", "chosen": "a", "rejected": "b"}',
                       b'{"prompt": "q", "chosen": "same", "rejected": "same "}')
    before = hashes(path)
    assert read_preferences(path).questionable == (
        f"{path}: 1 pairs whose chosen and rejected replies are the same, which teach no preference ({path}:2); "
        "pass --strict_data to make this an error")
    with pytest.raises(DataError, match=rf"^{path}: 1 pairs whose chosen and rejected .*; fix or remove them"):
        read_preferences(path, strict_data=True)
    assert hashes(path) == before


@pytest.mark.parametrize("recipe", ["finetune", "dpo"])
def test_strict_data_is_in_the_recipes_help(capsys, recipe):
    from paddle_llm.cli import main

    assert main([recipe, "--help"]) == 0
    assert "--strict_data" in capsys.readouterr().out
