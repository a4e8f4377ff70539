"""Model registry: presets, local directories, and hub names refused without a download."""

import json
import logging

import pytest

from paddle_llm.config.presets import PRESETS
from paddle_llm.models.registry import FAMILIES, build_config, build_model, family_of, load_tokenizer, resolve_model


@pytest.mark.parametrize("name, family", [("tiny-llama", "llama"), ("tiny-chatglm", "chatglm"), ("tiny-chatglm2", "chatglm2"), ("tiny-qwen2", "qwen2"), ("tiny-mistral", "mistral")])
def test_presets_resolve_to_their_family_and_stay_tiny(name, family):
    source = resolve_model(name)
    assert source.family.name == family and not source.has_weights
    fields = source.config_fields
    assert 64 <= fields["hidden_size"] <= 256
    assert 2 <= fields["num_hidden_layers"] <= 4


@pytest.mark.parametrize("name", ["facebook/llama-7b", "THUDM/chatglm-6b", "__internal_testing__/tiny-random-llama"])
def test_hub_names_fail_with_a_message_not_a_download(name):
    with pytest.raises(FileNotFoundError, match="never downloads.*local directory"):
        resolve_model(name)


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(ValueError, match="'bloom' is not supported; supported model types: llama, chatglm"):
        resolve_model(str(tmp_path))


def test_local_directory_round_trip(saved_tiny_models):
    source = resolve_model(saved_tiny_models["chatglm2"])
    assert source.family is FAMILIES["chatglm2"] and source.has_weights


def test_every_preset_fits_the_shipped_tokenizer():
    for name in PRESETS:
        source = resolve_model(name)
        tokenizer = load_tokenizer(name, source.family)
        assert len(tokenizer) <= source.config_fields["vocab_size"]


@pytest.fixture
def our_log_lines():
    """The messages our ``paddle_llm`` logger emits during a test. It does not propagate to the root logger, and its
    stderr handler exists only once an entry point has run ``configure_output``, so pytest's capture alone would
    depend on which test ran first."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("paddle_llm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_model_from_scratch_grows_to_its_tokenizer_and_trained_weights_refuse_a_larger_one(tmp_path, saved_tiny_models, our_log_lines):
    """PaddleNLP's run_pretrain.py rule, for presets and config-only directories: the vocabulary grows to the
    tokenizer rounded up to a multiple of 128, with one log line; trained weights keep their rows."""
    from paddle_llm.data.jsonl import DataError
    from paddle_llm.recipes.spine import embedding_rows

    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny-chatglm2"], "vocab_size": 2000}))
    config_only = resolve_model(str(tmp_path))
    assert embedding_rows(resolve_model("tiny-llama"), 1000, "tok", continuing=False) == 1024
    assert embedding_rows(config_only, 1920, "tok", continuing=False) == 2000
    assert our_log_lines == []  # nothing grew, nothing said
    assert embedding_rows(config_only, 1999, "tok", continuing=False) == 2048  # PaddleNLP rounds up even when it fits
    assert embedding_rows(resolve_model("tiny-llama"), 1025, "tok", continuing=False) == 1152
    assert our_log_lines == [
        f"vocab size 2000 -> 2048: {tmp_path} starts from random weights and the tokenizer tok has 1999 tokens "
        "(rounded up to a multiple of 128, as PaddleNLP's run_pretrain.py does)",
        "vocab size 1024 -> 1152: preset tiny-llama starts from random weights and the tokenizer tok has 1025 tokens "
        "(rounded up to a multiple of 128, as PaddleNLP's run_pretrain.py does)",
    ]
    trained = resolve_model(saved_tiny_models["llama"])
    assert embedding_rows(trained, 1000, "tok", continuing=True) == 1024
    with pytest.raises(DataError, match="has 1025 tokens but the weights in .* have 1024 rows .*pass the tokenizer the model was trained with"):
        embedding_rows(trained, 1025, "tok", continuing=True)


def test_continue_training_without_weights_is_refused():
    source = resolve_model("tiny-llama")
    with pytest.raises(FileNotFoundError, match="--continue_training needs weights"):
        build_model(source, build_config(source), load_weights=True)


def test_family_from_architectures_only():
    assert family_of({"architectures": ["LlamaForCausalLM"]}).name == "llama"


@pytest.mark.parametrize("family", sorted(name for name, family in FAMILIES.items() if family.estimate_only is None))
def test_alias_tables_match_paddlenlp_config_classes(family):
    config_class, _, _ = FAMILIES[family].classes()
    assert FAMILIES[family].field_aliases == dict(getattr(config_class, "attribute_map", {}))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_the_tiny_shape_they_name(name):
    """ChatGLM configs ignore ``num_layers=`` in their constructor; the registry must not build a 28-layer model."""
    source = resolve_model(name)
    config = build_config(source)
    assert config.num_hidden_layers == 2 and config.vocab_size == 1024 and config.hidden_size == 128
