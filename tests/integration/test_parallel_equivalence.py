"""Hybrid parallel on CPU processes computes the same model as one process.

Every layout trains the tiny model for 5 steps from the same saved weights, on the same data, with the same global
batch, and must reproduce the single-process run's per-step loss and gradient norm within 1e-5 relative (fp32).
Checkpoints move between layouts: saved under tensor parallel or sharding stage 2 and resumed on one process, and
the reverse, training continues exactly as an uninterrupted run would. Data parallel alone is covered by
``test_pretrain.py::test_data_parallel_two_processes_match_one_process``.
"""

from __future__ import annotations

import os
import textwrap

import pytest

from paddle_llm.tools.equivalence import Run, command_line, compare_runs, steps
from tests.conftest import RUN_PRETRAIN, ROOT, run_script
from tests.integration.test_pretrain import pretrain_flags

# Every test launches two or four training processes.
pytestmark = pytest.mark.slow

FINETUNE = os.path.join(ROOT, "finetune_generation.py")
RUN_DPO = os.path.join(ROOT, "run_dpo.py")
INSTRUCTIONS = os.path.join(ROOT, "paddle_llm", "assets", "instructions")
PREFERENCES = os.path.join(ROOT, "paddle_llm", "assets", "preferences")
STEPS = 5
# tiny-llama with 8 layers, so 4 pipeline stages x 2 virtual stages hold one layer each. At the usual learning rate
# its gradient spikes at step 3 and fp32 summation order alone (4 micro-batches of 1 against one batch of 4, on one
# process) moves the gradient norm by 3e-4; at DEEP_LEARNING_RATE the same comparison agrees within 3e-7.
DEEP_LLAMA = "llama_8_layers"
DEEP_LEARNING_RATE = 0.0003
RESUME_STEP = 3  # reshard tests save here and resume to STEPS
TOLERANCE = 1e-5


def launch(run: Run, output_dir: str, base_flags: list[str]) -> str:
    """Run ``run`` (under ``paddle.distributed.launch`` when it has several processes); return its output dir."""
    run_script(command_line(run, output_dir, base_flags), timeout=900)
    return output_dir


def assert_same_training(actual_dir: str, expected_dir: str, expected_steps=range(1, STEPS + 1)):
    for comparison in compare_runs(actual_dir, expected_dir, expected_steps, TOLERANCE):
        assert comparison.passed, comparison.describe()


class Runs:
    """Runs shared by several tests (each made once per module, on first use)."""

    def __init__(self, demo_data: str, models: dict, directory):
        self.demo_data, self.models, self.directory = demo_data, dict(models), directory
        self._done: dict[str, str] = {}

    def model(self, family: str) -> str:
        if family == DEEP_LLAMA and family not in self.models:
            self.models[family] = str(self.directory / family)
            script = textwrap.dedent(
                f"""
                import paddle
                from paddle_llm.models.registry import resolve_model, build_config, build_model, load_tokenizer
                paddle.seed(0)
                source = resolve_model("tiny-llama")
                build_model(source, build_config(source, num_hidden_layers=8), load_weights=False).save_pretrained({self.models[family]!r})
                load_tokenizer("tiny-llama").save_pretrained({self.models[family]!r})
                """
            )
            run_script(["-c", script])
        return self.models[family]

    def pretrain(self, name: str, run: Run, family: str = "llama") -> str:
        if name not in self._done:
            output = str(self.directory / name)
            base = pretrain_flags(self.demo_data, output, model=self.model(family), max_steps=STEPS, logging_steps=1, continue_training=1)
            self._done[name] = launch(run, output, base)
        return self._done[name]

    def finetune(self, name: str, run: Run) -> str:
        if name not in self._done:
            output = str(self.directory / name)
            base = finetune_flags(self.models["llama"], output, self.lora_start())
            self._done[name] = launch(run, output, base)
        return self._done[name]

    def dpo(self, name: str, run: Run) -> str:
        if name not in self._done:
            output = str(self.directory / name)
            self._done[name] = launch(run, output, dpo_flags(self.models["llama"], output))
        return self._done[name]

    def lora_start(self) -> str:
        """A LoRA adapter initialised once, so every layout starts from the same adapter weights."""
        if "lora_start" not in self._done:
            output = str(self.directory / "lora_start")
            script = textwrap.dedent(
                f"""
                import paddle
                from paddle_llm.models.registry import resolve_model, build_config, build_model
                from paddle_llm.peft.lora import apply_lora
                paddle.seed(0)
                source = resolve_model({self.models['llama']!r})
                apply_lora(build_model(source, build_config(source), load_weights=True), source.family, 8).save_pretrained({output!r})
                """
            )
            run_script(["-c", script])
            self._done["lora_start"] = output
        return self._done["lora_start"]


