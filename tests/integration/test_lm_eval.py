"""A real client: lm-evaluation-harness scores our server exactly as it scores the exported model in transformers.

The demo's model (pretrained on the shipped corpus, LoRA-tuned on the shipped instruction task) is exported twice,
as a static graph and as a Hugging Face directory. lm-eval runs the project's task set (benchmarks/lm_eval_tasks:
a log-likelihood multiple-choice task and a generate_until task) with its ``local-completions`` model against
``paddle-llm serve`` on the static export, and with its ``hf`` model on the HF export; the scores must be equal.

lm-eval and torch live in their own venv (``bash scripts/make_lm_eval_venv.sh``, never a project dependency); the
test skips without it, as CI does (no torch there). Nothing is downloaded: the tasks read local jsonl files and
lm-eval runs with the Hugging Face hub and datasets offline.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, run_script, subprocess_env
from tests.integration.server_process import ServerProcess

LM_EVAL = os.path.join(os.environ.get("LM_EVAL_VENV", "/work/lmevalvenv"), "bin", "lm_eval")
TASKS_DIR = os.path.join(ROOT, "benchmarks", "lm_eval_tasks")
PLACE_TASK, OBJECT_TASK = "paddle_llm_demo_place", "paddle_llm_demo_object"
PLACE_CHOICES = 8
# The server normalizes logprobs over the tokenizer's tokens, transformers over every row of the (padded) output
# layer: the server's log-likelihoods are higher by the mass of the padding rows, never lower, and by little.
LOGLIKELIHOOD_TOLERANCE = 0.05

pytestmark = [
    pytest.mark.slow,  # pretrains, fine-tunes, exports, serves and runs lm-eval twice
    pytest.mark.skipif(not os.path.exists(LM_EVAL), reason=f"no {LM_EVAL}: make it with bash scripts/make_lm_eval_venv.sh"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[str, str, str]:
    """(root, static export, Hugging Face export) of the demo's pretrained + LoRA-tuned tiny Llama."""
    root = str(tmp_path_factory.mktemp("lm_eval"))
    run_script(["-c", "import sys\n"
                      "from paddle_llm.tools.demo import pretrain_stage\n"
                      "from paddle_llm.tools.demo_finetune import run_finetune_demo\n"
                      "model_dir = pretrain_stage(sys.argv[1], 200, show_progress=False)['model_dir']\n"
                      "run_finetune_demo(model_dir, sys.argv[1] + '/finetune', 600)\n", root], timeout=900)
    model = ["--model_name_or_path", os.path.join(root, "pretrain"), "--lora_path", os.path.join(root, "finetune", "lora")]
    static, hf = os.path.join(root, "static"), os.path.join(root, "hf")
    run_script(["-m", "paddle_llm", "export", *model, "--output_path", static])
    run_script(["-m", "paddle_llm", "export", *model, "--output_path", hf, "--format", "hf"])
    return root, static, hf


def lm_eval(root: str, name: str, model: str, model_args: str) -> tuple[dict, dict]:
    """Run lm_eval on both tasks: (metric per task, that task's logged samples by doc id per task)."""
    output = os.path.join(root, name)
    env = subprocess_env(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME=os.path.join(root, "hf_home"))
    # Run from the task folder: the task YAMLs name their jsonl files relative to the working directory.
    result = subprocess.run([LM_EVAL, "--model", model, "--model_args", model_args, "--include_path", TASKS_DIR,
                             "--tasks", f"{PLACE_TASK},{OBJECT_TASK}", "--batch_size", "1", "--output_path", output,
                             "--log_samples", "--seed", "1234"],
                            cwd=TASKS_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(glob.glob(os.path.join(output, "*", "results_*.json"))[0], encoding="utf-8") as f:
        results = json.load(f)["results"]
    samples = {}
    for task in (PLACE_TASK, OBJECT_TASK):
        with open(glob.glob(os.path.join(output, "*", f"samples_{task}_*.jsonl"))[0], encoding="utf-8") as f:
            samples[task] = {row["doc_id"]: row for row in map(json.loads, f)}
    scores = {PLACE_TASK: results[PLACE_TASK]["acc,none"], OBJECT_TASK: results[OBJECT_TASK]["exact_match,strip"]}
    return scores, samples


# Each logged (context, continuation) scored by transformers over the tokenizer's rows only, as the server scores it.
SCORE_OVER_TOKENIZER_ROWS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
scores = []
for context, continuation in json.load(sys.stdin):
    prefix, ids = tokenizer.encode(context), tokenizer.encode(context + continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :, :len(tokenizer)].double()
    logprobs = torch.log_softmax(logits, -1)
    scores.append(sum(logprobs[p - 1, ids[p]].item() for p in range(len(prefix), len(ids))))
print(json.dumps(scores))
"""


def log_likelihoods(sample: dict) -> list[float]:
    """A multiple-choice sample's log-likelihood of each choice, as lm-eval logs it."""
    return [float(choice[0][0]) for choice in sample["resps"]]


def test_local_completions_against_serve_scores_as_hf_on_the_export(exports):
    root, static, hf = exports
    hf_scores, hf_samples = lm_eval(root, "hf", "hf", f"pretrained={hf},dtype=float32")
    with ServerProcess(["--model", static, "--num_threads", "1"], os.path.join(root, "server.log")) as server:
        # add_bos_token: the hf model's tokenizer adds <s> as the model was trained; lm-eval's API models do not
        # unless asked, and both must score the same token ids.
        served_scores, served_samples = lm_eval(
            root, "served", "local-completions",
            f"model=static,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={hf},"
            "add_bos_token=True,num_concurrent=1,max_retries=1")
    differences = [served - ours for doc_id, hf_row in hf_samples[PLACE_TASK].items()
                   for served, ours in zip(log_likelihoods(served_samples[PLACE_TASK][doc_id]), log_likelihoods(hf_row))]
    print(f"\n{'task':<24}{'local-completions':>18}{'hf':>8}\n"
          + "".join(f"{task:<24}{served_scores[task]:>18.3f}{hf_scores[task]:>8.3f}\n" for task in hf_scores)
          + f"per-choice log-likelihood, served - hf: min {min(differences):.2e}, max {max(differences):.2e}")
    assert served_scores == hf_scores
    # Above chance: the model reads the stories (1/8 for the places; copying an object by luck is rarer still).
    assert hf_scores[PLACE_TASK] > 0.5 and hf_scores[OBJECT_TASK] > 0.5, hf_scores
    assert len(differences) == PLACE_CHOICES * len(hf_samples[PLACE_TASK])
    assert -1e-4 <= min(differences) and max(differences) < LOGLIKELIHOOD_TOLERANCE, (min(differences), max(differences))
    # The difference is all normalization: over the same rows, transformers gives the served numbers.
    served_rows = list(served_samples[PLACE_TASK].values())
    pairs = [[request["arg_0"], request["arg_1"]] for row in served_rows for request in row["arguments"].values()]
    scored = subprocess.run([os.path.join(os.path.dirname(LM_EVAL), "python"), "-c", SCORE_OVER_TOKENIZER_ROWS, hf],
                            input=json.dumps(pairs), env=subprocess_env(HF_HUB_OFFLINE=1), capture_output=True,
                            text=True, check=True, timeout=600)
    served = [ll for row in served_rows for ll in log_likelihoods(row)]
    assert json.loads(scored.stdout) == pytest.approx(served, abs=1e-4)
    for doc_id, hf_row in hf_samples[OBJECT_TASK].items():
        assert served_samples[OBJECT_TASK][doc_id]["filtered_resps"] == hf_row["filtered_resps"], doc_id
