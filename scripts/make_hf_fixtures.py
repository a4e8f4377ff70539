"""Write the tiny Hugging Face checkpoints in tests/assets/hf/ with transformers itself, and their reference data.

Pinned versions (the reference numbers below depend on them):
    torch==2.13.0  transformers==4.46.3  safetensors==0.8.0  tokenizers==0.20.3  sentencepiece==0.2.3

torch is never a dependency of paddle_llm, so this runs in its own venv outside the repository:

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 transformers==4.46.3 safetensors sentencepiece protobuf
    /work/torchvenv/bin/python scripts/make_hf_fixtures.py            # rewrites tests/assets/hf/ but qwen2-tf5
    /work/torchvenv/bin/python scripts/make_hf_fixtures.py mistral    # rewrites the named fixtures only

The transformers 5 fixture comes from a second venv (transformers 5 writes another config layout):

    python3 -m venv /work/torchvenv5
    /work/torchvenv5/bin/pip install torch==2.13.0 "transformers>=5" safetensors sentencepiece protobuf
    /work/torchvenv5/bin/python scripts/make_hf_fixtures.py           # rewrites the transformers 5 fixtures

Naming fixtures (``scripts/make_hf_fixtures.py qwen3 ernie4_5``) rewrites only those.

Each fixture directory is exactly what ``save_pretrained`` writes (config.json, weights, generation_config.json,
tokenizer files), plus two files the tests read: ``reference.json`` (the fixed inputs, the 3 AdamW steps' losses with
the optimizer settings that made them, and greedy ``generate`` outputs for 4 prompts) and ``reference_logits.npy``
(float32 logits of ``reference.json``'s ``logits_input_ids``). Fixtures with a chat template also store the ids
``apply_chat_template`` gives a 2-round conversation, whole and up to its last reply.

Fixtures:
    llama2          Llama-2 shape: multi-head attention, untied lm_head, SentencePiece tokenizer.model
    llama3          Llama-3.2 shape: grouped-query attention, rope_scaling of type llama3, tied embeddings,
                    byte-level BPE tokenizer.json and a Jinja chat_template in tokenizer_config.json
    llama3-sharded  llama3's weights in several model-0000N-of-0000M.safetensors files with an index
    llama3-bin      llama3's weights as pytorch_model.bin (torch's zip pickle)
    qwen2           Qwen2.5-0.5B shape: q/k/v biases, grouped-query attention, tied embeddings, byte-level BPE
                    tokenizer.json and Qwen's ChatML chat_template
    llama3-bf16, llama3-fp16, qwen2-bf16, qwen2-fp16
                    llama3 and qwen2 stored in bfloat16 / float16, as real Llama-3 and Qwen2 checkpoints are, with
                    random norm scales and biases (not transformers' ones and zeros) so a tensor loaded into the
                    wrong place shows; their references are computed in float32 from the stored (rounded) weights,
                    the precision paddle_llm loads them in on CPU
    qwen2-tf5       qwen2-bf16's shape written by transformers 5: rope_parameters (theta 1e6) instead of
                    rope_theta, dtype instead of torch_dtype
    llama-bias-headdim, qwen3, ernie4_5
                    written by transformers 5 in float32 with random norms and biases: a Llama with attention_bias,
                    mlp_bias and head_dim 24 at hidden 64 (4 heads); a Qwen3 (q/k RMSNorm per head, head_dim 32 at
                    hidden 64, tied embeddings); an ERNIE 4.5 dense model (interleaved
                    RoPE, use_bias, head_dim 32, tied embeddings, theta 5e5)
    mistral         Mistral-7B-v0.1 shape: grouped-query attention, sliding_window 32 of 128 positions, untied
                    lm_head, SentencePiece tokenizer.model with its tokenizer.json, Mistral-Instruct's [INST] chat template;
                    random norms
    llama3-yarn     llama3 with rope_scaling of type yarn (factor 4, beta_fast 32, beta_slow 1; transformers 4.46
                    computes the correction range from max_position_embeddings); random norms
    qwen2-yarn      qwen2 with YaRN written by transformers 5 (rope_parameters: factor 4, original_max_position_embeddings
                    64 of 256, beta_fast 16, attention_factor 1.2), random norms and biases
    mistral-headdim mistral with Mistral-Nemo's decoupled heads (head_dim 24 at hidden 64, 4 heads), sliding_window null
    qwen3-yarn, ernie4_5-yarn
                    qwen3 / ernie4_5 with YaRN in rope_parameters (factor 4, original_max_position_embeddings 64 of
                    256, beta_fast 16; qwen3's attention_factor 1.2), written by transformers 5
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaTokenizer,
    LlamaTokenizerFast,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2TokenizerFast,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "assets", "hf")
CORPUS = os.path.join(REPO, "paddle_llm", "assets", "demo_corpus.jsonl")
SENTENCEPIECE_MODEL = os.path.join(REPO, "paddle_llm", "assets", "tokenizer", "tokenizer.model")

# Llama-3's chat template, shortened only by dropping its tool-calling branches.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5's template without its tool-calling branches: a default system message, then ChatML turns.
QWEN2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ERNIE 4.5's template without its tool branches: BOS, then "User: " / "Assistant: " turns, each reply ending in EOS.
ERNIE4_5_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
ERNIE4_5_SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The optimizer the 3 reference steps use; the test repeats it with Paddle's AdamW. Parameters whose name holds
# "norm" or "bias" get no weight decay, as PaddleNLP's Trainer does.
OPTIMIZER = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0,
             "no_decay_name_parts": ["norm", "bias"]}
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Fang?"},
                {"role": "assistant", "content": "At the river."}, {"role": "user", "content": "And the horse?"},
                {"role": "assistant", "content": "Happy."}]
PROMPTS = ["In the evening, Fang went", "The sky was", "Chen asked,", "Together they counted 5 birds"]
MAX_NEW_TOKENS = 8
TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


def byte_level_bpe(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A tiny byte-level BPE like Llama-3's and Qwen2's, trained on the shipped demo corpus (no download)."""
    with open(CORPUS, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:500]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def llama2():
    tokenizer = LlamaTokenizer(vocab_file=SENTENCEPIECE_MODEL, legacy=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    return config, tokenizer


def llama3():
    fast = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(320, LLAMA3_SPECIALS), bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE)
    # Llama-3 prepends <|begin_of_text|> through its post-processor; the tokenizer.json carries it.
    bos = fast.bos_token_id
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True, initializer_range=0.1,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         bos_token_id=bos, eos_token_id=fast.eos_token_id, pad_token_id=None)
    return config, fast


