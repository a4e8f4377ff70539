"""Hugging Face checkpoints in: the fixtures transformers wrote (tests/assets/hf, scripts/make_hf_fixtures.py) load
to transformers' logits, train to its losses, and every malformed checkpoint is an error naming the tensor."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.models import hf_checkpoint
from paddle_llm.models.registry import family_of_model
from paddle_llm.models.registry import build_config, build_model, resolve_model
from tests.conftest import ROOT

HF_ASSETS = os.path.join(ROOT, "tests", "assets", "hf")
LLAMA_FIXTURES = ["llama2", "llama3", "llama3-sharded", "llama3-bin"]
# transformers 5's: Llama with biases and head_dim 24 at hidden 64, Qwen3, ERNIE 4.5 (random norms and biases).
LAYER_OPTION_FIXTURES = ["llama-bias-headdim", "qwen3", "ernie4_5"]
# Mistral (sliding window), YaRN in transformers 4's rope_scaling and in 5's rope_parameters (random norms).
MISTRAL_YARN_FIXTURES = ["mistral", "llama3-yarn", "qwen2-yarn"]
# Both joined: YaRN on decoupled heads (Qwen3, ERNIE 4.5's reordered RoPE), Mistral-Nemo's head_dim.
JOINED_FIXTURES = ["qwen3-yarn", "ernie4_5-yarn", "mistral-headdim"]
FIXTURES = LLAMA_FIXTURES + ["qwen2"] + LAYER_OPTION_FIXTURES + MISTRAL_YARN_FIXTURES + JOINED_FIXTURES


def fixture_dir(name: str) -> str:
    return os.path.join(HF_ASSETS, name)


def reference(name: str) -> dict:
    with open(os.path.join(fixture_dir(name), "reference.json"), encoding="utf-8") as f:
        return json.load(f)


def load(directory: str):
    source = resolve_model(directory)
    return build_model(source, build_config(source, dtype="float32"), load_weights=True)


def logits_of(model, input_ids) -> np.ndarray:
    import paddle

    model.eval()
    with paddle.no_grad():
        output = model(paddle.to_tensor(input_ids), return_dict=True)
    return output.logits.numpy()


def tensors(directory: str) -> dict[str, np.ndarray]:
    return {name: np.array(array) for _, name, array in hf_checkpoint.iter_tensors(hf_checkpoint.find_hf_weights(directory))}


def writable_copy(name: str, tmp_path) -> str:
    """A copy of a fixture with its weights re-written as one model.safetensors the test may change."""
    directory = str(tmp_path / name)
    shutil.copytree(fixture_dir(name), directory)
    return directory


def rewrite_weights(directory: str, change) -> None:
    state = tensors(directory)
    change(state)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("fast_paths", ["paddlenlp", "cpu_fast_kernels", "cpu_fast_pure_paddle"])
@pytest.mark.parametrize("name", FIXTURES)
def test_logits_equal_transformers(name, fast_paths, monkeypatch):
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    if fast_paths == "cpu_fast_pure_paddle":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    model = load(fixture_dir(name))
    if fast_paths != "paddlenlp":
        assert "attention_rotary_mask" in " ".join(apply_cpu_fast_paths(model, family_of_model(model)))
    expected = np.load(os.path.join(fixture_dir(name), "reference_logits.npy"))
    np.testing.assert_allclose(logits_of(model, reference(name)["logits_input_ids"]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fast_paths", [False, True])
@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2"] + LAYER_OPTION_FIXTURES + MISTRAL_YARN_FIXTURES + JOINED_FIXTURES)
def test_three_adamw_steps_reproduce_transformers_losses(name, fast_paths):
    import paddle
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    ref = reference(name)["train"]
    settings = ref["optimizer"]
    model = load(fixture_dir(name))
    if fast_paths:
        assert apply_cpu_fast_paths(model, family_of_model(model))
    model.train()
    # As the fixture's torch param groups (and PaddleNLP's Trainer): no decay for norms and biases.
    decayed = {p.name for n, p in model.named_parameters() if not any(s in n for s in settings["no_decay_name_parts"])}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=settings["lr"], beta1=settings["betas"][0], beta2=settings["betas"][1], epsilon=settings["eps"],
        weight_decay=settings["weight_decay"], apply_decay_param_fun=lambda parameter: parameter in decayed,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(settings["max_grad_norm"]), parameters=model.parameters())
    losses = []
    for _ in range(3):
        loss = model(input_ids=paddle.to_tensor(ref["input_ids"]), labels=paddle.to_tensor(ref["labels"]), return_dict=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    np.testing.assert_allclose(losses, ref["losses"], atol=1e-4, rtol=0)


def test_hf_config_is_converted_for_paddlenlp():
    source = resolve_model(fixture_dir("llama3"))
    config = build_config(source)
    assert (config.num_key_value_heads, config.tie_word_embeddings) == (2, True)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 500000.0
    assert source.hf_weights.kind == "safetensors" and source.has_weights


def test_bin_and_shards_hold_the_same_tensors_as_one_safetensors():
    single = tensors(fixture_dir("llama3"))
    sharded = tensors(fixture_dir("llama3-sharded"))
    assert len(hf_checkpoint.find_hf_weights(fixture_dir("llama3-sharded")).files) > 1
    assert sharded.keys() == single.keys() and all(np.array_equal(sharded[k], single[k]) for k in single)
    from_bin = tensors(fixture_dir("llama3-bin"))
    # torch.save keeps both names of the tied embedding; the loader checks that they are equal.
    assert from_bin.keys() - single.keys() == {"lm_head.weight"}
    assert all(np.array_equal(from_bin[k], single[k]) for k in single)


def test_missing_tensor_is_named(tmp_path):
    directory = writable_copy("llama2", tmp_path)
    rewrite_weights(directory, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"no tensor for llama\.layers\.1\.mlp\.up_proj\.weight"):
        load(directory)


def test_unexpected_tensor_is_named(tmp_path):
    directory = writable_copy("llama2", tmp_path)
    rewrite_weights(directory, lambda state: state.update({"model.layers.1.self_attn.q_proj.bias": np.zeros(64, "float32")}))
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"'model\.layers\.1\.self_attn\.q_proj\.bias'.*not a parameter"):
        load(directory)


def test_wrong_shape_is_named(tmp_path):
    directory = writable_copy("llama2", tmp_path)
    rewrite_weights(directory, lambda state: state.update({"model.norm.weight": np.ones(32, "float32")}))
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"'model\.norm\.weight' has shape \[32\]"):
        load(directory)


def test_tied_copy_that_differs_is_refused(tmp_path):
    directory = writable_copy("llama3", tmp_path)
    rewrite_weights(directory, lambda state: state.update({"lm_head.weight": state["model.embed_tokens.weight"] + 1}))
    with pytest.raises(hf_checkpoint.CheckpointError, match="tie_word_embeddings is true but 'lm_head.weight' differs"):
        load(directory)


def test_unsupported_llama_config_is_refused_with_the_field(tmp_path):
    directory = writable_copy("llama2", tmp_path)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(pretraining_tp=2, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"config\.json: .*pretraining_tp 2.*rope_scaling of type 'longrope'"):
        resolve_model(directory)


def test_chatglm_hf_checkpoint_is_refused_with_the_reason(tmp_path):
    directory = tmp_path / "chatglm3"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "chatglm_v2", "num_layers": 2}))
    save_file({"transformer.embedding.word_embeddings.weight": np.zeros((4, 4), "float32")},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="only as remote code"):
        resolve_model(str(directory))


def test_pickle_with_code_is_refused(tmp_path):
    path = str(tmp_path / "pytorch_model.bin")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(os.system))
    with pytest.raises(hf_checkpoint.CheckpointError, match=r"refusing to unpickle posix\.system"):
        list(hf_checkpoint.read_torch_bin(path))


def test_our_own_safetensors_still_load_through_paddlenlp(tmp_path):
    """PaddleNLP's safetensors (metadata format "np") are not taken for a Hugging Face checkpoint."""
    save_file({"llama.norm.weight": np.ones(4, "float32")}, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
    assert hf_checkpoint.find_hf_weights(str(tmp_path)) is None


def test_bfloat16_is_widened_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype="float32")
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)
    path = str(tmp_path / "model.safetensors")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw.tobytes())
    ((name, array),) = hf_checkpoint.read_safetensors(path)
    assert name == "w" and np.array_equal(array, values)


