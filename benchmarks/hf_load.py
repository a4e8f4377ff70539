"""Loading a sharded 1B-parameter Hugging Face checkpoint: paddle_llm's loader vs PaddleNLP's convert_from_torch.

    python benchmarks/hf_load.py [--keep DIR]

The checkpoint is made on the fly: TinyLlama-1.1B's shape (hidden 2048, 22 layers, GQA 32/4 heads, vocab 32000,
1.10B parameters), random float32 weights, written as transformers does (``model-0000N-of-0000M.safetensors`` of at
most 2 GB, an index, ``config.json``). Each loader runs in a fresh process on that directory:

- paddle_llm: ``resolve_model`` + ``build_model(load_weights=True)``: the model is built, then each tensor is read,
  transposed and copied into its parameter; nothing is written.
- PaddleNLP: ``LlamaForCausalLM.from_pretrained(copy, convert_from_torch=True)`` on a copy of the directory, because
  it writes the converted ``model_state.pdparams`` into the directory it loads from.

Measured per process: wall time of the load, and peak resident memory (``ru_maxrss``) minus the resident memory
just before loading (after imports), as a multiple of the weights' size; the absolute peak is printed too. Target: paddle_llm no slower, and its peak at most 1.2x the weights.
Both load the same numbers: the script compares a checksum of every parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import print_table, run, write_json  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
SHARD_BYTES = 2 * 10**9

LOADER = r"""
import json, resource, sys, time
import numpy as np
which, directory = sys.argv[1], sys.argv[2]
import paddle, paddlenlp.transformers
from paddle_llm.models.registry import build_config, build_model, resolve_model
def resident_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
baseline = resident_bytes()
start = time.perf_counter()
if which == "paddle_llm":
    source = resolve_model(directory)
    model = build_model(source, build_config(source, dtype="float32"), load_weights=True)
else:
    model = paddlenlp.transformers.LlamaForCausalLM.from_pretrained(directory, convert_from_torch=True, dtype="float32")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
checksum = {n: float(p.astype("float64").sum()) for n, p in model.named_parameters()}
print(json.dumps({"seconds": seconds, "baseline_bytes": baseline, "peak_bytes": peak,
                  "parameters": sum(int(np.prod(p.shape)) for p in model.parameters()), "checksum": checksum}))
"""


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """transformers' Llama tensor names and [out, in] shapes."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inter, hidden), prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter), prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def make_checkpoint(directory: str) -> int:
    """Write random float32 shards one at a time (never the whole model in memory); return the weights' bytes."""
    from safetensors.numpy import save_file

    generator = np.random.default_rng(0)
    shapes = tensor_shapes(CONFIG)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (generator.standard_normal(shapes[n], dtype=np.float32) * 0.02) for n in names}
        save_file(tensors, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in names})
        del tensors
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    return total


def measure(which: str, directory: str) -> dict:
    result = run(["-c", LOADER, which, directory])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", help="where to write the checkpoint (default: a temporary directory)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="hf_load_", dir=args.work_dir)
    try:
        checkpoint = os.path.join(root, "hf")
        os.makedirs(checkpoint)
        weights = make_checkpoint(checkpoint)
        ours = measure("paddle_llm", checkpoint)
        copy = os.path.join(root, "hf_copy_for_paddlenlp")
        shutil.copytree(checkpoint, copy)
        theirs = measure("paddlenlp", copy)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same = ours["checksum"].keys() == theirs["checksum"].keys() and all(
        np.isclose(ours["checksum"][k], theirs["checksum"][k], rtol=1e-9, atol=1e-9) for k in ours["checksum"])
    rows = []
    for name, measured in (("paddle_llm (in memory)", ours), ("PaddleNLP convert_from_torch", theirs)):
        above = measured["peak_bytes"] - measured["baseline_bytes"]
        rows.append([name, f"{measured['seconds']:.1f}", f"{measured['peak_bytes'] / 2**30:.2f}", f"{above / 2**30:.2f}",
                     f"{above / weights:.2f}x"])
    print(f"checkpoint: {ours['parameters'] / 1e9:.2f}B parameters, {weights / 2**30:.2f} GiB float32 in "
          f"{-(-weights // SHARD_BYTES)} shards; same parameters loaded: {same}")
    print_table(["loader", "load s", "peak RSS GiB", "peak above pre-load RSS GiB", "x weights"], rows)
    path = write_json("hf_load.json", {
        "parameters": ours["parameters"], "weights_bytes": weights, "same_parameters": bool(same),
        "paddle_llm": {k: v for k, v in ours.items() if k != "checksum"},
        "paddlenlp_convert_from_torch": {k: v for k, v in theirs.items() if k != "checksum"},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