def qwen2():
    # Qwen2's tokenizer adds no BOS; its EOS for chat is <|im_end|>, its padding <|endoftext|>. Its config names no
    # pad_token_id, as Qwen2.5's does not: with one, transformers' embedding never updates that row (padding_idx)
    # while PaddleNLP's does, and the training reference would measure that instead of the model.
    fast = Qwen2TokenizerFast(tokenizer_object=byte_level_bpe(320, QWEN2_SPECIALS), bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, chat_template=QWEN2_CHAT_TEMPLATE)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.1, use_sliding_window=False,
                         bos_token_id=None, eos_token_id=fast.eos_token_id, pad_token_id=None)
    return config, fast


def llama_bias_headdim():
    """A Llama-architecture checkpoint with biases on every projection and heads narrower than hidden/heads."""
    config, tokenizer = llama3()
    config = LlamaConfig(**{**config.to_dict(), "head_dim": 24, "attention_bias": True, "mlp_bias": True,
                            "tie_word_embeddings": False, "rope_scaling": None, "rope_parameters": None,
                            "rope_theta": 10000.0})
    return config, tokenizer


def qwen3():
    from transformers import Qwen3Config

    _, tokenizer = qwen2()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, initializer_range=0.1,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    return config, tokenizer


def ernie4_5():
    from transformers import Ernie4_5Config

    fast = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(320, ERNIE4_5_SPECIALS), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", chat_template=ERNIE4_5_CHAT_TEMPLATE)
    config = Ernie4_5Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, use_bias=True,
                            initializer_range=0.1, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                            pad_token_id=None)
    return config, fast


