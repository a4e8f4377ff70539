"""Everything about running one model over several processes: CPU collective fallbacks and checkpoint conversion.

``cpu_collectives`` is the only module in the toolkit that patches Paddle or PaddleNLP internals; ``convert`` is the
``paddle-llm convert-checkpoint`` command (the pre-launch ``paddle-llm check`` runs the recipes' own setup, so it
lives with them in ``trainer.check``). Nothing here is imported by model code.
"""
