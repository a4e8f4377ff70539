"""Issue 22A: a user's path is sacred, and one writer per output directory.

Each case points a command's output at something it must not touch (an input, its parent, a directory someone
else wrote, a directory another run is writing) and checks the exit code, the message, and that every input file
and every pre-existing output file is byte-for-byte unchanged. The refusals happen in validation, so the commands
run in-process; only the lock's holder is a second real process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from paddle_llm.files import LOCK_FILE, OUTPUT_MARKER, OutputLock, OutputPathError
from tests.conftest import DEMO_CORPUS, ROOT, RUN_PRETRAIN, run_script, subprocess_env

HF_LLAMA = os.path.join(ROOT, "tests", "assets", "hf", "llama3")
INSTRUCTIONS = os.path.join(ROOT, "paddle_llm", "assets", "instructions")
PREFERENCES = os.path.join(ROOT, "paddle_llm", "assets", "preferences")


def tree_hash(path: str) -> dict[str, str]:
    """Relative path -> sha256 of every file (and the target of every symlink) under ``path``, and every directory:
    two equal results mean nothing in the tree was added, removed or changed."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    found = {}
    for directory, subdirectories, files in os.walk(path):
        relative = os.path.relpath(directory, path)
        found[relative + "/"] = "dir"
        for name in files + [d for d in subdirectories if os.path.islink(os.path.join(directory, d))]:
            full = os.path.join(directory, name)
            if os.path.islink(full):
                found[os.path.join(relative, name)] = "-> " + os.readlink(full)
            else:
                with open(full, "rb") as f:
                    found[os.path.join(relative, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


class Unchanged:
    """``with Unchanged(a, b): ...`` fails if any file or directory under ``a`` or ``b`` changed inside the block."""

    def __init__(self, *paths):
        self.paths = [str(p) for p in paths]

    def __enter__(self):
        self.before = {p: tree_hash(p) for p in self.paths}
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            for path in self.paths:
                assert tree_hash(path) == self.before[path], f"{path} changed"


def user_model(tmp_path, with_run: bool = False) -> str:
    """A copy of the Hugging Face Llama fixture, optionally with what a pretraining run and its user left in it."""
    model = str(tmp_path / "base")
    shutil.copytree(HF_LLAMA, model)
    if with_run:
        os.makedirs(os.path.join(model, "checkpoint-200"))
        with open(os.path.join(model, "checkpoint-200", "paddle_llm_complete.json"), "w") as f:
            json.dump({"step": 200}, f)
        for name in ("metrics.jsonl", "report.html", "NOTES.txt"):
            with open(os.path.join(model, name), "w") as f:
                f.write(f"the user's {name}\n")
    return model


def fake_adapter(tmp_path) -> str:
    """An adapter directory: the refusals come before it is read."""
    adapter = str(tmp_path / "adapter")
    os.makedirs(adapter)
    with open(os.path.join(adapter, "lora_config.json"), "w") as f:
        json.dump({"r": 4}, f)
    return adapter


def corpus_in(directory) -> str:
    os.makedirs(directory, exist_ok=True)
    return shutil.copy(DEMO_CORPUS, os.path.join(directory, "corpus.jsonl"))


# -- merge-lora ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["base", "parent", "inside_adapter"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_lora_refuses_an_output_overlapping_its_inputs(tmp_path, capsys, where, overwrite):
    from paddle_llm.peft import merge

    model, adapter = user_model(tmp_path, with_run=True), fake_adapter(tmp_path)
    output = {"base": model, "parent": str(tmp_path), "inside_adapter": os.path.join(adapter, "merged")}[where]
    relation = {"base": "is", "parent": "contains", "inside_adapter": "is inside"}[where]
    with Unchanged(tmp_path):
        code = merge.main(["--model_name_or_path", model, "--lora_path", adapter, "--output_path", output] + ["--overwrite"] * overwrite)
    assert code == 2
    assert f"--output_path {output} {relation} the input" in capsys.readouterr().err


def test_merge_lora_refuses_a_directory_it_did_not_write_naming_overwrite(tmp_path, capsys):
    from paddle_llm.peft import merge

    model, adapter, output = user_model(tmp_path), fake_adapter(tmp_path), tmp_path / "merged"
    output.mkdir()
    (output / "NOTES.txt").write_text("mine")
    with Unchanged(tmp_path):
        code = merge.main(["--model_name_or_path", model, "--lora_path", adapter, "--output_path", str(output)])
    assert code == 2
    err = capsys.readouterr().err
    assert "paddle-llm merge-lora did not write (NOTES.txt)" in err and "--overwrite" in err


def test_overlap_follows_symlinks(tmp_path, capsys):
    from paddle_llm.peft import merge

    model, adapter = user_model(tmp_path, with_run=True), fake_adapter(tmp_path)
    os.symlink(model, tmp_path / "link")
    with Unchanged(tmp_path):
        code = merge.main(["--model_name_or_path", model, "--lora_path", adapter, "--output_path", str(tmp_path / "link")])
    assert code == 2
    assert "is the input --model_name_or_path" in capsys.readouterr().err


# -- export --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["paddle", "fastdeploy", "hf"])
@pytest.mark.parametrize("where", ["model", "parent"])
def test_export_refuses_an_output_overlapping_the_model(tmp_path, capsys, output_format, where):
    from paddle_llm.export import command

    model = user_model(tmp_path, with_run=True)
    output = model if where == "model" else str(tmp_path)
    with Unchanged(tmp_path):
        code = command.main(["--model_name_or_path", model, "--output_path", output, "--format", output_format, "--overwrite"])
    assert code == 2
    assert f"--output_path {output} {'is' if where == 'model' else 'contains'} the input --model_name_or_path" in capsys.readouterr().err


def test_export_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    from paddle_llm.export import command

    model, output = user_model(tmp_path), tmp_path / "export"
    output.mkdir()
    (output / "results.csv").write_text("1,2\n")
    with Unchanged(tmp_path):
        assert command.main(["--model_name_or_path", model, "--output_path", str(output)]) == 2
    assert "paddle-llm export did not write (results.csv)" in capsys.readouterr().err


# -- tokenizer train and preprocess --------------------------------------------------------------------------------


def test_tokenizer_train_refuses_an_output_holding_its_corpus(tmp_path, capsys):
    from paddle_llm.data import tokenizer

    corpus = corpus_in(tmp_path / "data")
    with Unchanged(tmp_path):
        code = tokenizer.main(["train", "--input", corpus, "--vocab_size", "600", "--output", str(tmp_path / "data"), "--overwrite"])
    assert code == 2
    assert f"--output {tmp_path / 'data'} contains the input --input {corpus}" in capsys.readouterr().err


def test_tokenizer_train_replaces_only_its_own_output(tmp_path, capsys):
    from paddle_llm.data import tokenizer

    output = tmp_path / "tok"
    output.mkdir()
    (output / "NOTES.txt").write_text("mine")
    train = ["train", "--input", DEMO_CORPUS, "--vocab_size", "600", "--output", str(output)]
    with Unchanged(tmp_path):
        assert tokenizer.main(train) == 2
    assert "--output" in (err := capsys.readouterr().err) and "--overwrite" in err and "NOTES.txt" in err
    assert tokenizer.main(train + ["--overwrite"]) == 0
    assert not (output / "NOTES.txt").exists() and json.loads((output / OUTPUT_MARKER).read_text())["command"] == "tokenizer train"
    assert tokenizer.main(train) == 0  # its own previous output: replaced without asking


def test_preprocess_refuses_an_output_inside_the_tokenizer_or_over_existing_data(tmp_path, capsys):
    from paddle_llm.data import preprocess

    corpus = corpus_in(tmp_path / "data")
    tokenizer = shutil.copytree(os.path.join(ROOT, "paddle_llm", "assets", "tokenizer"), tmp_path / "tok")
    (tmp_path / "data" / "corpus.bin").write_bytes(b"someone's data")
    (tmp_path / "data" / "corpus.idx").write_bytes(b"someone's index")
    base = ["--input_path", corpus, "--tokenizer_name_or_path", str(tokenizer), "--disable_tqdm", "--overwrite"]
    with Unchanged(tmp_path):
        assert preprocess.main(base + ["--output_prefix", str(tokenizer / "data")]) == 1
        assert "is inside the input --tokenizer_name_or_path" in capsys.readouterr().err
        assert preprocess.main(base[:-1] + ["--output_prefix", str(tmp_path / "data" / "corpus")]) == 1
        assert "corpus.bin exists already" in (err := capsys.readouterr().err) and "--overwrite" in err


# -- convert-checkpoint --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["checkpoint", "parent"])
def test_convert_checkpoint_refuses_an_output_overlapping_the_checkpoint(tmp_path, capsys, where):
    from paddle_llm.trainer import convert_checkpoint as convert

    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    output = checkpoint if where == "checkpoint" else tmp_path / "out"
    with Unchanged(tmp_path):
        assert convert.main([str(checkpoint), "--output_dir", str(output), "--overwrite"]) == 2
    assert f"--output_dir {output} {'is' if where == 'checkpoint' else 'contains'} the input CHECKPOINT" in capsys.readouterr().err


# -- training recipes ----------------------------------------------------------------------------------------------


def finetune_flags(model: str, output_dir: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--dataset_name_or_path", INSTRUCTIONS, "--output_dir", output_dir,
            "--device", "cpu", "--max_steps", "1", "--do_train", *extra]


@pytest.mark.parametrize("with_run", [False, True], ids=["model_dir", "model_dir_with_pretraining_checkpoint"])
def test_full_finetuning_into_the_model_directory_is_refused(tmp_path, capsys, with_run):
    from paddle_llm.recipes import finetune

    model = user_model(tmp_path, with_run=with_run)
    with Unchanged(tmp_path):
        assert finetune.RECIPE.main(finetune_flags(model, model, "--overwrite_output_dir")) == 2
    err = capsys.readouterr().err
    assert f"paddle-llm finetune: error: --output_dir {model} is the input --model_name_or_path {model}" in err
    assert "Pick an --output_dir outside every input" in err


def test_full_dpo_into_the_model_directory_is_refused(tmp_path, capsys):
    from paddle_llm.recipes import dpo

    model = user_model(tmp_path)
    flags = ["--model_name_or_path", model, "--train_dataset_path", os.path.join(PREFERENCES, "train.jsonl"),
             "--dev_dataset_path", os.path.join(PREFERENCES, "dev.jsonl"), "--output_dir", os.path.join(model, "dpo"),
             "--device", "cpu", "--max_steps", "1", "--do_train"]
    with Unchanged(tmp_path):
        assert dpo.RECIPE.main(flags) == 2
    assert f"--output_dir {os.path.join(model, 'dpo')} is inside the input --model_name_or_path" in capsys.readouterr().err


def test_pretraining_into_the_data_directory_is_refused(tmp_path, capsys):
    from paddle_llm.recipes import pretrain

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.bin").write_bytes(b"tokens")
    (data / "corpus.idx").write_bytes(b"index")
    flags = ["--model_name_or_path", "tiny-llama", "--input_dir", str(data / "corpus"), "--output_dir", str(data),
             "--device", "cpu", "--max_steps", "1", "--do_train", "--overwrite_output_dir"]
    with Unchanged(tmp_path):
        assert pretrain.RECIPE.main(flags) == 2
    assert f"--output_dir {data} contains the input --input_dir {data / 'corpus.bin'}" in capsys.readouterr().err


def test_a_run_resumes_a_checkpoint_inside_its_output_dir_but_never_writes_inside_one(tmp_path, capsys):
    from paddle_llm.recipes import pretrain

    output = tmp_path / "out"
    checkpoint = output / "checkpoint-8"
    checkpoint.mkdir(parents=True)
    (checkpoint / "paddle_llm_complete.json").write_text(json.dumps({"step": 8}))
    flags = ["--model_name_or_path", "tiny-llama", "--input_dir", DEMO_CORPUS, "--device", "cpu", "--max_steps", "9",
             "--do_train", "--resume_from_checkpoint", str(checkpoint)]
    pretrain.setup(flags + ["--output_dir", str(output)])  # the usual resume: accepted
    with Unchanged(tmp_path):
        assert pretrain.RECIPE.main(flags + ["--output_dir", str(checkpoint / "next")]) == 2
    assert f"--output_dir {checkpoint / 'next'} is inside the input --resume_from_checkpoint {checkpoint}" in capsys.readouterr().err


def test_check_runs_the_same_refusal_before_a_launch(tmp_path, capsys):
    from paddle_llm.tools import check

    model = user_model(tmp_path, with_run=True)
    with Unchanged(tmp_path):
        assert check.main(["finetune_generation.py"] + finetune_flags(model, model)) == 2
    assert f"--output_dir {model} is the input --model_name_or_path" in capsys.readouterr().err


def test_training_into_someone_elses_directory_needs_overwrite_output_dir(tmp_path, capsys):
    from paddle_llm.recipes import finetune

    output = tmp_path / "out"
    output.mkdir()
    (output / "NOTES.txt").write_text("mine")
    with Unchanged(tmp_path):
        assert finetune.RECIPE.main(finetune_flags("tiny-llama", str(output))) == 2
    err = capsys.readouterr().err
    assert "paddle-llm finetune did not write (NOTES.txt)" in err and "--overwrite_output_dir" in err
    # with the flag, or when an earlier finetune run marked it, validation accepts it
    finetune.setup(finetune_flags("tiny-llama", str(output), "--overwrite_output_dir"))
    (output / "NOTES.txt").unlink()
    (output / OUTPUT_MARKER).write_text(json.dumps({"command": "finetune"}))
    (output / "metrics.jsonl").write_text("")
    finetune.setup(finetune_flags("tiny-llama", str(output)))


def test_the_launchers_log_dir_inside_output_dir_is_not_the_users(tmp_path, capsys, monkeypatch):
    """``python -m paddle.distributed.launch --log_dir OUT/log ... --output_dir OUT``: the launchers (one per node)
    write their logs before any worker starts; they are no user's files. This launch's is PADDLE_LOG_DIR; another
    node's holds workerlog.N files, or is still empty."""
    from paddle_llm.recipes import finetune

    output = tmp_path / "out"
    (output / "log_node0").mkdir(parents=True)
    (output / "log_node0" / "envlog.0").write_text("launcher")
    (output / "log_node1").mkdir()
    (output / "log_node1" / "workerlog.1").write_text("launcher")
    (output / "log_node2").mkdir()
    with Unchanged(tmp_path):
        assert finetune.RECIPE.main(finetune_flags("tiny-llama", str(output))) == 2  # log_node0 is not known as a log
        assert "did not write (log_node0)" in capsys.readouterr().err
        monkeypatch.setenv("PADDLE_LOG_DIR", str(output / "log_node0"))
        finetune.setup(finetune_flags("tiny-llama", str(output)))
    (output / "NOTES.txt").write_text("mine")
    with Unchanged(tmp_path):
        assert finetune.RECIPE.main(finetune_flags("tiny-llama", str(output))) == 2  # the user's own file still counts
        assert "did not write (NOTES.txt)" in capsys.readouterr().err


# -- one writer per output directory -------------------------------------------------------------------------------


HOLD_LOCK = (
    "import sys, time\n"
    "from paddle_llm.files import OutputLock\n"
    "OutputLock(sys.argv[1]).acquire(print)\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_run_into_a_locked_directory_is_refused_and_the_lock_goes_with_its_holder(tmp_path, capsys):
    from paddle_llm.recipes import finetune

    output = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(PYTHONPATH=ROOT), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Unchanged(tmp_path):
            assert finetune.RECIPE.main(finetune_flags("tiny-llama", str(output))) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {output} is in use by another run (pid {holder.pid} on {socket.gethostname()}, started " in err
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGTERM  # still killed by the signal, as without the lock
    assert not (output / LOCK_FILE).exists()  # released on SIGTERM


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "yesterday"}))
    warnings = []
    lock = OutputLock(str(tmp_path))
    lock.acquire(warnings.append)
    assert f"taking over the lock of pid {dead.pid}" in warnings[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(OutputPathError, match=f"pid {os.getpid()}"):
        OutputLock(str(tmp_path)).acquire(warnings.append)  # held by a live process: refused
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "today"}))
    with Unchanged(tmp_path), pytest.raises(OutputPathError, match="pid 1 on elsewhere, started today.*delete the lock file"):
        OutputLock(str(tmp_path)).acquire(print)


