"""Write the items of the lm-eval task set in benchmarks/lm_eval_tasks/: held-out questions of the demo's instruction task.

Each item is a new record from scripts/make_instruction_data.py's generator (another seed; stories the shipped
train.json or dev.json hold are skipped), so the demo's fine-tuned model (`paddle-llm demo`) has to read each story:

- demo_place.jsonl (multiple_choice, scored by log-likelihood): "... Where did Kai go?", the eight places of the
  corpus's world as choices (chance 1/8);
- demo_object.jsonl (generate_until): "... What did Kai find?", answered by the object.

Usage: python scripts/make_lm_eval_tasks.py benchmarks/lm_eval_tasks [--items 30] [--seed 2026]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_demo_corpus import PLACES  # noqa: E402  (the corpus's world)
from make_instruction_data import record  # noqa: E402

INSTRUCTIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "paddle_llm", "assets",
                                "instructions")


def held_out_records(per_question: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(``per_question`` place questions, ``per_question`` object questions), none of them in the shipped task."""
    seen = set()
    for name in ("train.json", "dev.json"):
        with open(os.path.join(INSTRUCTIONS_DIR, name), encoding="utf-8") as f:
            seen |= {json.loads(line)["src"].rsplit(".", 1)[0] for line in f}  # the story, whatever the question
    rng, places, objects = random.Random(seed), [], []
    while len(places) < per_question or len(objects) < per_question:
        item = record(rng)
        story = item["src"].rsplit(".", 1)[0]
        if story in seen:
            continue
        seen.add(story)
        bucket = places if item["tgt"] in PLACES else objects
        if len(bucket) < per_question:
            bucket.append(item)
    return places, objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--items", type=int, default=30, help="items per task (default 30)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    places, objects = held_out_records(args.items, args.seed)
    with open(os.path.join(args.output_dir, "demo_place.jsonl"), "w", encoding="utf-8") as f:
        for item in places:
            f.write(json.dumps({"question": item["src"], "choices": PLACES, "gold": PLACES.index(item["tgt"])}) + "\n")
    with open(os.path.join(args.output_dir, "demo_object.jsonl"), "w", encoding="utf-8") as f:
        for item in objects:
            f.write(json.dumps({"question": item["src"], "answer": item["tgt"]}) + "\n")
    print(f"wrote {len(places)} + {len(objects)} items to {args.output_dir}")


if __name__ == "__main__":
    main()
