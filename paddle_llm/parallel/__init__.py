"""Everything about running one model over several processes: CPU collective fallbacks and the pre-launch check.

``cpu_collectives`` is the only module in the toolkit that patches Paddle or PaddleNLP internals; ``check`` is the
``paddle-llm check`` command. Nothing here is imported by model code.
"""
