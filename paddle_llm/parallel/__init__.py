"""Running one model over several processes on CPU: the gloo collective fallbacks fleet's hybrid parallel needs.

``cpu_collectives`` is the only module in the toolkit that patches Paddle or PaddleNLP internals. Merging a
multi-rank checkpoint for one device (``paddle-llm convert-checkpoint``) is ``trainer.convert_checkpoint``, beside
the checkpoint marker it re-records. Nothing here is imported by model code.
"""
