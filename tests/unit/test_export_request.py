"""Export refuses flag combinations it cannot honour before it loads anything, naming the flag to change."""

import pytest

from paddle_llm.export.exporter import ExportRequest


@pytest.mark.parametrize("fields, message", [
    ({"format": "fastdeploy", "prefix_path": "out/prefix"}, "--format fastdeploy cannot carry a prefix"),
    ({"lora_path": "out/lora", "prefix_path": "out/prefix"}, "--lora_path and --prefix_path are exclusive"),
    ({"dtype": "int8"}, "--dtype must be one of"),
    ({"format": "onnx"}, "--format must be"),
    ({"output_path": "out/ckpt"}, "--output_path out/ckpt is the input --model_name_or_path out/ckpt"),
], ids=["fastdeploy_prefix", "lora_and_prefix", "dtype", "format", "same_directory"])
def test_export_refuses_what_it_cannot_honour(fields, message):
    request = ExportRequest(**{"model_name_or_path": "out/ckpt", "output_path": "out/export", **fields})
    with pytest.raises(ValueError, match=message):
        request.validate()


def test_a_plain_paddle_export_with_lora_is_accepted():
    ExportRequest(model_name_or_path="out/ckpt", output_path="out/export", lora_path="out/lora").validate()
