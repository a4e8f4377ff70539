"""PaddleNLP-compatible entry point: ``python finetune_generation.py [args.json] --flag value ...``.

Works under ``python -m paddle.distributed.launch`` exactly like PaddleNLP's finetune_generation.py.
"""

import sys

from paddle_llm.trainer.finetune import main

if __name__ == "__main__":
    sys.exit(main())
