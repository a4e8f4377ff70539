"""``paddle-llm demo`` (= ``make demo``): raw text to a served, fine-tuned tiny Llama on a laptop CPU.

1. preprocess the shipped corpus (paddle_llm/assets/demo_corpus.jsonl) with the shipped tokenizer;
2. pretrain ``tiny-llama`` from scratch with the same flags run_pretrain.py takes, printing the loss before and
   after and a greedy sample;
3. LoRA-fine-tune it on the shipped instruction task, printing held-out exact match before and after;
4. export the merged model to a static graph (with the parity check), serve it, ask one question through the
   official ``openai`` client and one through gRPC, print both answers, and stop the server.

With ``--dpo``, a preference-alignment stage runs after step 3: LoRA-DPO of the pretrained model on the shipped
preference task, printing held-out reward accuracy before and after (see ``paddle_llm.tools.demo_dpo``).

Targets: the final pretraining eval loss below ``LOSS_TARGET`` nats, far under ln(vocab) ≈ 6.93 for a random
model (measured: 6.95 at step 1, 0.48 after 200 steps, ~65 s of training on 2 cores); held-out exact match of
the fine-tuned model at least 90% (see ``paddle_llm.tools.demo_finetune``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import grpc
import numpy as np

from paddle_llm import ASSETS_DIR
from paddle_llm.tools import demo_dpo
from paddle_llm.console import verbose
from paddle_llm.data.preprocess import preprocess
from paddle_llm.tools.demo_finetune import print_report, run_finetune_demo
from paddle_llm.export.command import main as export_main
from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model
from paddle_llm.serving import generation_pb2, generation_pb2_grpc
from paddle_llm.serving.process import ServerProcess
from paddle_llm.recipes import pretrain
from paddle_llm.console import recipe_logger

DEMO_CORPUS = os.path.join(ASSETS_DIR, "demo_corpus.jsonl")
LOSS_TARGET = 1.0
PROMPT = "In the morning, Ada went to"
# A held-out question of the shipped instruction task (dev.json), answered "the forest".
QUESTION = "At noon, Hana went to the forest with a rabbit. There Hana found a red kite and felt curious. Where did Hana go?"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def greedy_sample(model_dir: str, prompt: str, max_new_tokens: int = 40) -> str:
    """Continue ``prompt`` greedily with the model saved in ``model_dir``.

    A plain loop that re-runs the whole sequence each step: at demo size that costs milliseconds, and it needs
    nothing from PaddleNLP's ``generate`` (whose cache path breaks on CPU for Llama in PaddleNLP 3.0.0b4).
    """
    import paddle

    source = resolve_model(model_dir)
    tokenizer = load_tokenizer(model_dir, source.family)
    model = build_model(source, build_config(source, use_cache=False), load_weights=True)
    model.eval()
    ids = list(tokenizer(prompt)["input_ids"])
    generated = []
    with paddle.no_grad():
        for _ in range(max_new_tokens):
            batch = np.asarray([ids], dtype="int64")
            inputs = {k: paddle.to_tensor(v) for k, v in source.family.causal_lm_inputs(batch).items()}
            outputs = model(input_ids=paddle.to_tensor(batch), **inputs)
            logits = outputs[0] if isinstance(outputs, tuple) else outputs.logits
            next_id = int(paddle.argmax(logits[0, -1]).item())
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
            generated.append(next_id)
    return prompt + " " + tokenizer.decode(generated, skip_special_tokens=True).strip()


def pretrain_stage(output_dir: str, max_steps: int, show_progress: bool) -> dict:
    _banner("1/4 preprocess the shipped corpus")
    data_prefix = os.path.join(output_dir, "data", "demo_corpus")
    summary = preprocess(DEMO_CORPUS, data_prefix, "tiny-llama", append_eos=True, show_progress=show_progress,
                         overwrite=True)  # the demo's own output directory, rerun by `make demo`
    print(json.dumps(summary))

    _banner(f"2/4 pretrain tiny-llama for {max_steps} steps on CPU")
    model_dir = os.path.join(output_dir, "pretrain")
    flags = [
        "--model_name_or_path", "tiny-llama", "--input_dir", data_prefix, "--output_dir", model_dir,
        "--overwrite_output_dir", "--device", "cpu", "--split", "949,50,1",
        "--max_seq_length", "128", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "0.003", "--min_learning_rate", "0.0003", "--lr_scheduler_type", "cosine",
        "--warmup_steps", "20", "--max_steps", str(max_steps), "--logging_steps", "10", "--logging_first_step",
        "--eval_steps", str(max_steps), "--save_steps", str(max_steps), "--do_train", "--do_eval",
        "--disable_tqdm", str(not show_progress), "--report_to", "none", "--seed", "42",
    ]
    code = pretrain.RECIPE.main(flags)
    if code:
        raise SystemExit(code)
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8") as f:
        eval_loss = json.load(f)["eval_loss"]
    return {
        "loss_at_step_1": round(next(r["loss"] for r in rows if "loss" in r), 3),
        "eval_loss_after": round(eval_loss, 3),
        "sample": greedy_sample(model_dir, PROMPT),
        "model_dir": model_dir,
    }


def serve_stage(model_dir: str, adapter_dir: str, output_dir: str) -> dict:
    """Export base + adapter, serve the export, and ask one question over REST (openai client) and one over gRPC."""
    from openai import OpenAI

    _banner("4/4 export, serve, and ask the served model")
    export_dir = os.path.join(output_dir, "export")
    code = export_main(["--model_name_or_path", model_dir, "--lora_path", adapter_dir, "--output_path", export_dir])
    if code:
        raise SystemExit(code)
    with ServerProcess(["--model", export_dir], os.path.join(output_dir, "server.log")) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="demo")
        model_name = client.models.list().data[0].id
        # The demo task is plain src/tgt text (no chat template), so it is asked as a completion.
        reply = client.completions.create(model=model_name, prompt=QUESTION, max_tokens=8, temperature=0)
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            request = generation_pb2.GenerateRequest(prompt=QUESTION, max_tokens=8, temperature=0)
            grpc_answer = generation_pb2_grpc.TextGenerationStub(channel).Generate(request, timeout=120).text
    return {"question": QUESTION, "rest_answer": reply.choices[0].text, "grpc_answer": grpc_answer, "export_dir": export_dir}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paddle-llm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="where data, checkpoints and the model go (default: demo_output)")
    parser.add_argument("--max_steps", type=int, default=200, help="pretraining steps (default: 200)")
    parser.add_argument("--finetune_steps", type=int, default=600, help="LoRA fine-tuning steps (default: 600)")
    parser.add_argument("--dpo", action="store_true", help="also align the pretrained model with DPO on the shipped preference task")
    parser.add_argument("--dpo_steps", type=int, default=100, help="LoRA-DPO steps with --dpo (default: 100)")
    parser.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not verbose():
        # The demo prints its own summary of each stage, on one screen: the recipes' setup lines (memory estimate,
        # runtime, data) and PaddleNLP's loss lines would fill four. Their warnings still print.
        from paddlenlp.utils.log import logger as paddlenlp_logger

        paddlenlp_logger.set_level("WARNING")
        recipe_logger.setLevel(logging.WARNING)
    started = time.perf_counter()
    pretrained = pretrain_stage(args.output_dir, args.max_steps, show_progress=not args.disable_tqdm)
    print(f"\nloss at step 1:       {pretrained['loss_at_step_1']:.3f}   (ln(vocab) = {math.log(1024):.3f})")
    print(f"eval loss after:      {pretrained['eval_loss_after']:.3f}   (target < {LOSS_TARGET})")
    print(f"sample:               {pretrained['sample']!r}")

    _banner("3/4 LoRA fine-tune on the shipped instruction task")
    finetuned = run_finetune_demo(pretrained["model_dir"], os.path.join(args.output_dir, "finetune"), args.finetune_steps, show_progress=not args.disable_tqdm)
    accuracy_ok = print_report(finetuned)
    dpo_ok = True
    if args.dpo:

        _banner("3b/4 DPO: LoRA preference alignment on the shipped preference task")
        aligned = demo_dpo.run_dpo_demo(pretrained["model_dir"], os.path.join(args.output_dir, "dpo"), args.dpo_steps, show_progress=not args.disable_tqdm)
        dpo_ok = demo_dpo.print_report(aligned)

    served = serve_stage(pretrained["model_dir"], finetuned["adapter_dir"], args.output_dir)
    print(f"\nquestion:             {served['question']}")
    print(f"answer over REST:     {served['rest_answer']!r}   (official openai client, /v1/completions)")
    print(f"answer over gRPC:     {served['grpc_answer']!r}")
    print(f"total time:           {time.perf_counter() - started:.0f} s; everything is in {args.output_dir}/")
    failures = []
    if pretrained["eval_loss_after"] >= LOSS_TARGET:
        failures.append(f"eval loss {pretrained['eval_loss_after']:.3f} is not below {LOSS_TARGET}")
    if not accuracy_ok:
        failures.append(f"held-out exact match {finetuned['accuracy_after']:.0%} is below {finetuned['target']:.0%}")
    if not dpo_ok:
        failures.append(f"held-out reward accuracy after DPO {aligned['accuracy_after']:.0%} is below {aligned['target']:.0%}")
    if failures:
        print("demo FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("demo OK")
    return 0
