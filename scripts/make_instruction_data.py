"""Write the shipped instruction-tuning task: questions about short stories, answered with words from the story.

``{"src": "At noon, Kai went to the harbor with a goat. ... Where did Kai go?", "tgt": "the harbor"}``

Every answer can be checked exactly, and the stories are drawn fresh for each record, so the dev split's stories
never appear in training: answering them means reading the story, not remembering an answer. The stories use the
demo corpus's world (``make_demo_corpus.py``), so the demo's pretrained model already knows every word of them and
fine-tuning only has to teach it to answer. (A task with words the corpus lacks, such as numbers in words, would
first need those words learned, which LoRA's frozen embeddings make slow on a 0.7M-parameter model.) Records are
PaddleNLP's plain ``src``/``tgt``: the Llama chat template's ``[INST]`` markers are bytes this tokenizer never saw in
pretraining, and on the demo's tiny model they cost more accuracy than the template is worth.

The task is our own generated data (released with the project under Apache-2.0), deterministic from a seed.

Usage: python scripts/make_instruction_data.py paddle_llm/assets/instructions [--train 800] [--dev 50] [--seed 7]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_demo_corpus import ANIMALS, FEELINGS, NAMES, OBJECTS, PLACES, TIMES  # noqa: E402  (the corpus's world)

# question template -> which story slot answers it
QUESTIONS = {
    "Where did {name} go?": "place",
    "What did {name} find?": "thing",
}


def record(rng: random.Random) -> dict:
    """One story of two sentences and one question about it."""
    name = rng.choice(NAMES)
    slots = {"place": rng.choice(PLACES), "animal": rng.choice(ANIMALS), "thing": rng.choice(OBJECTS), "feeling": rng.choice(FEELINGS)}
    story = (
        f"{rng.choice(TIMES)}, {name} went to {slots['place']} with a {slots['animal']}. "
        f"There {name} found {slots['thing']} and felt {slots['feeling']}."
    )
    question, slot = rng.choice(list(QUESTIONS.items()))
    # the question last: right before the reply, where the model starts answering
    return {"src": f"{story} {question.format(name=name)}", "tgt": slots[slot]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--train", type=int, default=800, help="training records (default 800)")
    parser.add_argument("--dev", type=int, default=50, help="held-out records (default 50)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train = [record(rng) for _ in range(args.train)]
    seen = {r["src"] for r in train}
    dev = []
    while len(dev) < args.dev:
        candidate = record(rng)
        if candidate["src"] not in seen:
            dev.append(candidate)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, records in (("train.json", train), ("dev.json", dev)):
        with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as f:
            for item in records:
                f.write(json.dumps(item) + "\n")
    print(f"wrote {len(train)} training and {len(dev)} held-out records to {args.output_dir}")


if __name__ == "__main__":
    main()