def finetune_flags(model: str, output_dir: str, lora_path: str) -> list[str]:
    flags = {
        "model_name_or_path": model,
        "dataset_name_or_path": INSTRUCTIONS,
        "output_dir": output_dir,
        "device": "cpu",
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.003,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "eval_steps": 100,
        "src_length": 48,
        "max_length": 64,
        "report_to": "none",
        "disable_tqdm": 1,
        "seed": 7,
        "do_train": 1,
        "lora": True,
        "lora_path": lora_path,
        "unified_checkpoint": 1,  # the adapter is saved whole, so one device loads what tensor parallel trained
    }
    return [str(token) for name, value in flags.items() for token in (f"--{name}", value)]


def dpo_flags(model: str, output_dir: str) -> list[str]:
    """Full DPO (a frozen reference copy) from saved weights, on the shipped preference task."""
    flags = {
        "model_name_or_path": model,
        "train_dataset_path": os.path.join(PREFERENCES, "train.jsonl"),
        "output_dir": output_dir,
        "device": "cpu",
        "max_steps": STEPS,
        "learning_rate": 0.003,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "max_seq_len": 128,
        "max_prompt_len": 96,
        "report_to": "none",
        "disable_tqdm": 1,
        "seed": 7,
        "do_train": 1,
    }
    return [str(token) for name, value in flags.items() for token in (f"--{name}", value)]


@pytest.fixture(scope="module")
def runs(demo_data, saved_tiny_models, tmp_path_factory) -> Runs:
    return Runs(demo_data, saved_tiny_models, tmp_path_factory.mktemp("parallel"))


SAVES_FOR_RESHARD = {"save_steps": RESUME_STEP, "unified_checkpoint": 1}
ONE_PROCESS = Run(RUN_PRETRAIN, 1, {"per_device_train_batch_size": 4, **SAVES_FOR_RESHARD})

