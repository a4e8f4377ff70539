"""Mistral's sliding window, which paddle_llm's attention does not build: every command that trains, checks or
serves refuses a sequence longer than the window by name, before any work starts (the fixture has sliding_window 32
of 128 positions); within the window it is Llama (its logits, losses, export and serving: test_hf_checkpoint.py,
tests/integration/test_hf_models.py)."""

from __future__ import annotations

import os

import pytest

from paddle_llm.models.registry import build_config, load_tokenizer, resolve_model
from paddle_llm.tools import check
from tests.conftest import ROOT

MISTRAL = os.path.join(ROOT, "tests", "assets", "hf", "mistral")


@pytest.fixture
def clean_world_size(monkeypatch):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")  # `check` sets the launcher's variable for the recipe


@pytest.mark.parametrize("script, length_flags, named", [
    ("run_pretrain.py", ["--max_seq_length", "64"], "--max_seq_length 64"),
    ("finetune_generation.py", ["--src_length", "24", "--tgt_length", "16"], "--src_length + --tgt_length 40"),
    ("finetune_generation.py", ["--max_length", "33", "--lora", "True"], "--max_length 33"),
    ("run_dpo.py", ["--max_seq_len", "48"], "--max_seq_len 48"),
])
def test_check_refuses_a_training_sequence_longer_than_the_window(script, length_flags, named, clean_world_size, capsys, tmp_path):
    argv = [script, "--model_name_or_path", MISTRAL, "--output_dir", str(tmp_path / "out"), "--device", "cpu", *length_flags]
    assert check.main(argv) == check.EXIT_BAD_CONFIG
    assert f"{named} is longer than the model's sliding_window 32" in capsys.readouterr().err


def test_check_accepts_a_training_sequence_within_the_window(clean_world_size, capsys, tmp_path):
    argv = ["run_pretrain.py", "--model_name_or_path", MISTRAL, "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--max_seq_length", "32", "--continue_training", "1"]
    assert check.main(argv) == 0, capsys.readouterr().err


def test_serving_context_is_the_window_and_a_longer_request_is_a_400_naming_it():
    from paddle_llm.serving.openai.completions.protocol import CompletionsProtocol
    from paddle_llm.serving.openai.protocol import RequestError, ServingLimits

    source = resolve_model(MISTRAL)
    context = source.family.max_context_length(build_config(source, dtype="float32"))
    assert context == 32  # of 128 positions
    protocol = CompletionsProtocol("mistral", source.family, load_tokenizer(MISTRAL, source.family), context,
                                   ServingLimits(max_tokens_limit=64, max_prompt_tokens=context, default_max_tokens=8))
    assert protocol.prepare({"model": "mistral", "prompt": "The sky was", "max_tokens": 8}).params.max_tokens == 8
    with pytest.raises(RequestError) as refused:
        protocol.prepare({"model": "mistral", "prompt": "The sky was", "max_tokens": 40})
    assert refused.value.status == 400 and "sliding_window" in refused.value.message


def test_a_decoupled_head_dim_builds_llamas_own_attention():
    """Mistral-Nemo's head_dim (not hidden / heads) is Llama's layer option: the config keeps it and the attention is
    that width (tests/unit/test_hf_checkpoint.py's mistral-headdim fixture checks the logits against transformers)."""
    from paddle_llm.models.registry import build_model

    source = resolve_model(os.path.join(ROOT, "tests", "assets", "hf", "mistral-headdim"))
    assert (source.family.name, source.config_fields["head_dim"], source.config_fields["sliding_window"]) == ("mistral", 24, None)
    attention = build_model(source, build_config(source), load_weights=False).llama.layers[0].self_attn
    assert type(attention).__name__ == "LlamaOptionsAttention" and attention.q_proj.weight.shape == [64, 4 * 24]


def test_a_mistral_our_runs_saved_keeps_its_window_and_exports_as_mistral(tmp_path):
    """PaddleNLP saves the model (a LlamaConfig) with model_type llama and sliding_window kept: it reads back as Llama
    with the same window refusals, and its Hugging Face config is Mistral's again."""
    import json

    from paddle_llm.models.llama import hf as llama_hf

    saved = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 910,
             "max_position_embeddings": 128, "sliding_window": 32}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    source = resolve_model(str(tmp_path))
    assert source.family.window_errors(source.config_fields, 48, "--max_seq_length") == [
        "--max_seq_length 48 is longer than the model's sliding_window 32: paddle_llm's attention has no window, so it "
        "would attend further back than the model was trained to; use --max_seq_length 32 or less"]
    written = llama_hf.config_to_hf(build_config(source, dtype="float32"))
    assert (written["model_type"], written["architectures"], written["sliding_window"]) == ("mistral", ["MistralForCausalLM"], 32)
    assert "attention_bias" not in written
