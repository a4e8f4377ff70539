"""``paddle-llm export``: checkpoint -> step graph (or FastDeploy layout) with a parity check, or a Hugging Face directory.

Examples::

    paddle-llm export --model_name_or_path out/ckpt --output_path out/export
    paddle-llm export --model_name_or_path out/base --lora_path out/lora --output_path out/export
    paddle-llm export --model_name_or_path out/ckpt --output_path out/fd --format fastdeploy
    paddle-llm export --model_name_or_path out/base --lora_path out/lora --output_path out/hf --format hf
    paddle-llm export --check_only out/export          # re-run the parity check on an existing export

Exit codes: 0 done (parity passed or skipped), 1 parity failed, 2 bad flags or inputs.
"""

from __future__ import annotations

import argparse
import sys

from paddle_llm.export.exporter import ExportRequest, export_checkpoint
from paddle_llm.inference.manifest import DTYPES, FORMAT_FASTDEPLOY, FORMAT_HF, FORMAT_STATIC, load_manifest
from paddle_llm.models.hf_checkpoint import parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paddle-llm export",
        description="Export a checkpoint to a static decoding-step graph for Paddle Inference, or to FastDeploy's "
        "checkpoint layout, and check the graph decodes exactly like the checkpoint.",
    )
    parser.add_argument("--model_name_or_path", help="checkpoint directory (config.json + weights + tokenizer)")
    parser.add_argument("--output_path", help="export directory to write (replaced atomically); it must not hold or sit "
                        "inside an input, and an existing one is replaced only if export wrote it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output_path that export did not write (everything in it is deleted)")
    parser.add_argument("--lora_path", help="LoRA adapter directory; merged into the weights before export")
    parser.add_argument("--prefix_path", help="prefix-tuning directory; exported as a ready-made past")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="parameter and cache dtype (default float32; for --format hf, the dtype the checkpoint's "
                        "config.json names, so a bf16 checkpoint exports as bf16)")
    parser.add_argument("--format", default=FORMAT_STATIC, choices=(FORMAT_STATIC, FORMAT_FASTDEPLOY, FORMAT_HF),
                        help="paddle: step graph for our engine; fastdeploy: safetensors for FastDeploy 2.x (GPU); "
                        "hf: a Hugging Face model directory (transformers, vLLM)")
    parser.add_argument("--max_shard_size", type=parse_size, default="5GB",
                        help="--format hf: largest safetensors file before sharding with an index (e.g. 5GB, 500MB)")
    parser.add_argument("--check_only", metavar="EXPORT_DIR",
                        help="only run the parity check on this export (checkpoint defaults to the one it came from)")
    parser.add_argument("--skip_check", action="store_true", help="do not run the parity check after export")
    parser.add_argument("--check_tokens", type=int, default=8, help="greedy tokens compared per prompt")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed logit difference")
    return parser


def _run_check(export_dir: str, args, log) -> int:
    from paddle_llm.export.parity import check_export

    manifest = load_manifest(export_dir)
    source = manifest.source or {}
    checkpoint = args.model_name_or_path or source.get("model_name_or_path")
    if not checkpoint:
        raise ValueError("--model_name_or_path is needed: the export does not record its checkpoint")
    report = check_export(
        export_dir,
        checkpoint,
        lora_path=args.lora_path or source.get("lora_path"),
        prefix_path=args.prefix_path or source.get("prefix_path"),
        new_tokens=args.check_tokens,
        atol=args.atol,
    )
    log(report.summary())
    manifest.parity = report.to_dict()
    manifest.save(export_dir)
    return 0 if (report.passed or report.skipped) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = print
    try:
        if args.check_only:
            return _run_check(args.check_only, args, log)
        missing = [flag for flag in ("model_name_or_path", "output_path") if not getattr(args, flag)]
        if missing:
            raise ValueError(f"missing --{' --'.join(missing)} (or pass --check_only EXPORT_DIR)")

        request = ExportRequest(
            model_name_or_path=args.model_name_or_path,
            output_path=args.output_path,
            dtype=args.dtype,
            format=args.format,
            lora_path=args.lora_path,
            prefix_path=args.prefix_path,
            max_shard_bytes=args.max_shard_size,
            overwrite=args.overwrite,
        )
        export_checkpoint(request, log=log)
        if args.skip_check or args.format in (FORMAT_FASTDEPLOY, FORMAT_HF):
            return 0
        return _run_check(args.output_path, args, log)
    except (ValueError, FileNotFoundError) as err:
        print(f"paddle-llm export: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
