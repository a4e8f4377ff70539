"""Export: a checkpoint (plus LoRA or prefix) to a static one-step KV-cache graph for Paddle Inference, to the
checkpoint layout FastDeploy 2.x serves, or to a Hugging Face directory, with a parity check against dygraph.

Modules: ``exporter`` (writing the directory), ``parity`` (the check), ``command`` (the CLI). The step graph and the
decoder it is checked with live in ``paddle_llm.inference``.
"""
