"""Every CPU kernel path is chosen from the CPU's features: given feature sets, the choices are the right ones, and
a feature set without AVX-512 never selects an AVX-512 kernel, compile flag or fusion pass."""

from __future__ import annotations

import dataclasses

import json

import pytest

from paddle_llm.cpu import features as cpu_features
from paddle_llm.cpu.features import (
    CpuFeatures,
    fused_rms_norm_allowed,
    inference_passes_to_delete,
    kernel_compile_flags,
    missing_features,
)

AVX2_MACHINE = frozenset({"sse42", "avx", "avx2", "fma3", "f16c"})  # AMD EPYC before Zen 4, Haswell to Comet Lake
AVX512_MACHINE = AVX2_MACHINE | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # Skylake-SP and later


def cpu(flags) -> CpuFeatures:
    return CpuFeatures(frozenset(flags), "test")


@pytest.mark.parametrize("flags, level", [
    (AVX512_MACHINE, "avx512"),
    (AVX512_MACHINE | {"avx512_spr", "avx512fp16"}, "avx512"),
    (AVX2_MACHINE | {"avx512f"}, "avx2"),  # Xeon Phi-like: F without BW/DQ/VL is not the AVX-512 level GCC targets
    (AVX2_MACHINE, "avx2"),
    ({"sse42", "avx"}, "avx"),
    ({"sse42"}, "sse4.2"),
    (set(), "x86-64"),
])
def test_vector_isa_level(flags, level):
    assert cpu(flags).isa.name == level


def test_compile_flags_never_go_beyond_the_features():
    assert "-march=native" not in kernel_compile_flags(cpu(AVX512_MACHINE))
    avx2_flags = kernel_compile_flags(cpu(AVX2_MACHINE))
    assert avx2_flags == ("-mavx2", "-mfma", "-mf16c")
    assert not [flag for flag in avx2_flags if "512" in flag]
    assert "-mavx512f" in kernel_compile_flags(cpu(AVX512_MACHINE))
    assert kernel_compile_flags(cpu(set())) == ()


def test_avx512_only_paddle_kernels_are_chosen_only_with_avx512():
    assert fused_rms_norm_allowed(cpu(AVX512_MACHINE))
    assert not fused_rms_norm_allowed(cpu(AVX2_MACHINE))
    assert missing_features(["matmul", "fused_rms_norm_quant", "self_dp_attention"], cpu(AVX2_MACHINE)) == {
        "fused_rms_norm_quant": "avx512f", "self_dp_attention": "avx512f"}
    assert missing_features(["matmul", "fused_rms_norm_quant"], cpu(AVX512_MACHINE)) == {}


def test_inference_fusion_passes_into_avx512_kernels_are_deleted_without_avx512():
    assert inference_passes_to_delete(cpu(AVX2_MACHINE)) == ["self_attention_fuse_pass"]
    assert inference_passes_to_delete(cpu(AVX512_MACHINE)) == []


def test_detect_reads_cpuid_through_numpy():
    """The private numpy table ``detect`` reads (``_NUMPY_FEATURE_TABLES``) still exists and names what we test for."""
    features = cpu_features.detect()
    assert features.source == cpu_features.FROM_CPUID
    table = cpu_features._numpy_feature_table()
    assert table is not None and {"AVX", "AVX2", "FMA3", "F16C", "AVX512F", "AVX512BW"} <= set(table)
    assert features.has("avx"), "Paddle's wheel needs AVX: this process could not be running otherwise"


def test_kernel_cache_key_and_flags_follow_the_cpu(monkeypatch):
    from paddle_llm.cpu import kernels as cpu_kernels

    directories, flags = {}, {}
    for name, machine in (("avx2", AVX2_MACHINE), ("avx512", AVX512_MACHINE)):
        monkeypatch.setattr(cpu_features, "detect", lambda machine=machine: cpu(machine))
        directories[name], flags[name] = cpu_kernels.build_directory(), cpu_kernels.compile_flags()
    assert directories["avx2"] != directories["avx512"], "a kernel built for one CPU must not load on another"
    assert not [flag for flag in flags["avx2"] if "512" in flag or flag == "-march=native"]
    assert "-mavx512f" in flags["avx512"]


def write_program(path, ops):
    # The shape of a PIR program's JSON as far as op names go: {"#": "<dialect>.<op>"} objects.
    path.write_text(json.dumps({"program": {"ops": [{"#": f"1.{op}"} for op in ops]}}, separators=(",", ":")))


