"""Argument dataclasses for ``run_pretrain.py``; field names are PaddleNLP's, so old scripts run unchanged.

``ModelArguments`` and ``DataArguments`` mirror PaddleNLP's ``llm/run_pretrain.py``. ``PretrainingArguments``
extends PaddleNLP's ``TrainingArguments`` (through ``llmmetaclass``, which adds ``use_flash_attention``,
``recompute_granularity`` and the other model-runtime flags) with the pretraining schedule fields and ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from paddlenlp.trainer import TrainingArguments
from paddlenlp.transformers.configuration_utils import llmmetaclass


@dataclass
class ModelArguments:
    """Which model and tokenizer to train, and model-side switches."""

    model_name_or_path: str = field(
        default="tiny-llama",
        metadata={"help": "a preset (tiny-llama, tiny-chatglm, tiny-chatglm2) or a local directory with config.json"},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "tokenizer directory; defaults to the model's (or the preset's shipped one)"}
    )
    model_type: Optional[str] = field(
        default=None, metadata={"help": "llama, chatglm or chatglm2; checked against the model's config when given"}
    )
    continue_training: bool = field(
        default=False, metadata={"help": "start from the model directory's weights instead of a random init"}
    )
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "override the layer count"})
    hidden_dropout_prob: float = field(default=0.0, metadata={"help": "hidden dropout (models that have one)"})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"help": "attention dropout"})
    use_fast_layer_norm: bool = field(default=False, metadata={"help": "GPU fused layer norm (GPT-style models)"})
    fuse_attention_qkv: Optional[bool] = field(default=None, metadata={"help": "one fused q/k/v projection"})
    fuse_attention_ffn: Optional[bool] = field(default=None, metadata={"help": "one fused gate/up projection"})


@dataclass
class DataArguments:
    """Where the pretraining data is and how to cut it."""

    input_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "a directory of .bin/.idx pairs, one prefix (path without .bin/.idx), or a weighted blend "
            "\"0.7 prefix_a 0.3 prefix_b\""
        },
    )
    split: str = field(default="949,50,1", metadata={"help": "train,valid,test proportions of the documents"})
    max_seq_length: int = field(default=1024, metadata={"help": "tokens per training sample"})
    share_folder: bool = field(default=False, metadata={"help": "data and output dirs are shared across nodes"})
    data_impl: str = field(default="mmap", metadata={"help": "only mmap is supported"})
    skip_warmup: bool = field(default=True, metadata={"help": "skip reading the mmap files once before training"})
    data_cache: Optional[str] = field(
        default=None, metadata={"help": "where the sample-index cache goes (default: next to the data)"}
    )


@dataclass
@llmmetaclass
class PretrainingArguments(TrainingArguments):
    """PaddleNLP's TrainingArguments plus the pretraining schedule and paddle_llm's own switches."""

    min_learning_rate: float = field(default=1e-5, metadata={"help": "the learning rate the schedule decays to"})
    decay_steps: Optional[float] = field(
        default=None, metadata={"help": "steps over which the rate decays (default: max_steps)"}
    )
    eval_iters: int = field(default=10, metadata={"help": "batches per evaluation"})
    test_iters: int = field(default=100, metadata={"help": "batches for the test split"})
    num_threads: Optional[int] = field(
        default=None, metadata={"help": "math-library threads on CPU (default: the cores this process may use)"}
    )
