"""Parameter-efficient and memory-efficient fine-tuning: LoRA, prefix tuning, LOMO, and merging LoRA into a model.

LoRA and prefix tuning are PaddleNLP's own ``LoRAModel`` / ``PrefixModelForCausalLM`` (so adapters are saved in
PaddleNLP's layout and load in PaddleNLP); this package adds what they leave to the caller: per-family targets and
past-key-value layouts, checks with clear errors, and the merge command. LOMO is ours (``lomo.py``).
"""
