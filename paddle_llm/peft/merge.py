"""``paddle-llm merge-lora``: fold a LoRA adapter into its base model and write a plain model directory.

Like PaddleNLP's ``merge_lora_params.py --model_name_or_path --lora_path --output_path``. The output loads anywhere
the base model loads (no adapter code needed) and computes ``x W + x A B * scaling`` as one matrix product. The
directory is written under a temporary name and renamed into place, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from paddle_llm.files import check_output_directory, replace_directory_atomically
from paddle_llm.models.hf_checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    WRITABLE_DTYPES,
    default_write_dtype,
    parse_size,
    save_hf_directory,
)
from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model
from paddle_llm.peft.lora import load_lora, merge_lora
from paddle_llm.peft.quantize import recorded_quantization

FORMATS = ("paddle", "hf")

PROBE_LENGTH = 16
MERGE_COMMAND = "merge-lora"  # the marker its output directories carry


def save_model_atomically(model, tokenizer, output_path: str, overwrite: bool = False) -> None:
    """Save ``model`` (and ``tokenizer``, if given) to ``output_path``, replacing it only once fully written, and
    only if ``merge-lora`` wrote it (or ``overwrite``)."""

    def write(staging: str) -> None:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    replace_directory_atomically(output_path, write, MERGE_COMMAND, prefix=".merge-", overwrite=overwrite)


def probe_logits(model, family, vocab_size: int) -> np.ndarray:
    """Logits of a fixed token sequence: a cheap fingerprint to compare two models' outputs."""
    import paddle

    ids = (np.arange(PROBE_LENGTH, dtype="int64")[None, :] * 37 + 11) % max(2, vocab_size - 10) + 10
    extra = {k: paddle.to_tensor(v) for k, v in family.causal_lm_inputs(ids).items()}
    model.eval()
    with paddle.no_grad():
        outputs = model(input_ids=paddle.to_tensor(ids), **extra)
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits
    return logits.astype("float32").numpy()


def require_merge_changed_base(base_logits: np.ndarray, merged_logits: np.ndarray, adapter_is_zero: bool,
                               lora_path: str) -> None:
    """Refuse a merge that left every probe logit of the base exactly as it was although the adapter is non-zero:
    its layers did not take part, and writing the base under a new name would pass for a merged model.

    Raises:
        ValueError: naming the adapter.
    """
    if not adapter_is_zero and np.array_equal(base_logits, merged_logits):
        raise ValueError(
            f"--lora_path {lora_path!r}: merging changed no logit of the base although the adapter's weights are "
            "non-zero, so its layers did not attach to this model; pass the base model the adapter was trained on")


