"""Running a trained model one step at a time: what both ``export`` and ``serving`` stand on.

Modules: ``manifest`` (``paddle_llm_export.json``), ``step_graph`` (the one-step KV-cache layer that is traced and
exported), ``runtime`` (the decoder that runs an exported step graph, with its batched cache bookkeeping), ``load``
(a checkpoint plus its LoRA or prefix adapter, loaded for inference).
"""
