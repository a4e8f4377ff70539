"""Training: PaddleNLP Trainer subclasses, callbacks (metrics.jsonl, grad norm), atomic checkpoints, recipes."""
