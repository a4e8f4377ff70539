"""The lm-eval task set (benchmarks/lm_eval_tasks) is what scripts/make_lm_eval_tasks.py writes, held out from the
instruction task the demo fine-tunes on, and answerable from each story."""

import filecmp
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS_DIR = os.path.join(ROOT, "benchmarks", "lm_eval_tasks")
ITEM_FILES = ("demo_place.jsonl", "demo_object.jsonl")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_items_are_the_generators_output(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_lm_eval_tasks.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for name in ITEM_FILES:
        assert filecmp.cmp(tmp_path / name, os.path.join(TASKS_DIR, name), shallow=False), name


def test_items_are_held_out_and_answered_by_their_story():
    shipped = {row["src"] for name in ("train.json", "dev.json")
               for row in read_jsonl(os.path.join(ROOT, "paddle_llm", "assets", "instructions", name))}
    places = read_jsonl(os.path.join(TASKS_DIR, "demo_place.jsonl"))
    objects = read_jsonl(os.path.join(TASKS_DIR, "demo_object.jsonl"))
    assert len(places) == len(objects) == 30
    for item in places:
        assert item["question"] not in shipped and f"went to {item['choices'][item['gold']]} with" in item["question"]
    for item in objects:
        assert item["question"] not in shipped and f"found {item['answer']} and" in item["question"]