def manifest_with(programs):
    from paddle_llm.inference.manifest import ExportManifest

    return ExportManifest(format="paddle", family="llama", chat_template="llama", dtype="float32", vocab_size=8,
                          max_context_length=8, eos_token_ids=[2], pad_token_id=0, programs=programs,
                          source={"model_name_or_path": "/ckpt"})


def test_serving_picks_the_best_program_the_cpu_runs(tmp_path, monkeypatch):
    from paddle_llm.inference.runtime import best_program, runnable_programs

    programs = [{"file": "model.avx512f.json", "needs": ["avx512f"]}, {"file": "model.json", "needs": []}]
    manifest = manifest_with(programs)
    assert runnable_programs(str(tmp_path), manifest, cpu(AVX512_MACHINE)) == (["model.avx512f.json", "model.json"], {})
    assert runnable_programs(str(tmp_path), manifest, cpu(AVX2_MACHINE)) == (["model.json"], {"model.avx512f.json": ["avx512f"]})
    monkeypatch.setattr(cpu_features, "detect", lambda: cpu(AVX2_MACHINE))
    assert best_program(str(tmp_path), manifest) == "model.json"


def test_the_compiled_kernel_program_runs_where_the_kernels_load_and_never_on_gpu(tmp_path, monkeypatch, caplog):
    """Mocked: a machine whose kernels cannot be compiled (no C++ compiler) is simulated by ``load`` returning None."""
    from paddle_llm.inference import runtime
    from paddle_llm.inference.manifest import program_needs

    write_program(tmp_path / "model.kernels.json", ["embedding", "paddle_llm_packed_matmul"])
    assert program_needs(str(tmp_path / "model.kernels.json")) == ["paddle_llm_cpu_kernels"]
    programs = [{"file": "model.kernels.json", "params": "model.kernels.pdiparams", "needs": ["paddle_llm_cpu_kernels"]},
                {"file": "model.json", "needs": []}]
    manifest = manifest_with(programs)
    monkeypatch.setattr(cpu_features, "detect", lambda: cpu(AVX2_MACHINE))
    monkeypatch.setattr(runtime.cpu_kernels, "load", lambda: object())
    assert runtime.best_program(str(tmp_path), manifest) == "model.kernels.json"
    assert runtime.best_program(str(tmp_path), manifest, on_gpu=True) == "model.json"
    monkeypatch.setattr(runtime.cpu_kernels, "load", lambda: None)
    assert runtime.runnable_programs(str(tmp_path), manifest, cpu(AVX2_MACHINE)) == (
        ["model.json"], {"model.kernels.json": ["paddle_llm_cpu_kernels"]})
    with caplog.at_level("WARNING"):
        assert runtime.best_program(str(tmp_path), manifest) == "model.json"
    assert "serving model.json: model.kernels.json needs paddle_llm's compiled CPU kernels" in caplog.text
    servable = dataclasses.replace(manifest, step_interface=runtime.STEP_INTERFACE, cache=dict(
        num_layers=1, num_kv_heads=1, head_dim=8, batch_axis=0, head_axis=1, seq_axis=2))
    with pytest.raises(ValueError, match="model.kernels.json needs paddle_llm's compiled CPU kernels"):
        runtime.open_export_decoder(str(tmp_path), servable, program="model.kernels.json")


def test_an_older_export_is_read_for_its_needs_and_refused_clearly(tmp_path, monkeypatch):
    """An export from before ``programs`` holds model.json only, maybe with the fused RMSNorm: on a CPU without
    AVX-512 that is a message saying to re-export, not a SIGILL."""
    from paddle_llm.inference.runtime import best_program, runnable_programs

    write_program(tmp_path / "model.json", ["embedding", "fused_rms_norm_quant", "matmul"])
    older = manifest_with(None)
    assert runnable_programs(str(tmp_path), older, cpu(AVX2_MACHINE)) == ([], {"model.json": ["avx512f"]})
    monkeypatch.setattr(cpu_features, "detect", lambda: cpu(AVX2_MACHINE))
    with pytest.raises(ValueError, match=r"model.json needs avx512f; this CPU: avx2.*export it again.*/ckpt"):
        best_program(str(tmp_path), older)
    write_program(tmp_path / "model.json", ["embedding", "matmul"])
    assert best_program(str(tmp_path), older) == "model.json"