def test_a_finished_run_releases_its_lock_and_marks_its_directory(tmp_path):
    from paddle_llm.recipes import spine
    from paddle_llm.recipes.finetune import setup

    output = tmp_path / "out"
    plan = setup(finetune_flags("tiny-llama", str(output)))
    lock = spine.hold_output_dir(plan, "finetune")
    assert json.loads((output / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(os.listdir(output)) == [OUTPUT_MARKER]
    assert json.loads((output / OUTPUT_MARKER).read_text())["command"] == "finetune"


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    from paddle_llm.recipes import spine
    from paddle_llm.recipes.finetune import setup

    output = tmp_path / "out"
    plan = setup(finetune_flags("tiny-llama", str(output)))
    held = spine.hold_output_dir(plan, "finetune")  # rank 0 of this launch
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    try:
        assert spine.hold_output_dir(plan, "finetune") is None  # rank 1 neither takes nor refuses it
        setup(finetune_flags("tiny-llama", str(output)))  # nor does its validation object to rank 0's lock and marker
    finally:
        held.release()


@pytest.mark.slow
def test_a_two_process_launch_locks_on_rank_zero_only_and_releases_at_the_end(demo_data, tmp_path):
    """Real ``paddle.distributed.launch``: rank 1 validates and trains beside rank 0's lock and marker, the lock is
    gone when the run ends, and the same command then resumes the run it marked instead of refusing it."""
    output = tmp_path / "out"
    command = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"), RUN_PRETRAIN,
               "--model_name_or_path", "tiny-llama", "--input_dir", demo_data, "--output_dir", str(output), "--device", "cpu",
               "--max_steps", "2", "--save_steps", "2", "--max_seq_length", "64", "--per_device_train_batch_size", "2",
               "--do_train", "--report_to", "none", "--disable_tqdm", "1"]
    run_script(command, PYTHONPATH=ROOT)
    assert not (output / LOCK_FILE).exists()
    assert json.loads((output / OUTPUT_MARKER).read_text())["command"] == "pretrain"
    run_script(command + ["--max_steps", "3", "--save_steps", "3"], PYTHONPATH=ROOT)
    assert f"resuming from {output / 'checkpoint-2'}" in (tmp_path / "log" / "workerlog.0").read_text()
    assert not (output / LOCK_FILE).exists()


# -- doctor --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "read_only_mount"])
def test_doctor_fails_an_output_dir_it_cannot_write(tmp_path, capsys, kind):
    from paddle_llm.tools import doctor

    if kind == "file":
        output = tmp_path / "out"
        output.write_text("a file")
        problem = f"{output} is a file, not a directory"
    else:
        output = "/proc/self/out"  # /proc takes no new files, even from root (chmod would not stop root)
        problem = "/proc/self is not writable"
    with Unchanged(tmp_path):
        code = doctor.main(["--json", "--output_dir", str(output)])
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert code == doctor.EXIT_BLOCKED
    assert rows["output dir"]["status"] == "FAIL" and problem in rows["output dir"]["found"]
    assert "--output_dir you can write to" in rows["output dir"]["fix"]
