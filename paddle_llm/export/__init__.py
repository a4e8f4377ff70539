"""Export: a checkpoint (plus LoRA or prefix) to a static one-step KV-cache graph for Paddle Inference, or to the
checkpoint layout FastDeploy 2.x serves, with a parity check against dygraph.

Modules: ``step_graph`` (the traced step), ``runtime`` (running it, batched cache bookkeeping), ``exporter`` (writing
the directory), ``parity`` (the check), ``manifest`` (``paddle_llm_export.json``), ``command`` (the CLI).
"""
