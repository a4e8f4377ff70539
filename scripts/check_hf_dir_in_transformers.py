"""Load a Hugging Face directory with transformers and print what a test compares, as one JSON line.

Runs in the separate torch venv (scripts/make_hf_fixtures.py names the pinned versions); torch is never a
paddle_llm dependency. ``tests/integration/test_hf_models.py`` runs it on ``paddle-llm export --format hf`` output:

    /work/torchvenv/bin/python scripts/check_hf_dir_in_transformers.py OUT_DIR '[[1, 2, 3]]'

Printed: the loading report (missing, unexpected and mismatched tensors), every warning transformers logged while
loading, the logits of the given ids, greedy continuations of them, and the tokenizer's chat template rendering.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(directory: str, input_ids: list[list[int]]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    transformers.logging.get_logger().addHandler(handler)
    transformers.logging.set_verbosity_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(input_ids)).logits.float().numpy().tolist()
        generated = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=8, do_sample=False)[0, len(ids):].tolist() for ids in input_ids]
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    print(json.dumps({
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "log": stream.getvalue(),
        "warnings": [str(w.message) for w in caught],
        "logits": logits,
        "generated": generated,
        "tokenizer_class": type(tokenizer).__name__,
        "encoded": tokenizer("In the evening").input_ids,
        "chat": chat,
    }))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
