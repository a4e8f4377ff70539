"""paddle_llm: from raw text to a served Llama or ChatGLM model with PaddlePaddle and PaddleNLP."""

import os

__version__ = "0.1.0"

# The data the package ships: the demo corpus, instructions, preferences and the demo tokenizer.
ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")

# The thread count the user asked for in the environment, read before importing Paddle, which sets
# OMP_NUM_THREADS itself when it is unset (cpu.threads honours this unless --num_threads says otherwise).
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")
