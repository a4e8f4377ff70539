"""``serve``'s LoRA adapter flags are checked before anything loads: one error line naming the flag, exit 2."""

import pytest

from paddle_llm.serving.command import main as serve_main


@pytest.mark.parametrize("flags, message", [
    (["--lora_modules", "a=ADAPTER"], "--lora_modules needs --engine dygraph: an export's step graph has the base "
                                      "weights (any adapter merged) and no adapter inputs"),
    (["--enable_lora_runtime_updates"], "--enable_lora_runtime_updates needs --engine dygraph"),
    (["--engine", "dygraph", "--lora_modules", "a"], "--lora_modules 'a': write each adapter as NAME=PATH"),
    (["--engine", "dygraph", "--lora_modules", "a=ADAPTER", "a=ADAPTER"], "--lora_modules: the name 'a' is taken"),
    (["--engine", "dygraph", "--lora_modules", "base=ADAPTER"], "--lora_modules: the name 'base' is taken"),
    (["--engine", "dygraph", "--lora_modules", "a=/nonexistent"], "--lora_modules a=/nonexistent: not a directory"),
    (["--engine", "dygraph", "--max_loras", "2"], "--max_loras sizes the slots of LoRA adapters; pass --lora_modules "
                                                  "or --enable_lora_runtime_updates too"),
    (["--engine", "dygraph", "--lora_modules", "a=ADAPTER", "b=ADAPTER", "--max_loras", "1"],
     "--lora_modules names 2 adapters but --max_loras is 1"),
    (["--engine", "dygraph", "--enable_lora_runtime_updates", "--max_lora_rank", "0"],
     "--max_loras and --max_lora_rank must be at least 1"),
], ids=["export", "export-runtime-updates", "no-path", "same-name", "base-name", "missing", "slots-alone", "too-many", "rank-0"])
def test_adapter_flags_are_refused_in_one_line_before_loading(tmp_path, capsys, flags, message):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    flags = [str(adapter) if flag == "ADAPTER" else flag.replace("ADAPTER", str(adapter)) for flag in flags]
    assert serve_main(["--model", str(base), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"paddle-llm serve: error: {message}") and "\n" not in error, error