def merge_lora_checkpoint(model_name_or_path: str, lora_path: str, output_path: str, output_format: str = "paddle",
                          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                          dtype: str | None = None) -> float:
    """Load base + adapter, merge, save; return the largest logit difference between the two on a probe sequence.

    A QLoRA adapter is compared against, and merged into, its quantized base (``load_lora`` quantizes it as the
    adapter records), so the difference measures the merge, not the quantization.

    Args:
        output_format: ``paddle`` (PaddleNLP's layout) or ``hf`` (a Hugging Face directory, sharded over
            ``max_shard_bytes``).
        overwrite: replace an existing ``output_path`` that ``merge-lora`` did not write.
        dtype: ``hf`` only: the weights' dtype on disk; None writes the base checkpoint's stored dtype.

    Raises:
        FileNotFoundError: the base has no weights, or ``lora_path`` is not an adapter directory.
        ValueError: the adapter does not fit the base (``AdapterMismatchError``), or merging it changed nothing.
        OutputPathError (a ValueError): ``output_path`` overlaps the base or the adapter, or holds other files.
    """
    source = resolve_model(model_name_or_path)
    check_output_directory("--output_path", output_path, {"--model_name_or_path": source.directory, "--lora_path": lora_path},
                           MERGE_COMMAND, overwrite=overwrite)
    if not source.has_weights:
        raise FileNotFoundError(f"--model_name_or_path {model_name_or_path!r} has no weights to merge into; pass the base model directory the adapter was trained on")
    if output_format == "hf" and source.family.hf is None:
        raise ValueError(f"--format hf is not available for {source.family.name}: {source.family.hf_refusal}")
    if dtype is not None and output_format != "hf":
        raise ValueError(f"--dtype {dtype} applies to --format hf only; --format {output_format} saves the merged "
                         "model in float32 (drop --dtype, or add --format hf)")
    base = build_model(source, build_config(source, dtype="float32"), load_weights=True)
    vocab = int(base.config.vocab_size)
    base_logits = probe_logits(base, source.family, vocab)
    lora_model = load_lora(base, lora_path, model_name_or_path)
    adapter_is_zero = not any(np.any(value.numpy() != 0) for name, value in lora_model.get_trainable_state_dict().items()
                              if "lora_B" in name)
    reference = probe_logits(lora_model, source.family, vocab)
    merged = merge_lora(lora_model)
    merged_logits = probe_logits(merged, source.family, vocab)
    require_merge_changed_base(base_logits, merged_logits, adapter_is_zero, lora_path)
    difference = float(np.abs(merged_logits - reference).max())
    try:
        tokenizer = load_tokenizer(source.directory, source.family)
    except (FileNotFoundError, OSError, ValueError):
        tokenizer = None  # a model directory without a tokenizer: the merged one has none either
    if output_format == "hf":
        ids = {name: getattr(merged.config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        replace_directory_atomically(
            output_path, lambda staging: save_hf_directory(merged, source.family.hf, tokenizer, staging, ids, max_shard_bytes,
                                                           dtype or default_write_dtype(source.stored_dtype)),
            MERGE_COMMAND, prefix=".merge-", overwrite=overwrite)
    else:
        save_model_atomically(merged, tokenizer, output_path, overwrite)
    return difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paddle-llm merge-lora",
        description="Fold a LoRA adapter into its base model and write a plain model directory.",
        epilog="example: paddle-llm merge-lora --model_name_or_path base_dir --lora_path out/lora --output_path merged",
    )
    parser.add_argument("--model_name_or_path", required=True, help="the base model directory (config.json + weights)")
    parser.add_argument("--lora_path", required=True, help="the adapter directory a LoRA run saved (lora_config.json)")
    parser.add_argument("--output_path", required=True, help="where the merged model goes (replaced atomically); it must "
                        "not hold or sit inside the base or the adapter, and an existing one is replaced only if merge-lora wrote it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output_path that merge-lora did not write (everything in it is deleted)")
    parser.add_argument("--device", default="cpu", help="device to merge on (default: cpu; merging is cheap)")
    parser.add_argument("--format", default="paddle", choices=FORMATS,
                        help="paddle: PaddleNLP's layout; hf: a Hugging Face directory (as `export --format hf`)")
    parser.add_argument("--max_shard_size", type=parse_size, default="5GB",
                        help="--format hf: largest safetensors file before sharding with an index")
    parser.add_argument("--dtype", choices=WRITABLE_DTYPES,
                        help="--format hf: the weights' dtype on disk (default: the dtype the base's config.json names)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import paddle

    paddle.set_device(args.device)
    try:
        difference = merge_lora_checkpoint(args.model_name_or_path, args.lora_path, args.output_path, args.format, args.max_shard_size,
                                            args.overwrite, args.dtype)
    except (FileNotFoundError, ValueError) as err:  # OutputPathError is a ValueError
        print(f"paddle-llm merge-lora: error: {err}", file=sys.stderr)
        return 2
    spec = recorded_quantization(args.lora_path)
    if spec is not None:
        print(f"QLoRA adapter: merged into the base dequantized from {spec.describe()}, the weights it was trained on (not the original float base)")
    print(f"merged model written to {args.output_path}; max |logit difference| against base + adapter: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
