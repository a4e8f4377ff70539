"""``paddle_llm_export.json``: what a served model directory holds and how to drive its graph.

Everything the serving side needs that is not in PaddleNLP's own ``config.json`` lives here, so serving never
rebuilds the model to learn, say, where its cache keeps the batch axis.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from paddle_llm.cpu.features import PADDLE_CPU_KERNEL_NEEDS

MANIFEST_FILE = "paddle_llm_export.json"
GRAPH_PREFIX = "model"  # model.json + model.pdiparams: the step graph that runs on any x86-64 CPU
PARAMS_FILE = GRAPH_PREFIX + ".pdiparams"
PORTABLE_PROGRAM = GRAPH_PREFIX + ".json"
# The same step over the same model.pdiparams with Paddle's fused RMSNorm, whose only CPU kernel needs AVX-512.
AVX512_PROGRAM = GRAPH_PREFIX + ".avx512f.json"
# The same step multiplying by panel-packed weights with paddle_llm's compiled kernel; the packed weights are its own.
KERNELS_PROGRAM = GRAPH_PREFIX + ".kernels.json"
KERNELS_PARAMS_FILE = GRAPH_PREFIX + ".kernels.pdiparams"
# What a program needs besides CPU features: paddle_llm's CPU kernels compiled and loaded in the serving process.
COMPILED_KERNELS = "paddle_llm_cpu_kernels"
# paddle_llm's own ops (cpu/kernels.cc) that a step program may hold.
OWN_OP_NEEDS = {"paddle_llm_packed_matmul": COMPILED_KERNELS}
PREFIX_CACHE_FILE = "prefix_cache.pdparams"
FORMAT_STATIC = "paddle"
FORMAT_FASTDEPLOY = "fastdeploy"
FORMAT_HF = "hf"  # a Hugging Face model directory (transformers, vLLM, FastDeploy 2.x load it)
DTYPES = ("float32", "float16", "bfloat16")


# Which code a step graph was traced from (``step_graph.build_step_layer``).
STEP_PADDLENLP = "paddlenlp"  # PaddleNLP's own forward, wrapped in KVCacheStep
STEP_LLAMA_INFERENCE = "llama_inference"  # models.llama.inference_step.LlamaInferenceStep

# What the step graph returns (``step_graph``'s docstring): 1, every layer's grown cache (exports before preallocated
# serving caches, whose manifests lack the field); 2, only the new positions' keys and values.
STEP_INTERFACE = 2


@dataclass(frozen=True)
class CacheLayout:
    """Shape facts about one layer's KV cache: a 4-D tensor with batch, sequence and head at the given axes.

    The step graph takes and returns one key and one value tensor per layer (``num_layers`` of each), so a step
    never slices a stacked cache apart or stacks it back together: both are full copies.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    batch_axis: int
    seq_axis: int
    head_axis: int

    def shape(self, batch: int, length: int) -> list[int]:
        """One layer's cache shape for ``batch`` rows of ``length`` positions."""
        shape = [0, 0, 0, self.head_dim]
        shape[self.batch_axis] = batch
        shape[self.seq_axis] = length
        shape[self.head_axis] = self.num_kv_heads
        return shape

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ExportManifest:
    """The contents of ``paddle_llm_export.json``.

    Attributes:
        format: ``paddle`` (a step graph for Paddle Inference) or ``fastdeploy`` (safetensors for FastDeploy 2.x).
        family: model family; also names the chat template.
        dtype: parameter and cache dtype.
        vocab_size, max_context_length: model limits.
        eos_token_ids, pad_token_id: token ids the decoder needs.
        cache: ``CacheLayout`` fields (absent for the fastdeploy format).
        glm_positions: the graph takes ChatGLM v1 ``[b, 2, q]`` positions.
        step_implementation: which code the graph was traced from (``step_graph.build_step_layer``).
        prefix_cache: file holding a prefix-tuning past, or None.
        source: where the weights came from (checkpoint, LoRA, prefix paths).
        parity: the last parity check's summary, or None if not run.
        programs: the step graph's programs, best first, each ``{"file", "needs"}`` with what it needs to run
            (``program_needs``: CPU features, or ``COMPILED_KERNELS``) and, when its weights are not
            ``model.pdiparams``, ``"params"``; None in exports older than this field, which hold ``model.json`` only.
        step_interface: what the graph returns (``STEP_INTERFACE``); 1 in exports older than this field.
    """

    format: str
    family: str
    chat_template: str
    dtype: str
    vocab_size: int
    max_context_length: int
    eos_token_ids: list[int]
    pad_token_id: int
    cache: dict | None = None
    glm_positions: bool = False
    step_implementation: str = STEP_PADDLENLP
    prefix_cache: str | None = None
    source: dict = field(default_factory=dict)
    parity: dict | None = None
    programs: list[dict] | None = None
    step_interface: int = 1

    def cache_layout(self) -> CacheLayout:
        """Raises: ValueError when this export has no step graph (the fastdeploy format)."""
        if self.cache is None:
            raise ValueError(f"this is a {self.format!r} export without a step graph; export with --format paddle")
        try:
            return CacheLayout(**self.cache)
        except TypeError:
            raise ValueError(
                "this export's cache layout comes from an older paddle_llm (one stacked cache tensor); re-run "
                f"`paddle-llm export` on its checkpoint ({self.source.get('model_name_or_path', 'see source')})"
            ) from None

    def save(self, directory: str) -> str:
        path = os.path.join(directory, MANIFEST_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2, ensure_ascii=False)
        return path


def load_manifest(directory: str) -> ExportManifest:
    """Read an export directory's manifest.

    Raises:
        FileNotFoundError: not an export directory (the message says how to make one).
        ValueError: the manifest is not valid JSON or misses fields.
    """
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST_FILE}: it is not an export directory. Write one with "
            f"`paddle-llm export --model_name_or_path CKPT --output_path {directory}`, or serve a checkpoint "
            "directly with `--engine dygraph`"
        )
    with open(path, encoding="utf-8") as f:
        try:
            fields = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    try:
        return ExportManifest(**fields)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from None


# A PIR program's JSON names each operation as "<dialect id>.<op name>".
_PIR_OP_NAME = re.compile(r'"#":"\d+\.([A-Za-z0-9_]+)"')


def program_op_types(program_path: str) -> set[str]:
    """The operation names of a saved program (with its attribute and type tags, which name no operation)."""
    with open(program_path, encoding="utf-8") as f:
        return set(_PIR_OP_NAME.findall(f.read()))


def program_needs(program_path: str) -> list[str]:
    """What a saved program needs to run: the CPU features its Paddle kernels need (``config.cpu_features``'s
    table), and ``COMPILED_KERNELS`` when it holds one of our own ops."""
    needs_by_op = {**PADDLE_CPU_KERNEL_NEEDS, **OWN_OP_NEEDS}
    return sorted({needs_by_op[op] for op in program_op_types(program_path) if op in needs_by_op})


def program_params(program: dict) -> str:
    """The weights file a ``programs`` entry runs over."""
    return program.get("params", PARAMS_FILE)
