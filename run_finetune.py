"""PaddleNLP-compatible entry point: ``python run_finetune.py [args.json] --flag value ...``.

Works under ``python -m paddle.distributed.launch`` exactly like PaddleNLP's llm/run_finetune.py (the current name of its
finetune_generation.py).
"""

import sys

from paddle_llm.console import configure_output

if __name__ == "__main__":
    configure_output()  # before the recipe imports Paddle, whose C++ logging reads its level as it loads
    from paddle_llm.recipes import script_main

    sys.exit(script_main(__file__))
