"""paddle_llm: from raw text to a served Llama or ChatGLM model with PaddlePaddle and PaddleNLP."""

__version__ = "0.1.0"
