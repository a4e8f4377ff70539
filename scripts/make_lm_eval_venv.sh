#!/usr/bin/env bash
# Makes the venv that runs lm-evaluation-harness against `paddle-llm serve`, for tests and benchmarks only:
# lm-eval is never a paddle_llm dependency (CI has no torch; tests/integration/test_lm_eval.py skips without it).
#
#   bash scripts/make_lm_eval_venv.sh [VENV_DIR]        # default /work/lmevalvenv
#
# torch 2.13.0 (CPU) installs from this machine's local wheel; transformers is pinned to the 4.46 line the HF
# export is checked against (/work/torchvenv). `[api]` brings local-completions' client, `[hf]` the hf backend.
# Nothing here downloads weights or datasets: the tests run lm_eval with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1.
set -euo pipefail
VENV=${1:-/work/lmevalvenv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0 'transformers==4.46.3' 'lm-eval[api,hf]==0.4.13' sentencepiece protobuf
"$VENV/bin/lm_eval" --help >/dev/null
echo "lm-eval venv ready: $VENV/bin/lm_eval"
