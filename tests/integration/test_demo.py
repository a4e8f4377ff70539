"""`paddle-llm demo` is the README's first command: it must run end to end, meet its stated targets, and say so on
one screen."""

import re

import pytest

from tests.integration.test_output import assert_quiet

SCREEN_LINES = 40


@pytest.mark.slow
def test_demo_pretrains_finetunes_aligns_exports_and_serves(demo_run):
    _, result = demo_run
    assert result.returncode == 0, f"exit {result.returncode}\n--- stderr tail ---\n{result.stderr[-4000:]}"
    printed = result.stdout + result.stderr
    assert_quiet(printed)
    assert len(printed.splitlines()) <= SCREEN_LINES, printed
    assert "demo OK" in result.stdout
    first = float(re.search(r"loss at step 1:\s+([\d.]+)", result.stdout).group(1))
    final = float(re.search(r"eval loss after:\s+([\d.]+)", result.stdout).group(1))
    assert first > 6.0 and final < 1.0
    sample = re.search(r"sample:\s+'(.*)'", result.stdout).group(1)
    assert sample.startswith("In the morning, Ada went to") and len(sample) > len("In the morning, Ada went to") + 10
    after = int(re.search(r"held-out exact match after LoRA:\s+(\d+)%", result.stdout).group(1))
    assert after >= 90
    # the optional DPO stage (--dpo): held-out reward accuracy from the starting model's own preference to >= 90%
    before_dpo = int(re.search(r"held-out reward accuracy before DPO:\s+(\d+)%", result.stdout).group(1))
    after_dpo = int(re.search(r"held-out reward accuracy after DPO:\s+(\d+)%", result.stdout).group(1))
    assert before_dpo < 90 <= after_dpo
    # the served model answers the demo's held-out question over both protocols
    rest = re.search(r"answer over REST:\s+'(.*)'", result.stdout).group(1)
    grpc = re.search(r"answer over gRPC:\s+'(.*)'", result.stdout).group(1)
    assert rest.strip() == grpc.strip() == "the forest"
