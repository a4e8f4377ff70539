"""PaddleNLP-compatible entry point: ``python run_pretrain.py [args.json] --flag value ...``.

Works under ``python -m paddle.distributed.launch`` exactly like PaddleNLP's llm/run_pretrain.py.
"""

import sys

from paddle_llm.trainer.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
