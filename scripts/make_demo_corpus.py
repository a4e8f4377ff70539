"""Write the shipped demo corpus: short templated stories, deterministic from a seed.

The corpus is our own generated text (released with the project under Apache-2.0), so the demo needs no
download and no third-party licence. Its regular grammar lets a tiny model learn it in a few CPU minutes,
which is the point of the demo: show the pipeline working end to end, not model quality.

Usage: python scripts/make_demo_corpus.py paddle_llm/assets/demo_corpus.jsonl [--docs 3000] [--seed 7]
"""

import argparse
import json
import random

NAMES = ["Ada", "Bao", "Chen", "Dara", "Eli", "Fang", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lin", "Mei", "Noor"]
ANIMALS = ["cat", "dog", "fox", "owl", "crow", "goat", "horse", "rabbit", "panda", "duck"]
PLACES = ["the river", "the old mill", "the market", "the forest", "the hill", "the harbor", "the garden", "school"]
OBJECTS = ["a red kite", "a small boat", "a map", "a lantern", "a basket of plums", "a blue hat", "a drum", "a key"]
FEELINGS = ["happy", "tired", "curious", "brave", "quiet", "hungry", "proud", "sleepy"]
WEATHER = ["It was sunny.", "It was raining.", "The wind was cold.", "Snow covered the roads.", "The sky was grey."]
TIMES = ["In the morning", "At noon", "In the evening", "One day", "Late at night", "After lunch"]


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, place, thing, feeling = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(FEELINGS)
    sentences = [
        f"{rng.choice(TIMES)}, {name} went to {place} with a {animal}.",
        rng.choice(WEATHER),
        f"There {name} found {thing} and felt {feeling}.",
        f"{friend} asked, \"Where did you find {thing}?\"",
        f"\"I found it at {place},\" said {name}.",
    ]
    if rng.random() < 0.5:
        count = rng.randint(2, 9)
        sentences.append(f"Together they counted {count} birds, then {count + 1}, then {count + 2}.")
    sentences.append(f"The {animal} was {rng.choice(FEELINGS)}, and they all went home.")
    return " ".join(sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        for _ in range(args.docs):
            f.write(json.dumps({"text": story(rng)}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
