"""Data: tokenizer training, jsonl reading with precise errors, the mmap indexed format, and pretraining datasets."""
