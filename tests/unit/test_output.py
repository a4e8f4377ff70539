"""The output policy's parts: which PaddleNLP lines stay, which warnings go, and output held for a failing step."""

import logging
import subprocess
import sys

import pytest

from paddle_llm import console as output


def paddlenlp_record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("PaddleNLP", level, "log.py", 1, message, None, None)


@pytest.mark.parametrize("level, message", [
    (logging.INFO, "loss: 6.84556503, learning_rate: 5e-05, global_step: 10, interval_runtime: 0.2"),
    (logging.INFO, "eval_loss: 6.65, eval_ppl: 772.9, eval_runtime: 0.0975"),
    (logging.INFO, "train_runtime: 0.4881, train_samples_per_second: 163.908, train_loss: 6.77"),
    (logging.INFO, "***** eval metrics *****"),
    (logging.INFO, "  eval_loss               =     6.6502"),
    (logging.INFO, "Saving model checkpoint to out/checkpoint-20"),
    (logging.WARNING, "Checkpoint config mismatches the model"),
    (logging.ERROR, "anything"),
])
def test_paddlenlp_progress_results_and_warnings_stay(level, message):
    assert output._PaddleNLPFilter().filter(paddlenlp_record(level, message))


@pytest.mark.parametrize("level, message", [
    (logging.DEBUG, "     Training Configuration Arguments    "),
    (logging.INFO, "Loading configuration file out/config.json"),
    (logging.INFO, "All the weights of LlamaForCausalLM were initialized from the model checkpoint at out."),
    (logging.INFO, "Model weights saved in out/model_state.pdparams"),
    (logging.INFO, "  Num examples = 3,072"),
    (logging.WARNING, "evaluation_strategy reset to IntervalStrategy.STEPS for do_eval is True. you can also set ..."),
])
def test_paddlenlp_chatter_goes(level, message):
    assert not output._PaddleNLPFilter().filter(paddlenlp_record(level, message))


def test_only_the_listed_warnings_are_dropped():
    shown = []
    show = output._drop_noisy_warnings(lambda message, *rest: shown.append(str(message)))
    paddles_deprecation = type("VisibleDeprecationWarning", (UserWarning,), {})
    for message, category in [("No ccache found. Please be aware", UserWarning),
                              ("Setuptools is replacing distutils.", UserWarning),
                              ('API "paddle.incubate.nn.functional.swiglu.swiglu" is deprecated', paddles_deprecation),
                              ("--use_flash_attention is a GPU op; falling back", UserWarning),
                              ("No ccache found", DeprecationWarning)]:
        show(UserWarning(message), category, "x.py", 1)
    assert shown == ["--use_flash_attention is a GPU op; falling back", "No ccache found"]


def test_captured_output_holds_a_child_process_output_and_replays_it_on_failure(capfd):
    with output.captured_output():
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"], check=True)
    assert capfd.readouterr() == ("", "")
    with pytest.raises(subprocess.CalledProcessError):
        with output.captured_output():
            subprocess.run([sys.executable, "-c", "print('compiler said why'); raise SystemExit(1)"], check=True)
    assert "compiler said why" in capfd.readouterr().err


def test_verbose_switch(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv(output.VERBOSE_VARIABLE, value)
        assert output.verbose() is expected