# Mistral-Instruct v0.1's template, with a system message folded into the first user turn.
MISTRAL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for message in turns %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def mistral():
    from transformers import MistralConfig

    # Mistral's repositories ship tokenizer.json beside tokenizer.model, as the fast tokenizer saves them.
    tokenizer = LlamaTokenizerFast(vocab_file=SENTENCEPIECE_MODEL, legacy=True, from_slow=True, chat_template=MISTRAL_CHAT_TEMPLATE)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=32,
                           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    return config, tokenizer


def llama3_yarn():
    config, tokenizer = llama3()
    config.rope_scaling = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0}
    return config, tokenizer


def mistral_headdim():
    """Mistral-Nemo's decoupled heads (128 wide at hidden 5120 / 32 heads) scaled down: 24 wide at 64 / 4, no window."""
    config, tokenizer = mistral()
    config.head_dim, config.sliding_window = 24, None
    return config, tokenizer


# transformers 5's rope_parameters for the YaRN fixtures: a correction range from 64 of 256 positions, beta_fast 16.
YARN_PARAMETERS = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 1.0, "original_max_position_embeddings": 64}


def with_yarn(config_and_tokenizer, theta: float, **parameters):
    """A transformers 5 fixture's config and tokenizer with YaRN (``YARN_PARAMETERS``, then ``parameters``)."""
    config, tokenizer = config_and_tokenizer
    config.rope_parameters = {**YARN_PARAMETERS, "rope_theta": theta, **parameters}
    return config, tokenizer


