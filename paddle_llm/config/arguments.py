"""Argument dataclasses for ``run_pretrain.py`` and ``finetune_generation.py``; field names are PaddleNLP's, so old
scripts run unchanged.

``ModelArguments`` and ``DataArguments`` mirror PaddleNLP's ``llm/run_pretrain.py``. ``CpuRuntimeArguments``
extends PaddleNLP's ``TrainingArguments`` (through ``llmmetaclass``, which adds ``use_flash_attention``,
``recompute_granularity`` and the other model-runtime flags) with the CPU switches both trainers share;
``PretrainingArguments`` adds the pretraining schedule and ``FinetuneArguments`` the fine-tuning optimizers.
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
    flash_mask: bool = field(
        default=False, metadata={"help": "PaddleNLP's GPU flash-mask attention; on CPU attention runs through explicit masks (the same attention)"}
    )


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
class CpuRuntimeArguments(TrainingArguments):
    """PaddleNLP's TrainingArguments plus the CPU runtime switches that pretraining and fine-tuning share."""

    num_threads: Optional[int] = field(
        default=None, metadata={"help": "math-library threads on CPU (default: the cores this process may use)"}
    )
    # PaddleNLP's llm/ throughput switches, declared so its argument files parse; refused when on
    # (config.validation.check_paddle_runtime_limits)
    benchmark: bool = field(default=False, metadata={"help": "PaddleNLP's throughput mode; not supported here"})
    autotuner_benchmark: bool = field(default=False, metadata={"help": "PaddleNLP's autotuner mode; not supported here"})
    cpu_fast_paths: bool = field(
        default=True,
        metadata={
            "help": "on CPU, run RMSNorm, rotary, attention, SwiGLU and the loss through paddle_llm's numerically equal "
            "fast implementations; False keeps PaddleNLP's own (for comparing, or ruling them out)"
        },
    )


@dataclass
@llmmetaclass
class PretrainingArguments(CpuRuntimeArguments):
    """The shared training arguments plus the pretraining schedule."""

    min_learning_rate: float = field(default=1e-5, metadata={"help": "the learning rate the schedule decays to"})
    decay_steps: Optional[float] = field(
        default=None, metadata={"help": "steps over which the rate decays (default: max_steps)"}
    )
    eval_iters: int = field(default=10, metadata={"help": "batches per evaluation"})
    test_iters: int = field(default=100, metadata={"help": "batches for the test split"})


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning (``finetune_generation.py`` / ``paddle-llm finetune``): PaddleNLP's llm/finetune_generation.py field names.

SFT_DATA_FORMATS = ("auto", "src_tgt", "alpaca", "chat", "sharegpt")
# PaddleNLP's own optimizer names plus the two this toolkit adds for full fine-tuning.
OWN_OPTIMIZERS = ("sgd", "lomo")


@dataclass
class FinetuneDataArguments:
    """Where the fine-tuning data is, how it is rendered and how long a sample may be."""

    dataset_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "a directory holding train.json and/or dev.json (jsonl, one record per line)"}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "record format: src_tgt {src,tgt}, alpaca {instruction,input,output}, chat {messages}, sharegpt "
            "{conversations}; auto detects it from each file's first record"
        },
    )
    src_length: int = field(default=128, metadata={"help": "most prompt tokens per round (the start is cut first)"})
    tgt_length: int = field(
        default=160, metadata={"help": "reply tokens: the default --max_length is src_length + tgt_length, and generation stops after this many"}
    )
    max_length: Optional[int] = field(
        default=None, metadata={"help": "most tokens per sample, prompt and reply together (default src_length + tgt_length)"}
    )
    instruction_generation: bool = field(
        default=False,
        metadata={"help": "instruction tuning: render single-turn src/tgt records with the model's chat template too"},
    )
    zero_padding: bool = field(
        default=False, metadata={"help": "pack several samples into each max_length sequence (attention stays within a sample)"}
    )
    greedy_zero_padding: bool = field(
        default=False,
        metadata={"help": "with --zero_padding: pack as PaddleNLP does, in file order 500 samples at a time, each into the pack with the most room (default: best-fit decreasing, less padding)"},
    )
    lazy: bool = field(
        default=False, metadata={"help": "read each sample from the file when the trainer asks for it instead of holding them all (the same samples, order and batches); not with --zero_padding"}
    )
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "skip malformed records (each is reported) instead of stopping at the first"}
    )
    strict_data: bool = field(
        default=False,
        metadata={"help": "stop with an error on records that read fine but teach nothing (a reply that is empty) instead of counting them in one warning line"},
    )
    eval_with_do_generation: bool = field(
        default=False, metadata={"help": "evaluation also decodes each dev prompt greedily and reports exact match"}
    )
    do_generation: bool = field(default=False, metadata={"help": "same as --eval_with_do_generation"})

    @property
    def max_seq_length(self) -> int:
        """The effective ``--max_length`` (the name the shared model builder reads)."""
        return self.max_length or self.src_length + self.tgt_length

    @property
    def generation_eval(self) -> bool:
        return bool(self.eval_with_do_generation or self.do_generation)


