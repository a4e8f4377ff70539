"""Built-in model presets: tiny configs that train on a laptop CPU, usable as ``--model_name_or_path NAME``.

Every preset's vocabulary matches the shipped demo tokenizer (``paddle_llm/assets/tokenizer``): SentencePiece
with 1000 pieces, where ``<unk>=0, <s>=1, </s>=2, <pad>=3, [MASK]=4, [gMASK]=5, [sMASK]=6, <sop>=7, <eop>=8``
(fixed by ``paddle_llm.data.tokenizer.SPECIAL_PIECES``). ChatGLM2's tokenizer appends its own five command tokens
after the SentencePiece pieces, so every preset reserves 1024 embedding rows.

Presets are plain dicts of the PaddleNLP config constructors' own field names (``num_hidden_layers``, not ChatGLM's
read-only alias ``num_layers``, which the constructor ignores), so they are data, not code: the model registry
turns them into ``LlamaConfig`` / ``ChatGLMConfig`` / ``ChatGLMv2Config`` / ``Qwen2Config``.
"""

from __future__ import annotations

import copy
import os

from paddle_llm import ASSETS_DIR

TINY_VOCAB_SIZE = 1024
# The tokenizer every preset's vocabulary is laid out for (see the module docstring).
SHIPPED_TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")

# The grouped-query presets' common shape: 4 heads of 32 at hidden 128, 2 KV heads, 2048 positions.
_TINY_GROUPED_QUERY = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
# Qwen3 and ERNIE 4.5 decouple the head width from the hidden size: heads of 64 at hidden 128 (4 heads, 2 KV heads).
_TINY_DECOUPLED_HEADS = {**_TINY_GROUPED_QUERY, "head_dim": 64, "seq_length": 2048, "tie_word_embeddings": True}

PRESETS: dict[str, dict] = {
    # Llama shape scaled down: 4 heads of 32, SwiGLU width ~ 8/3 * hidden rounded to a multiple of 32.
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
    },
    # ChatGLM-6B (v1) shape scaled down: 2D rotary positions, GELU MLP of 4 * hidden.
    "tiny-chatglm": {
        "model_type": "chatglm",
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 128,
        "inner_hidden_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_sequence_length": 2048,
        "layernorm_epsilon": 1e-5,
        "position_encoding_2d": True,
        "bos_token_id": 7,
        "eos_token_id": 8,
        "pad_token_id": 3,
        "mask_token_id": 4,
        "gmask_token_id": 5,
    },
    # ChatGLM2-6B shape scaled down: multi-query attention with 2 KV groups, SwiGLU, RMSNorm.
    "tiny-chatglm2": {
        "model_type": "chatglm_v2",
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 128,
        "ffn_hidden_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "kv_channels": 32,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "max_sequence_length": 2048,
        "layernorm_epsilon": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    # Qwen2.5-0.5B's shape scaled down: grouped-query attention (2 KV heads), q/k/v biases, LM head tied to the
    # embedding, rope_theta 1e6. It reads the shipped SentencePiece tokenizer (through Llama's tokenizer class).
    "tiny-qwen2": {**_TINY_GROUPED_QUERY, "model_type": "qwen2", "seq_length": 2048, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # Qwen3's shape scaled down: q/k head norms, tied embeddings, rope_theta 1e6; the shipped SentencePiece
    # tokenizer, as tiny-qwen2.
    "tiny-qwen3": {**_TINY_DECOUPLED_HEADS, "model_type": "qwen3", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
    # ERNIE-4.5-0.3B's shape scaled down: tied embeddings, rope_theta 5e5, no biases (use_bias false, as released).
    "tiny-ernie4_5": {**_TINY_DECOUPLED_HEADS, "model_type": "ernie4_5", "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
    # Mistral-7B's shape scaled down: Llama with grouped-query attention (2 KV heads) and a sliding attention window
    # (here 1024 of 2048 positions: longer training sequences and requests are refused by name).
    "tiny-mistral": {**_TINY_GROUPED_QUERY, "model_type": "mistral", "sliding_window": 1024, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": False},
}


def preset(name: str) -> dict:
    """Return a copy of the named preset's config fields.

    Raises:
        KeyError: the name is not a preset.
    """
    return copy.deepcopy(PRESETS[name])