def randomize_norms_and_biases(model) -> None:
    """Random norm scales around 1 and biases around 0, where transformers initialises exact ones and zeros."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * noise)


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)


def reference(model, tokenizer, vocab_size: int) -> tuple[dict, np.ndarray]:
    generator = np.random.default_rng(0)
    logits_ids = generator.integers(0, vocab_size, size=(2, 8)).tolist()
    batch = torch.tensor(generator.integers(0, vocab_size, size=(2, 9)))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(logits_ids)).logits.float().numpy()

    # Generation before training, so it uses the saved weights.
    generations = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        generations.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "new_ids": new,
                            "text": tokenizer.decode(new, skip_special_tokens=True)})

    # 3 AdamW steps on one fixed batch: inputs are batch[:, :-1], labels batch[:, 1:] (the shift done by the data
    # pipeline on our side), loss the mean token cross entropy.
    model.train()
    decay = [p for n, p in model.named_parameters() if not any(s in n for s in OPTIMIZER["no_decay_name_parts"])]
    no_decay = [p for n, p in model.named_parameters() if any(s in n for s in OPTIMIZER["no_decay_name_parts"])]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIMIZER["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=OPTIMIZER["lr"], betas=tuple(OPTIMIZER["betas"]), eps=OPTIMIZER["eps"])
    losses = []
    for _ in range(3):
        logits_train = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits_train.reshape(-1, logits_train.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["max_grad_norm"])
        optimizer.step()
        losses.append(float(loss))
    chat = None
    if tokenizer.chat_template:
        # What fine-tuning must feed (the whole conversation) and serving must ask with (up to the last reply).
        chat = {"messages": CONVERSATION,
                "conversation_ids": chat_ids(tokenizer, CONVERSATION),
                "prompt_ids": chat_ids(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)}
    data = {
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "logits_input_ids": logits_ids,
        "train": {"input_ids": batch[:, :-1].tolist(), "labels": batch[:, 1:].tolist(), "losses": losses,
                  "optimizer": OPTIMIZER},
        "generate": {"max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": tokenizer.eos_token_id, "prompts": generations},
        "chat": chat,
    }
    return data, logits


def write(name: str, config, tokenizer, dtype: torch.dtype | None = None, randomize: bool = False, **save_kwargs) -> None:
    """Save a fixture; with ``dtype``, its norms and biases randomised and its weights stored in ``dtype``, and the
    reference computed in float32 from those stored weights; with ``randomize``, random norms and biases in float32."""
    directory = os.path.join(OUT, name)
    shutil.rmtree(directory, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.do_sample = False
    if dtype is not None or randomize:
        randomize_norms_and_biases(model)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **save_kwargs)
    tokenizer.save_pretrained(directory)
    if dtype is not None:
        # Reloaded rather than cast back: a cast would keep the RoPE frequencies the half-precision cast rounded.
        model = AutoModelForCausalLM.from_pretrained(directory, **{"dtype" if TRANSFORMERS_5 else "torch_dtype": torch.float32})
        model.generation_config.do_sample = False
    data, logits = reference(model, tokenizer, config.vocab_size)
    with open(os.path.join(directory, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    np.save(os.path.join(directory, "reference_logits.npy"), logits)
    print(f"{name}: {sorted(os.listdir(directory))} losses={data['train']['losses']}", file=sys.stderr)


# Each fixture's writer, by the transformers major version that writes it.
FIXTURES_4 = {
    "llama2": lambda: write("llama2", *llama2()),
    "llama3": lambda: write("llama3", *llama3()),
    "llama3-sharded": lambda: write("llama3-sharded", *llama3(), max_shard_size="40KB"),
    "llama3-bin": lambda: write("llama3-bin", *llama3(), safe_serialization=False),
    "llama3-bf16": lambda: write("llama3-bf16", *llama3(), dtype=torch.bfloat16),
    "llama3-fp16": lambda: write("llama3-fp16", *llama3(), dtype=torch.float16),
    "qwen2": lambda: write("qwen2", *qwen2()),
    "qwen2-bf16": lambda: write("qwen2-bf16", *qwen2(), dtype=torch.bfloat16),
    "qwen2-fp16": lambda: write("qwen2-fp16", *qwen2(), dtype=torch.float16),
    "mistral": lambda: write("mistral", *mistral(), randomize=True),
    "llama3-yarn": lambda: write("llama3-yarn", *llama3_yarn(), randomize=True),
    "mistral-headdim": lambda: write("mistral-headdim", *mistral_headdim(), randomize=True),
}
FIXTURES_5 = {
    "qwen2-tf5": lambda: write("qwen2-tf5", *qwen2(), dtype=torch.bfloat16),
    "qwen2-yarn": lambda: write("qwen2-yarn", *with_yarn(qwen2(), 1000000.0, attention_factor=1.2), randomize=True),
    "llama-bias-headdim": lambda: write("llama-bias-headdim", *llama_bias_headdim(), randomize=True),
    "qwen3": lambda: write("qwen3", *qwen3(), randomize=True),
    "ernie4_5": lambda: write("ernie4_5", *ernie4_5(), randomize=True),
    "qwen3-yarn": lambda: write("qwen3-yarn", *with_yarn(qwen3(), 1000000.0, attention_factor=1.2), randomize=True),
    "ernie4_5-yarn": lambda: write("ernie4_5-yarn", *with_yarn(ernie4_5(), 500000.0), randomize=True),
}


def main(names: list[str]) -> None:
    """Write the named fixtures of this transformers version, or all of them."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    writers = FIXTURES_5 if TRANSFORMERS_5 else FIXTURES_4
    unknown = [name for name in names if name not in writers]
    if unknown:
        sys.exit(f"make_hf_fixtures.py: error: transformers {__import__('transformers').__version__} writes "
                 f"{', '.join(writers)}; not {', '.join(unknown)}")
    for name in names or writers:
        writers[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