@dataclass
class PeftArguments:
    """Parameter-efficient fine-tuning: LoRA or prefix tuning (PaddleNLP's flag names)."""

    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of the full model"})
    lora_path: Optional[str] = field(default=None, metadata={"help": "start from this saved LoRA adapter directory"})
    r: int = field(default=8, metadata={"help": "LoRA rank (alias --lora_rank)"})
    lora_alpha: Optional[int] = field(
        default=None, metadata={"help": "LoRA scaling numerator (scaling = alpha / r); default 2 x r, PaddleNLP's fixed value"}
    )
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "layer names (q_proj v_proj) or regular expressions to adapt; default: the family's attention and MLP projections"},
    )
    merge_weights: bool = field(
        default=False, metadata={"help": "after training, also write OUTPUT_DIR/merged: the base model with the adapter folded in"}
    )
    weight_quantize_algo: Optional[str] = field(
        default=None,
        metadata={"help": "QLoRA: store the frozen base as nf4, fp4, weight_only_int8 or weight_only_int4 (needs --lora True)"},
    )
    qlora_weight_blocksize: int = field(
        default=64, metadata={"help": "nf4/fp4: weights per absmax block (alias --weight_blocksize); must divide hidden_size"}
    )
    qlora_weight_double_quant: bool = field(
        default=False, metadata={"help": "nf4/fp4: also quantize the block scales to 8 bits (alias --weight_double_quant)"}
    )
    qlora_weight_double_quant_block_size: int = field(
        default=256, metadata={"help": "block scales per 8-bit block of the double quantization (alias --weight_double_quant_block_size)"}
    )
    # PaddleNLP's LoRA variants, passed through to its LoRAModel (PaddleNLP's definitions: lora_layers.py)
    rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale the adapter by lora_alpha / sqrt(r) instead of lora_alpha / r"})
    lora_plus_scale: float = field(
        default=1.0, metadata={"help": "LoRA+: the B matrices learn this many times faster than the A matrices"}
    )
    rslora_plus: bool = field(
        default=False, metadata={"help": "PaddleNLP's shorthand for --rslora True --lora_plus_scale 4 --lora_alpha 4"}
    )
    pissa: bool = field(
        default=False,
        metadata={"help": "PiSSA: start the adapter from the base weight's top-r singular vectors (scaling 1); the saved adapter is an ordinary LoRA on the original base"},
    )
    # PaddleNLP 3.0.0b4's other PEFT methods: declared so their argument files parse, refused by name
    # (config.validation.UNCLAIMED_PEFT_METHODS) until they are implemented here.
    vera: bool = field(default=False, metadata={"help": "VeRA: not supported here"})
    vera_rank: Optional[int] = field(default=None, metadata={"help": "VeRA's rank: not supported here"})
    lokr: bool = field(default=False, metadata={"help": "LoKr: not supported here"})
    lokr_path: Optional[str] = field(default=None, metadata={"help": "LoKr's adapter: not supported here"})
    lokr_dim: Optional[int] = field(default=None, metadata={"help": "LoKr's rank: not supported here"})
    use_shift_sparse_attention: bool = field(default=False, metadata={"help": "LongLoRA's shifted sparse attention: not supported here"})
    use_mora: bool = field(default=False, metadata={"help": "MoRA: not supported here"})
    lora_use_mixer: bool = field(default=False, metadata={"help": "MosLoRA: not supported here"})
    reft: bool = field(default=False, metadata={"help": "ReFT: not supported here"})
    prefix_tuning: bool = field(default=False, metadata={"help": "train a prefix (virtual past keys/values) only"})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "start from this saved prefix directory"})
    num_prefix_tokens: int = field(default=128, metadata={"help": "prefix length in tokens"})
    prefix_projection: bool = field(default=False, metadata={"help": "produce the prefix through a 2-layer MLP"})


@dataclass
@llmmetaclass
class FinetuneArguments(CpuRuntimeArguments):
    """The shared training arguments plus ``--optim sgd|lomo`` and bounded evaluation.

    PaddleNLP validates ``optim`` against its own names in ``__post_init__``; ``sgd`` and ``lomo`` are built by our
    trainer, so they pass that check as ``adamw`` and are put back afterwards.
    """

    optim: str = field(
        default="adamw",
        metadata={"help": "adamw (or another PaddleNLP optimizer), sgd, or lomo: SGD fused into backward, no stored gradients"},
    )
    eval_iters: int = field(default=-1, metadata={"help": "batches per evaluation (-1: the whole dev set)"})

    def __post_init__(self):
        requested = self.optim
        if requested in OWN_OPTIMIZERS:
            self.optim = "adamw"
        super().__post_init__()
        if requested in OWN_OPTIMIZERS:
            self.optim = requested


# ---------------------------------------------------------------------------------------------------------------------
# DPO's training arguments (its data and loss arguments are its own, in ``recipes/dpo.py``): a TrainingArguments
# subclass loads PaddleNLP, which the recipe modules leave out at import so that ``paddle-llm --help`` stays instant.


@dataclass
@llmmetaclass
class DPOTrainingArguments(CpuRuntimeArguments):
    """The shared training arguments plus bounded evaluation."""

    eval_iters: int = field(default=-1, metadata={"help": "batches per evaluation (-1: the whole dev set)"})
