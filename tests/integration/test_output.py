"""What a person reads (``paddle_llm.console``): real commands print our lines, progress bars and warnings
that need action, and none of Paddle's or PaddleNLP's chatter; ``PADDLE_LLM_VERBOSE=1`` brings the chatter back.

Run as from a user's shell: Python warnings on (``run_script`` turns them off) and ``OMP_NUM_THREADS`` above 1.
"""

import httpx
import pytest

from paddle_llm.console import VERBOSE_VARIABLE
from paddle_llm.serving.process import ServerProcess
from tests.conftest import RUN_PRETRAIN, run_script, subprocess_env
from tests.integration.test_pretrain import pretrain_flags

# Each test pretrains, exports or serves in fresh processes (a module-scoped 20-step pretraining first).
pytestmark = pytest.mark.slow

USER_SHELL = {"PYTHONWARNINGS": "", "OMP_NUM_THREADS": "2"}
VERBOSE = {**USER_SHELL, VERBOSE_VARIABLE: "1"}
# A fragment of each third-party line the default output must not show (all printed before config.output existed).
NOISE = (
    "PLEASE USE OMP_NUM_THREADS WISELY",  # Paddle's import, OMP_NUM_THREADS > 1
    "No ccache found",  # paddle.utils.cpp_extension's import
    "Setuptools is replacing distutils",
    "VisibleDeprecationWarning",  # paddle.incubate swiglu, from PaddleNLP's Llama and its to_static copy
    "not support input out tensor",  # PIR, C++ glog, at every export trace
    "HTTP Request:",  # httpx's INFO log, once per openai client call
    "Loading configuration file",  # PaddleNLP INFO
    "All the weights of",  # PaddleNLP INFO
    "Model weights saved in",  # PaddleNLP INFO
    "Configuration Arguments",  # PaddleNLP's DEBUG dump of every flag
    "building dataset index",  # PaddleNLP's sample-index builder, print()
    "using custom operator only",  # Paddle's custom-op loader, each time our kernels load
)


def assert_quiet(output: str) -> None:
    shown = [fragment for fragment in NOISE if fragment in output]
    assert not shown, f"third-party noise in the default output: {shown}\n{output[-3000:]}"


def pretrain(data: str, output_dir: str, **env):
    # --use_flash_attention on a CPU: a fallback warning the user must still see
    flags = pretrain_flags(data, output_dir, do_eval=1, disable_tqdm=0, use_flash_attention=1)
    return run_script([RUN_PRETRAIN] + flags, **env)


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory):
    """A 20-step run with the default output: (its stdout + stderr, its output directory)."""
    output_dir = str(tmp_path_factory.mktemp("output") / "pretrain")
    result = pretrain(demo_data, output_dir, **USER_SHELL)
    return result.stdout + result.stderr, output_dir


def test_pretrain_prints_our_lines_progress_and_warnings_and_verbose_adds_the_rest(pretrained, demo_data, tmp_path):
    output, _ = pretrained
    assert_quiet(output)
    for line in ("[paddle_llm] warning: --use_flash_attention", "[paddle_llm] model: llama", "[paddle_llm] data: ",
                 "TrainProcess:", "loss: ", "eval_loss: ", "***** eval metrics *****", "Saving model checkpoint to "):
        assert line in output, line
    result = pretrain(demo_data, str(tmp_path / "verbose"), **VERBOSE)
    verbose = result.stdout + result.stderr
    for line in ("PLEASE USE OMP_NUM_THREADS WISELY", "No ccache found", "Training Configuration Arguments",
                 "building dataset index", "Model weights saved in", "[paddle_llm] warning: --use_flash_attention"):
        assert line in verbose, line


def test_export_and_serve_print_only_our_lines_and_verbose_adds_paddles(pretrained, tmp_path):
    _, model_dir = pretrained
    export = ["-m", "paddle_llm", "export", "--model_name_or_path", model_dir, "--output_path"]
    export_dir = str(tmp_path / "export")
    result = run_script(export + [export_dir], **USER_SHELL)
    output = result.stdout + result.stderr
    assert_quiet(output)
    assert "parity PASSED" in output and f"wrote {export_dir}" in output
    with ServerProcess(["--model", export_dir], str(tmp_path / "server.log"), env=subprocess_env(**USER_SHELL)) as server:
        reply = httpx.post(server.url + "/v1/completions", json={"model": "export", "prompt": "In the", "max_tokens": 4}, timeout=120)
        assert reply.status_code == 200
    log = open(server.log_path, encoding="utf-8").read()
    assert_quiet(log)
    assert f"on {server.url}" in log
    result = run_script(export + [str(tmp_path / "verbose"), "--check_tokens", "1"], **VERBOSE)
    verbose = result.stdout + result.stderr
    assert "not support input out tensor" in verbose and "All the weights of" in verbose