def test_written_bfloat16_rounds_to_nearest_even_as_torch(tmp_path):
    # 1 + 2^-8 lies halfway between bfloat16 1.0 and 1.0078125 (ties to even: 1.0); 1 + 3 * 2^-8 halfway between
    # 1.0078125 and 1.015625 (ties to even: 1.015625); 1 + 2^-7 + 2^-9 is below halfway (1.0078125).
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7 + 2**-9, -2.5], dtype="float32")
    names = hf_checkpoint.write_safetensors({"w": values}, str(tmp_path), dtype="bfloat16")
    ((name, array),) = hf_checkpoint.read_safetensors(str(tmp_path / names[0]))
    np.testing.assert_array_equal(array, np.array([1.0, 1.015625, 1.0078125, -2.5], dtype="float32"))


def test_tensors_over_the_threshold_are_sharded_with_an_index(tmp_path):
    tensors = {f"t{i}": np.full((10, 10), i, dtype="float32") for i in range(5)}  # 400 bytes each
    names = hf_checkpoint.write_safetensors(tensors, str(tmp_path), max_shard_bytes=900)
    assert names[-1] == hf_checkpoint.SAFETENSORS_INDEX and len(names) == 4  # 2 + 2 + 1 tensors, then the index
    loaded = {name: array for _, name, array in hf_checkpoint.iter_tensors(hf_checkpoint.find_hf_weights(str(tmp_path)))}
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items()) and loaded.keys() == tensors.keys()


def test_split_loading_of_an_hf_dir_is_refused_before_any_process_starts():
    from paddle_llm.models.registry import hf_split_errors

    source = resolve_model(fixture_dir("llama2"))
    assert hf_split_errors(source, {"tensor_parallel_degree": 2}) and "--tensor_parallel_degree 2" in hf_split_errors(source, {"tensor_parallel_degree": 2})[0]
    assert hf_split_errors(source, {"tensor_parallel_degree": 1, "pipeline_parallel_degree": 1}) == []
    assert hf_split_errors(resolve_model("tiny-llama"), {"tensor_parallel_degree": 2}) == []
