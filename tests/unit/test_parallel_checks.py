"""Every parallel-layout rule, one table row each; ``paddle-llm check``; ``paddle-llm convert-checkpoint``."""

import json
import os

import numpy as np
import pytest

from paddle_llm.config.presets import preset
from paddle_llm.config.validation import apply_cpu_fallbacks, check_parallel
from paddle_llm.files import OUTPUT_MARKER
from paddle_llm.trainer import convert_checkpoint as convert
from paddle_llm.trainer.checkpoint import checkpoint_problems, is_complete, mark_complete
from paddle_llm.tools import check
from tests.conftest import run_script

LLAMA = preset("tiny-llama")  # 4 heads, 4 KV heads, MLP 352, 2 layers, vocabulary 1024
CHATGLM2 = preset("tiny-chatglm2")  # 4 heads, 2 KV groups
BIG_VOCAB = dict(LLAMA, num_attention_heads=6, num_key_value_heads=6, intermediate_size=384, vocab_size=32000)

# rule -> (flag values, model fields, world size, pipeline model available, expected message)
RULES = {
    "unknown sharding word": ({"sharding": "stage4"}, LLAMA, 2, True, "unknown word 'stage4'; use stage1, stage2 or stage3"),
    "pipeline with sharding stage2": (
        {"pipeline_parallel_degree": 2, "sharding": "stage2", "gradient_accumulation_steps": 2}, LLAMA, 2, True,
        "--pipeline_parallel_degree 2 cannot be combined with --sharding stage2: PaddleNLP supports only stage1 sharding with pipeline parallel; use --sharding stage1",
    ),
    "pipeline with sharding stage3": (
        {"pipeline_parallel_degree": 2, "sharding": "stage3 offload", "gradient_accumulation_steps": 2}, LLAMA, 2, True, "cannot be combined with --sharding stage3 offload"
    ),
    "tensor parallel with sharding stage3": (
        {"tensor_parallel_degree": 2, "sharding": "stage3"}, LLAMA, 4, True, "--tensor_parallel_degree 2 cannot be combined with --sharding stage3"
    ),
    "sequence parallel without tensor parallel": (
        {"sequence_parallel": True}, LLAMA, 2, True, "--sequence_parallel splits activations across the tensor-parallel group: it needs --tensor_parallel_degree 2"
    ),
    "family without a pipeline model": (
        {"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 2}, LLAMA, 2, False, "this model family has no pipeline-parallel model"
    ),
    "degrees on one process": (
        {"tensor_parallel_degree": 2}, LLAMA, 1, True, "tensor_parallel_degree × pipeline_parallel_degree = 2 needs 2 processes but this run has 1"
    ),
    "world not divisible by tp × pp": (
        {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "gradient_accumulation_steps": 2}, LLAMA, 6, True,
        "world size 6 is not divisible by tensor_parallel_degree × pipeline_parallel_degree = 4: launch a multiple of 4 processes",
    ),
    "world not divisible by tp × pp × sep": (
        {"tensor_parallel_degree": 2, "sep_parallel_degree": 2}, LLAMA, 6, True, "tensor_parallel_degree × pipeline_parallel_degree × sep_parallel_degree = 4"
    ),
    "sharding degree does not divide the rest": (
        {"sharding_parallel_degree": 4, "sharding": "stage1"}, LLAMA, 2, True, "sharding_parallel_degree=4 does not divide the 2 data-parallel ranks"
    ),
    "heads": ({"tensor_parallel_degree": 3}, LLAMA, 3, True, "tensor_parallel_degree=3 does not divide num_attention_heads=4: use 1, 2, 4"),
    "KV heads": ({"tensor_parallel_degree": 4}, CHATGLM2, 4, True, "tensor_parallel_degree=4 does not divide num_key_value_heads=2: use 1, 2"),
    "MLP width": ({"tensor_parallel_degree": 3}, LLAMA, 3, True, "tensor_parallel_degree=3 does not divide ffn_hidden_size=352"),
    "vocabulary": ({"tensor_parallel_degree": 4}, dict(LLAMA, vocab_size=1001), 4, True, "tensor_parallel_degree=4 does not divide vocab_size=1001: use 1, 7, 11, 13"),
    "suggested degrees stay small": (
        {"tensor_parallel_degree": 4}, BIG_VOCAB, 4, True, "does not divide num_attention_heads=6: use 1, 2, 3, 6"
    ),
    "layers over stages": (
        {"pipeline_parallel_degree": 4, "gradient_accumulation_steps": 4}, LLAMA, 4, True,
        "num_layers=2 is not divisible by pipeline_parallel_degree × virtual_pp_degree = 4: use stages × virtual stages from 1, 2",
    ),
    "layers over virtual stages": (
        {"pipeline_parallel_degree": 2, "virtual_pp_degree": 2, "gradient_accumulation_steps": 2}, LLAMA, 2, True, "virtual_pp_degree = 4"
    ),
    "pipeline with a tied embedding": (
        {"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 2}, dict(LLAMA, tie_word_embeddings=True), 2, True,
        "--pipeline_parallel_degree 2 with tie_word_embeddings=true: PaddleNLP's pipeline keeps the tied embedding on the first and the last stage",
    ),
    "virtual stages without a pipeline": ({"virtual_pp_degree": 2}, LLAMA, 2, True, "--virtual_pp_degree 2 interleaves pipeline stages, which Paddle runs with 3 or more"),
    "virtual stages over two stages (Paddle asserts pp > 2)": (
        {"pipeline_parallel_degree": 2, "virtual_pp_degree": 2, "gradient_accumulation_steps": 2}, LLAMA, 2, True,
        "'virtual pipeline must run under pp degree > 2'): use --pipeline_parallel_degree 3 or more, or --virtual_pp_degree 1",
    ),
    "sharding offload on CPU (Paddle needs AMP)": (
        {"sharding": "stage2 offload", "device": "cpu"}, LLAMA, 2, True,
        "--sharding stage2 offload: Paddle offloads sharded optimizer state only under AMP/pure fp16 with Adam, AdamW or Momentum, and AMP has no CPU kernels",
    ),
    "sharding offload on GPU without AMP": ({"sharding": "stage2 offload", "device": "gpu"}, LLAMA, 2, True, "add --bf16 True (or --fp16 True), or drop offload"),
    "sep parallel (PaddleNLP calls alltoall in Paddle 2's argument order)": (
        {"sep_parallel_degree": 2, "device": "gpu"}, LLAMA, 2, True, "--sep_parallel_degree 2: PaddleNLP 3.0.0b4 reshards attention heads with paddle.distributed.alltoall(inputs, outputs)",
    ),
    "context parallel on CPU (it needs flash attention)": (
        {"context_parallel_degree": 2, "device": "cpu"}, LLAMA, 2, True, "--context_parallel_degree 2: PaddleNLP stops with 'Context parallel requires `use_flash_attention=True`'",
    ),
    "flash-mask kernel on GPU": ({"flash_mask": True, "device": "gpu"}, LLAMA, 1, True, "--flash_mask (PaddleNLP's flash-mask attention kernel"),
    "fewer micro-batches than stages": (
        {"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 1}, LLAMA, 2, True,
        "gradient_accumulation_steps=1 < pipeline_parallel_degree=2 leaves stages idle",
    ),
    "interleaved micro-batches not in rounds of stages": (
        {"pipeline_parallel_degree": 3, "virtual_pp_degree": 2, "gradient_accumulation_steps": 4}, dict(LLAMA, num_hidden_layers=6), 3, True,
        "gradient_accumulation_steps=4 must be a multiple of 3 (e.g. 3, 6, 9)",
    ),
}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_reports_what_to_change(rule):
    values, model, world_size, pipeline_supported, message = RULES[rule]
    errors = check_parallel(values, model, world_size, pipeline_supported=pipeline_supported)
    assert any(message in error for error in errors), errors


@pytest.mark.parametrize(
    "values, world_size",
    [
        ({}, 1),
        ({"sharding": "stage2"}, 1),  # the seed's 8-GPU command run on one device: PaddleNLP drops sharding, as documented
        ({"sharding": "stage2"}, 8),
        ({"tensor_parallel_degree": 2}, 2),
        ({"tensor_parallel_degree": 4}, 4),
        ({"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 2}, 2),
        ({"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "gradient_accumulation_steps": 16}, 4),
        ({"tensor_parallel_degree": 2, "sharding": "stage2"}, 4),
        ({"pipeline_parallel_degree": 2, "sharding": "stage1", "gradient_accumulation_steps": 4}, 4),
        ({"tensor_parallel_degree": 2, "sequence_parallel": True}, 2),
        ({"pipeline_parallel_degree": 2, "virtual_pp_degree": 1, "gradient_accumulation_steps": 3}, 2),
        ({"sharding": "stage2 offload", "device": "gpu", "bf16": True}, 8),
        ({"context_parallel_degree": 2, "device": "gpu", "use_flash_attention": True}, 2),
    ],
)
def test_the_seed_layouts_and_their_cpu_twins_pass(values, world_size):
    assert check_parallel(values, LLAMA, world_size) == []


def test_pipeline_on_cpu_switches_to_isend_irecv_once():
    values = {"device": "cpu", "pipeline_parallel_degree": 2, "pipeline_parallel_config": "disable_p2p_cache_shape"}
    warnings = apply_cpu_fallbacks(values)
    assert values["pipeline_parallel_config"] == "disable_p2p_cache_shape disable_batch_p2p_comm"
    assert any("disable_batch_p2p_comm" in w for w in warnings)
    assert apply_cpu_fallbacks(values) == []  # already there: no second warning
    gpu = {"device": "gpu", "pipeline_parallel_degree": 2, "pipeline_parallel_config": ""}
    apply_cpu_fallbacks(gpu)
    assert gpu["pipeline_parallel_config"] == ""  # GPU keeps fleet's batched p2p


# ---------------------------------------------------------------------------------------------------------------
# paddle-llm check
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, environ, recipe, world_size, rest",
    [
        (["--nproc_per_node", "4", "run_pretrain.py", "--max_steps", "3"], {}, "pretrain", 4, ["--max_steps", "3"]),
        (["--gpus", "0,1,2,3", "finetune_generation.py", "args.json"], {}, "finetune", 4, ["args.json"]),
        (["--nproc_per_node", "2", "llm/run_finetune.py", "args.json"], {}, "finetune", 2, ["args.json"]),  # PaddleNLP's current name
        (["--nnodes", "2", "--nproc_per_node=8", "pretrain"], {}, "pretrain", 16, []),
        (["--world_size", "6", "--log_dir", "log", "--tensor_parallel_degree", "2"], {}, "pretrain", 6, ["--tensor_parallel_degree", "2"]),
        (["--lora", "True", "--r", "8"], {}, "finetune", 1, ["--lora", "True", "--r", "8"]),
        (["--dataset_name_or_path=data"], {"PADDLE_TRAINERS_NUM": "2"}, "finetune", 2, ["--dataset_name_or_path=data"]),
        (["--master", "10.0.0.1:8090", "--nnodes", "2:4", "--rank", "1", "--devices", "0,1", "llm/run_pretrain.py"], {}, "pretrain", 4, []),
    ],
)
def test_check_splits_launcher_flags_from_recipe_flags(argv, environ, recipe, world_size, rest):
    request = check.split_command(argv, environ)
    assert (request.recipe.name, request.world_size, request.recipe_argv) == (recipe, world_size, rest)


def test_check_refuses_bad_launcher_values():
    with pytest.raises(ValueError, match="needs a value"):
        check.split_command(["--nproc_per_node"], {})
    with pytest.raises(ValueError, match="whole numbers"):
        check.split_command(["--nproc_per_node", "four"], {})


def test_layout_line_names_every_degree_and_the_global_batch():
    values = {"sharding": "stage2", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "tensor_parallel_degree": 2}
    assert check.describe_layout(values, 8) == (
        "8 processes: data 1 × sharding 4 × pipeline 1 × tensor 2 (sharding stage2); "
        "global batch 16 = 1 per device × 4 accumulation steps × 4 data-parallel ranks"
    )


@pytest.fixture
def clean_world_size(monkeypatch):
    # `check` sets the launcher's variable for the recipe; keep it from leaking into other tests
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")


def test_check_prints_ok_and_the_layout(clean_world_size, capsys, tmp_path):
    argv = ["--nproc_per_node", "8", "run_pretrain.py", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path), "--sharding", "stage2", "--device", "cpu"]
    assert check.main(argv) == 0
    out = capsys.readouterr().out
    assert "OK (pretrain): 8 processes: data 1 × sharding 8 × pipeline 1 × tensor 1 (sharding stage2)" in out


def test_check_prints_every_error_and_exits_2(clean_world_size, capsys, tmp_path):
    argv = ["--gpus", "0,1,2", "run_pretrain.py", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path), "--device", "cpu",
            "--tensor_parallel_degree", "3", "--pipeline_parallel_degree", "2", "--fp16_opt_level", "O2"]
    assert check.main(argv) == check.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    for message in ("world size 3 is not divisible", "does not divide num_attention_heads=4", "gradient_accumulation_steps=1 < pipeline_parallel_degree=2", "--fp16_opt_level O2 needs --fp16 or --bf16"):
        assert message in err, message


@pytest.mark.parametrize("continue_training, accepted", [("0", True), ("1", False)])
def test_pretraining_from_scratch_on_a_hugging_face_directory_may_split_it(clean_world_size, capsys, tmp_path, continue_training, accepted):
    # From scratch only the config is read, so "loads unsplit only" (the HF weights) does not apply.
    hf_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "hf", "llama3")
    argv = ["--nproc_per_node", "2", "run_pretrain.py", "--model_name_or_path", hf_dir, "--output_dir", str(tmp_path / "out"),
            "--device", "cpu", "--tensor_parallel_degree", "2", "--continue_training", continue_training]
    assert check.main(argv) == (0 if accepted else check.EXIT_BAD_CONFIG)
    assert ("loads unsplit only" in capsys.readouterr().err) is not accepted


def test_check_runs_the_finetune_rules(clean_world_size, capsys, tmp_path):
    argv = ["--nproc_per_node", "2", "finetune_generation.py", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path), "--device", "cpu",
            "--prefix_tuning", "True", "--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2"]
    assert check.main(argv) == check.EXIT_BAD_CONFIG
    assert "--prefix_tuning does not run with --pipeline_parallel_degree 2" in capsys.readouterr().err


def _write_unified_checkpoint(directory, shards: int) -> dict:
    """A synthetic unified checkpoint: model and optimizer tensors spread over ``shards`` files per kind."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for kind, names in (("model", ["a.weight", "b.weight", "c.weight"]), ("optimizer", ["a.weight/moment1_0", "b.weight/moment1_0"])):
        weight_map = {}
        for i, name in enumerate(names):
            shard = f"{kind}-{i % shards + 1:05d}-of-{shards:05d}.safetensors"
            weight_map[name] = shard
            tensors[name] = np.full((2, 3), i, dtype="float32")
        for shard in set(weight_map.values()):
            save_file({n: tensors[n] for n, s in weight_map.items() if s == shard}, os.path.join(directory, shard), metadata={"format": "np"})
        with open(os.path.join(directory, f"{kind}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "trainer_state.json"), "w") as f:
        f.write("{}")
    mark_complete(directory, 3)  # as every rank's save ends: the marker records each file's size and checksum
    return tensors


def test_check_refuses_resuming_a_multi_file_checkpoint_on_one_process(clean_world_size, capsys, tmp_path):
    checkpoint = str(tmp_path / "checkpoint-3")
    _write_unified_checkpoint(checkpoint, shards=2)
    flags = ["run_pretrain.py", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--resume_from_checkpoint", checkpoint]
    assert check.main(flags) == check.EXIT_BAD_CONFIG
    assert f"run `paddle-llm convert-checkpoint {checkpoint}` and resume from {checkpoint}-single" in capsys.readouterr().err
    assert check.main(["--nproc_per_node", "2"] + flags) == 0  # two processes read every file


def test_check_is_a_cli_subcommand(tmp_path):
    result = run_script(["-m", "paddle_llm.cli", "check", "--nproc_per_node", "4", "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path),
                         "--device", "cpu", "--tensor_parallel_degree", "3"], check=False)
    assert result.returncode == 2, result.stdout
    assert "paddle-llm check: error: world size 4 is not divisible by tensor_parallel_degree × pipeline_parallel_degree = 3" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# paddle-llm convert-checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_convert_merges_each_kind_into_one_file_and_copies_the_rest(tmp_path):
    from safetensors.numpy import load_file

    source, destination = str(tmp_path / "checkpoint-3"), str(tmp_path / "merged")
    tensors = _write_unified_checkpoint(source, shards=2)
    assert convert.single_device_resume_problem(source) is not None
    written = convert.merge_unified_checkpoint(source, destination)
    assert written == ["model-00001-of-00001.safetensors", "optimizer-00001-of-00001.safetensors"]
    assert sorted(os.listdir(destination)) == sorted(
        written + ["model.safetensors.index.json", "optimizer.safetensors.index.json", "trainer_state.json", "paddle_llm_complete.json",
                   OUTPUT_MARKER]
    )
    merged = {**load_file(os.path.join(destination, written[0])), **load_file(os.path.join(destination, written[1]))}
    assert sorted(merged) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(merged[name], value)
    assert convert.single_device_resume_problem(destination) is None
    assert is_complete(destination) and checkpoint_problems(destination) == []  # the merged files, recorded afresh


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_shard", "which is missing from"),
        ("not_unified", "it is not a unified checkpoint"),
    ],
)
def test_convert_errors_say_what_is_wrong(tmp_path, damage, message):
    source = str(tmp_path / "checkpoint-3")
    _write_unified_checkpoint(source, shards=2)
    destination = str(tmp_path / "out")
    if damage == "missing_shard":
        os.remove(os.path.join(source, "model-00002-of-00002.safetensors"))
    else:
        for name in os.listdir(source):
            if name.endswith(".index.json"):
                os.remove(os.path.join(source, name))
    with pytest.raises(convert.ConversionError, match=message):
        convert.merge_unified_checkpoint(source, destination)
    assert convert.main([source, "--output_dir", destination]) == 2
