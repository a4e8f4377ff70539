"""Write the shipped DPO task: two answers to a question about a short story, the one that answers it preferred.

``{"src": ["At noon, Kai went to the harbor with a goat. There Kai found a map and felt brave. Where did Kai go?"],
"tgt": [], "response": ["a map", "the harbor"], "sort": [0, 1]}``

Both answers come from the story; the rejected one answers the other question (a thing for "Where", a place for
"What"). The preference is learnable by the tiny demo model in a few hundred steps (read the question word, prefer a
place or a thing), yet a model that has not learned it scores about 50% reward accuracy, since nothing in the
replies' own wording gives the chosen one away. Stories are drawn fresh for each record, so the held-out split's
stories never appear in training. The world is the demo corpus's (``make_demo_corpus.py``), so the demo tokenizer
knows every word.

The training split is in PaddleNLP's preference format (``src``, ``tgt``, ``response``, ``sort``, chosen in either
position), the held-out split in the common ``{"prompt", "chosen", "rejected"}``: the two formats ``run_dpo.py``
reads. Our own generated data (released with the project under Apache-2.0), deterministic from a seed.

Usage: python scripts/make_preference_data.py paddle_llm/assets/preferences [--train 800] [--dev 100] [--seed 11]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_demo_corpus import ANIMALS, FEELINGS, NAMES, OBJECTS, PLACES, TIMES  # noqa: E402  (the corpus's world)

QUESTIONS = {"Where did {name} go?": ("place", "thing"), "What did {name} find?": ("thing", "place")}


def preference(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) for one story."""
    name = rng.choice(NAMES)
    slots = {"place": rng.choice(PLACES), "thing": rng.choice(OBJECTS)}
    story = (
        f"{rng.choice(TIMES)}, {name} went to {slots['place']} with a {rng.choice(ANIMALS)}. "
        f"There {name} found {slots['thing']} and felt {rng.choice(FEELINGS)}."
    )
    question, (right, wrong) = rng.choice(list(QUESTIONS.items()))
    return f"{story} {question.format(name=name)}", slots[right], slots[wrong]


def paddlenlp_record(prompt: str, chosen: str, rejected: str, rng: random.Random) -> dict:
    """PaddleNLP's format, with the chosen reply in a random position (its ``sort`` is the higher)."""
    if rng.random() < 0.5:
        return {"src": [prompt], "tgt": [], "response": [chosen, rejected], "sort": [1, 0]}
    return {"src": [prompt], "tgt": [], "response": [rejected, chosen], "sort": [0, 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--train", type=int, default=800, help="training pairs (default 800)")
    parser.add_argument("--dev", type=int, default=100, help="held-out pairs (default 100)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train = [preference(rng) for _ in range(args.train)]
    seen = {prompt for prompt, _, _ in train}
    dev = []
    while len(dev) < args.dev:
        candidate = preference(rng)
        if candidate[0] not in seen:
            dev.append(candidate)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "train.jsonl"), "w", encoding="utf-8") as f:
        for prompt, chosen, rejected in train:
            f.write(json.dumps(paddlenlp_record(prompt, chosen, rejected, rng)) + "\n")
    with open(os.path.join(args.output_dir, "dev.jsonl"), "w", encoding="utf-8") as f:
        for prompt, chosen, rejected in dev:
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    print(f"wrote {len(train)} training and {len(dev)} held-out preference pairs to {args.output_dir}")


if __name__ == "__main__":
    main()
