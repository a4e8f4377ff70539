"""`paddle-llm demo` is the README's first command: it must run and meet its stated loss target."""

import re

from tests.conftest import run_script


def test_demo_learns_and_samples(tmp_path):
    result = run_script(["-m", "paddle_llm", "demo", "--output_dir", str(tmp_path / "demo"), "--disable_tqdm"], OMP_NUM_THREADS=2)
    assert "demo OK" in result.stdout
    first = float(re.search(r"loss at step 1:\s+([\d.]+)", result.stdout).group(1))
    final = float(re.search(r"eval loss after:\s+([\d.]+)", result.stdout).group(1))
    assert first > 6.0 and final < 1.0
    sample = re.search(r"sample:\s+'(.*)'", result.stdout).group(1)
    assert sample.startswith("In the morning, Ada went to") and len(sample) > len("In the morning, Ada went to") + 10
