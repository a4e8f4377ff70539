#!/usr/bin/env bash
# Regenerate paddle_llm/serving/generation_pb2*.py from generation.proto.
# Uses the pinned grpcio-tools (1.62.3, bundling protoc 25.x) so the stubs run with the pinned protobuf 4.25;
# newer grpcio-tools emit code that needs protobuf 5+. Run from anywhere; pass PYTHON=... to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# Proto path relative to the repository root, so the generated grpc module imports
# `from paddle_llm.serving import generation_pb2` instead of a top-level `generation_pb2`.
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. paddle_llm/serving/generation.proto
echo "wrote paddle_llm/serving/generation_pb2.py and generation_pb2_grpc.py"