# name -> the layout, with the same global batch of 4 sequences as ONE_PROCESS
TWO_PROCESS_LAYOUTS = {
    "sharding_stage1": Run(RUN_PRETRAIN, 2, {"sharding": "stage1", "per_device_train_batch_size": 2}),
    "sharding_stage2": Run(RUN_PRETRAIN, 2, {"sharding": "stage2", "per_device_train_batch_size": 2, **SAVES_FOR_RESHARD}),
    "sharding_stage3": Run(RUN_PRETRAIN, 2, {"sharding": "stage3", "per_device_train_batch_size": 2}),
    "tensor_parallel_2": Run(RUN_PRETRAIN, 2, {"tensor_parallel_degree": 2, "per_device_train_batch_size": 4, **SAVES_FOR_RESHARD}),
    # 2 micro-batches of 2 per step: gradient accumulation is the pipeline's micro-batching
    "pipeline_parallel_2": Run(RUN_PRETRAIN, 2, {"pipeline_parallel_degree": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
}
FOUR_PROCESS_LAYOUTS = {
    "tensor_2_x_pipeline_2": Run(
        RUN_PRETRAIN, 4, {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    ),
    "tensor_2_x_data_2": Run(RUN_PRETRAIN, 4, {"tensor_parallel_degree": 2, "per_device_train_batch_size": 2}),
    # One launch for two flags, to spare CI's time: Megatron sequence parallel (norms see half the sequence;
    # reduce-scatter and all-gather along it replace the all-reduce) and sharding stage 2 across TP2 groups.
    "tensor_2_sequence_parallel_x_sharding_stage2": Run(
        RUN_PRETRAIN, 4, {"tensor_parallel_degree": 2, "sequence_parallel": 1, "sharding": "stage2", "per_device_train_batch_size": 2}
    ),
}
# Each flag on its own, left out of `make test` for time (about 20 s per 2-process and 35 s per 4-process run on 2
# cores); `pytest -m extended` runs them (docs/dev/testing.md).
EXTENDED_LAYOUTS = {
    "tensor_parallel_2_sequence_parallel": Run(RUN_PRETRAIN, 2, {"tensor_parallel_degree": 2, "sequence_parallel": 1, "per_device_train_batch_size": 4}),
    "tensor_2_x_sharding_stage1": Run(RUN_PRETRAIN, 4, {"tensor_parallel_degree": 2, "sharding": "stage1", "per_device_train_batch_size": 2}),
    "tensor_2_x_sharding_stage2": Run(RUN_PRETRAIN, 4, {"tensor_parallel_degree": 2, "sharding": "stage2", "per_device_train_batch_size": 2}),
}


@pytest.mark.parametrize("layout", TWO_PROCESS_LAYOUTS)
def test_two_process_layout_matches_one_process(runs, layout):
    assert_same_training(runs.pretrain(layout, TWO_PROCESS_LAYOUTS[layout]), runs.pretrain("one_process", ONE_PROCESS))


@pytest.mark.slow
@pytest.mark.parametrize("layout", FOUR_PROCESS_LAYOUTS)
def test_four_process_layout_matches_one_process(runs, layout):
    assert_same_training(runs.pretrain(layout, FOUR_PROCESS_LAYOUTS[layout]), runs.pretrain("one_process", ONE_PROCESS))


@pytest.mark.extended
@pytest.mark.parametrize("layout", EXTENDED_LAYOUTS)
def test_extended_layout_matches_one_process(runs, layout):
    assert_same_training(runs.pretrain(layout, EXTENDED_LAYOUTS[layout]), runs.pretrain("one_process", ONE_PROCESS))


@pytest.mark.extended
def test_interleaved_pipeline_4_x_virtual_2_matches_one_process(runs):
    # the interleaved schedule runs micro-batches in rounds of 4 stages: 4 micro-batches of 1 per step
    interleaved = Run(
        RUN_PRETRAIN,
        4,
        {
            "pipeline_parallel_degree": 4, "virtual_pp_degree": 2, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 4, "learning_rate": DEEP_LEARNING_RATE,
        },
    )
    single = Run(RUN_PRETRAIN, 1, {"per_device_train_batch_size": 4, "learning_rate": DEEP_LEARNING_RATE})
    actual = runs.pretrain("pipeline_4_x_virtual_2", interleaved, family=DEEP_LLAMA)
    assert "using interleave scheduler" in open(os.path.join(actual, "launch_log", "workerlog.0")).read()
    assert_same_training(actual, runs.pretrain("deep_one_process", single, family=DEEP_LLAMA))


# The other families, in the layouts their architecture changes: key/value groups split over tensor-parallel ranks
# (ChatGLM2's 4 heads share 2 multi-query groups, one per rank; Qwen2's 2 KV heads carry biases), and Qwen2's LM head
# tied to the embedding, whose states sharding splits. (Pipeline parallel with a tied embedding is refused before
# launch: config/validation.py says why.)
@pytest.mark.parametrize("family, layout", [
    ("chatglm2", "tensor_parallel_2"),
    ("qwen2", "tensor_parallel_2"),
    ("qwen2", "sharding_stage2"),
])
def test_other_family_layout_matches_one_process(runs, family, layout):
    single = runs.pretrain(f"{family}_one_process", Run(RUN_PRETRAIN, 1, {"per_device_train_batch_size": 4}), family=family)
    parallel = runs.pretrain(f"{family}_{layout}", TWO_PROCESS_LAYOUTS[layout], family=family)
    assert_same_training(parallel, single)


def test_tensor_parallel_lora_matches_one_process_and_its_adapter_loads_on_one_device(runs):
    single = runs.finetune("lora_one_process", Run(FINETUNE, 1))
    parallel = runs.finetune("lora_tensor_parallel_2", Run(FINETUNE, 2, {"tensor_parallel_degree": 2}))
    assert_same_training(parallel, single)
    assert "all 2 ranks finished; exiting without native teardown" in open(os.path.join(parallel, "launch_log", "workerlog.0")).read()
    compare = textwrap.dedent(
        f"""
        import numpy as np
        from paddle_llm.models.registry import resolve_model, build_config, build_model
        from paddle_llm.peft.lora import load_lora
        source = resolve_model({runs.models['llama']!r})
        adapters = []
        for path in ({single!r}, {parallel!r}):
            lora = load_lora(build_model(source, build_config(source), load_weights=True), path, source.name_or_path)
            adapters.append({{k: v.numpy() for k, v in lora.state_dict().items() if "lora_" in k}})
        one, two = adapters
        assert sorted(one) == sorted(two) and len(one) > 0, (len(one), len(two))
        assert max(np.abs(v).max() for k, v in one.items() if "lora_B" in k) > 0  # trained, not the zero init
        print("MAXDIFF", max(float(np.abs(one[k] - two[k]).max()) for k in one))
        """
    )
    output = run_script(["-c", compare]).stdout
    assert float(output.split("MAXDIFF")[1].split()[0]) < TOLERANCE


# name -> DPO layout with the same global batch of 4 preference pairs (8 sequences) as one process
DPO_LAYOUTS = {
    "dpo_data_parallel_2": Run(RUN_DPO, 2, {"per_device_train_batch_size": 2}),
    "dpo_sharding_stage2": Run(RUN_DPO, 2, {"sharding": "stage2", "per_device_train_batch_size": 2}),
    # every token's log-probability from vocabulary-split logits (a softmax across the ranks); the reference copy split too
    "dpo_tensor_parallel_2": Run(RUN_DPO, 2, {"tensor_parallel_degree": 2, "per_device_train_batch_size": 4}),
    # 2 micro-batches of 2 packed pairs (PaddleNLP's single-row pairs, --flash_mask, an explicit mask on CPU: a pair
    # per row, so micro-batches never split one); the reference copy is a pipeline of its own that scores each
    # micro-batch before the policy's forward and backward
    "dpo_pipeline_parallel_2": Run(
        RUN_DPO, 2, {"pipeline_parallel_degree": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "flash_mask": True}
    ),
}
DPO_ONE_PROCESS = Run(RUN_DPO, 1, {"per_device_train_batch_size": 4})


@pytest.mark.parametrize("layout", DPO_LAYOUTS)
def test_dpo_two_process_layout_matches_one_process(runs, layout):
    single = runs.dpo("dpo_one_process", DPO_ONE_PROCESS)
    parallel = runs.dpo(layout, DPO_LAYOUTS[layout])
    assert_same_training(parallel, single)
    # the reward metrics are averaged over every pair on every rank, so they match too
    actual, expected = steps(parallel), steps(single)
    for step in range(1, STEPS + 1):
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert actual[step][key] == pytest.approx(expected[step][key], rel=TOLERANCE, abs=1e-6), (key, step)
    # step 1 scores the starting weights, which are the reference: every reward is 0; later steps moved away
    assert expected[1]["rewards/chosen"] == 0 and expected[STEPS]["rewards/chosen"] != 0


def test_dpo_tensor_parallel_final_weights_equal_one_process(runs):
    single = runs.dpo("dpo_one_process", DPO_ONE_PROCESS)
    parallel = runs.dpo("dpo_tensor_parallel_2", DPO_LAYOUTS["dpo_tensor_parallel_2"])
    compare = textwrap.dedent(
        f"""
        import numpy as np, paddle
        whole = {{k: v.numpy() for k, v in paddle.load({single!r} + "/model_state.pdparams").items()}}
        start = {{k: v.numpy() for k, v in paddle.load({runs.models['llama']!r} + "/model_state.pdparams").items()}}
        worst, compared = 0.0, 0
        for rank in range(2):
            for name, part in paddle.load({parallel!r} + f"/model_state.tp0{{rank}}.pdparams").items():
                part, full = part.numpy(), whole[name]
                # a split weight is this rank's half of the axis where the shapes differ; the rest is replicated
                axes = [axis for axis, (a, b) in enumerate(zip(part.shape, full.shape)) if a != b]
                if axes:
                    full = np.split(full, 2, axis=axes[0])[rank]
                worst, compared = max(worst, float(np.abs(part - full).max())), compared + 1
        assert compared >= len(whole), (compared, len(whole))
        assert max(float(np.abs(whole[k] - start[k]).max()) for k in whole) > 1e-4  # trained, not the start
        print("MAXDIFF", worst)
        """
    )
    output = run_script(["-c", compare]).stdout
    assert float(output.split("MAXDIFF")[1].split()[0]) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints across layouts
# ---------------------------------------------------------------------------------------------------------------


def resume(runs: Runs, name: str, run: Run, checkpoint: str) -> str:
    return runs.pretrain(name, Run(run.script, run.processes, {**run.flags, "resume_from_checkpoint": checkpoint, "save_steps": 100}))


@pytest.mark.parametrize("saved_under", ["tensor_parallel_2", "sharding_stage2"])
def test_checkpoint_saved_in_parallel_resumes_on_one_process(runs, saved_under):
    checkpoint = os.path.join(runs.pretrain(saved_under, TWO_PROCESS_LAYOUTS[saved_under]), f"checkpoint-{RESUME_STEP}")
    merged = checkpoint + "-single"
    result = run_script(["-m", "paddle_llm.cli", "convert-checkpoint", checkpoint, "--output_dir", merged])
    assert f"resume with --resume_from_checkpoint {merged}" in result.stdout
    resumed = resume(runs, f"one_process_from_{saved_under}", ONE_PROCESS, merged)
    assert_same_training(resumed, runs.pretrain("one_process", ONE_PROCESS), range(RESUME_STEP + 1, STEPS + 1))


@pytest.mark.parametrize("resume_under", ["tensor_parallel_2", "sharding_stage2"])
def test_checkpoint_saved_on_one_process_resumes_in_parallel(runs, resume_under):
    # one process writes one file per kind: every layout reads it directly, no conversion
    checkpoint = os.path.join(runs.pretrain("one_process", ONE_PROCESS), f"checkpoint-{RESUME_STEP}")
    resumed = resume(runs, f"{resume_under}_from_one_process", TWO_PROCESS_LAYOUTS[resume_under], checkpoint)
    assert_same_training(resumed, runs.pretrain("one_process", ONE_PROCESS), range(RESUME_STEP + 1, STEPS + 1))
