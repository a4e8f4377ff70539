"""LoRA through PaddleNLP's ``LoRAModel``, with each family's default target layers and a merge back into a plain model."""

from __future__ import annotations

import json
import os
import re

from safetensors import safe_open

from paddle_llm.config.parser import ArgumentError
from paddle_llm.config.validation import RSLORA_PLUS
from paddle_llm.models.registry import ModelFamily
from paddle_llm.peft.adapter_match import require_matching, tensor_shapes
from paddle_llm.peft.quantize import recorded_quantization

_REGEX_CHARACTERS = set(".*+?[](){}|^$\\")


def target_patterns(names: list[str] | tuple[str, ...]) -> list[str]:
    """Turn layer names into the full-match regular expressions ``LoRAConfig.target_modules`` takes.

    A plain name (``q_proj``) matches that layer in every block and nothing else (``dense`` does not also match
    ``dense_h_to_4h``); anything with regex characters is used as written.
    """
    return [name if set(name) & _REGEX_CHARACTERS else rf".*\.{re.escape(name)}" for name in names]


def default_lora_alpha(rank: int) -> int:
    """PaddleNLP's fine-tuning script fixed ``lora_alpha`` at twice the rank (scaling 2.0); ours is the default."""
    return 2 * rank


def _linear_layer_names(model) -> list[str]:
    import paddle

    return [name for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)]


LORA_WEIGHTS = "lora_model_state.pdparams"  # PaddleNLP's LORA_WEIGHTS_NAME
LORA_SAFETENSORS_INDEX = "peft_model.safetensors.index.json"  # PaddleNLP's SAFE_PEFT_WEIGHTS_INDEX_NAME (unified checkpoint)


def read_lora_tensors(lora_path: str) -> dict | None:
    """Name -> numpy array of the adapter tensors ``lora_path`` holds, in either format a LoRA run saves
    (``--unified_checkpoint`` writes safetensors shards and their index); None when it holds neither."""
    import paddle

    index = os.path.join(lora_path, LORA_SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            with safe_open(os.path.join(lora_path, shard), framework="np") as opened:
                tensors.update({name: opened.get_tensor(name) for name in opened.keys()})
        return tensors
    weights = os.path.join(lora_path, LORA_WEIGHTS)
    return paddle.load(weights, return_numpy=True) if os.path.isfile(weights) else None


def saved_lora_shapes(lora_path: str) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the adapter tensors ``lora_path`` holds (``read_lora_tensors``); None when it holds none."""
    tensors = read_lora_tensors(lora_path)
    return None if tensors is None else tensor_shapes(tensors)


def load_lora(model, lora_path: str, base_path: str):
    """Wrap ``model`` with the LoRA adapter saved in ``lora_path`` (its own rank, alpha and targets); only it trains.

    A QLoRA adapter records the quantization of the base it was trained on; the base is quantized the same way here,
    so the model computes what training saw.

    Args:
        base_path: where ``model`` came from (``--model_name_or_path``), named when the adapter does not fit it.

    Raises:
        FileNotFoundError: ``lora_path`` is not a saved adapter, or has no weights.
        AdapterMismatchError: the adapter's tensors are not the ones this base needs (another shape, other targets).
    """
    import paddle
    from paddlenlp.peft import LoRAModel

    from paddle_llm.peft.qlora import quantize_lora_base

    if not os.path.isfile(os.path.join(lora_path, "lora_config.json")):
        raise FileNotFoundError(f"--lora_path {lora_path!r} has no lora_config.json; pass the directory a LoRA run saved")
    saved = saved_lora_shapes(lora_path)
    if saved is None:
        # PaddleNLP would log an error and train a fresh adapter instead of the one asked for
        raise FileNotFoundError(f"--lora_path {lora_path!r} has no {LORA_WEIGHTS} (nor {LORA_SAFETENSORS_INDEX}); "
                                "pass the directory a LoRA run saved")
    lora_model = LoRAModel.from_pretrained(model, lora_path)
    if getattr(model.config, "tensor_parallel_degree", 1) <= 1:  # under tensor parallelism each rank holds a slice
        require_matching("--lora_path", lora_path, base_path, saved, tensor_shapes(lora_model.get_trainable_state_dict()))
    lora_model.mark_only_lora_as_trainable()
    spec = recorded_quantization(lora_path)
    if spec is not None:
        quantize_lora_base(lora_model, spec)
    return lora_model


def lora_variant(peft_args) -> dict:
    """The LoRA variant flags as ``apply_lora`` takes them, with PaddleNLP's ``--rslora_plus`` shorthand expanded
    (``RSLORA_PLUS``: rsLoRA, LoRA+ scale 4, alpha 4, as its run_finetune.py and run_dpo.py do)."""
    variant = {"alpha": peft_args.lora_alpha, "rslora": peft_args.rslora, "lora_plus_scale": peft_args.lora_plus_scale, "pissa": peft_args.pissa}
    if peft_args.rslora_plus:
        variant.update(rslora=RSLORA_PLUS["rslora"], lora_plus_scale=RSLORA_PLUS["lora_plus_scale"], alpha=RSLORA_PLUS["lora_alpha"])
    return variant


def apply_lora(model, family: ModelFamily, rank: int, alpha: int | None = None, target_modules=None, rslora: bool = False,
               lora_plus_scale: float = 1.0, pissa: bool = False):
    """Wrap ``model`` with new LoRA adapters; only the adapters train.

    The variants are PaddleNLP's own (``paddlenlp.peft.lora.LoRALinear``): rsLoRA scales by ``alpha / sqrt(r)``,
    LoRA+ gives the B matrices ``lora_plus_scale`` times the learning rate (their ``ParamAttr``), PiSSA starts A and
    B from the top-r singular vectors of each weight (scaling 1) and leaves the residual in the base.

    Args:
        model: a PaddleNLP causal LM.
        family: picks the default targets (the family's ``lora_target_modules``).
        rank: LoRA rank r.
        alpha: scaling numerator; None means ``default_lora_alpha(rank)``.
        target_modules: layer names or regexes overriding the family default.
        rslora, lora_plus_scale, pissa: the variants (``lora_variant`` reads them from the flags).

    Returns:
        A ``paddlenlp.peft.LoRAModel``.

    Raises:
        ArgumentError: the targets match no linear layer (the message lists the layers there are).
    """
    from paddlenlp.peft import LoRAConfig, LoRAModel

    names = list(target_modules or family.lora_target_modules)
    patterns = target_patterns(names)
    linear = _linear_layer_names(model)
    if not any(re.fullmatch(p, name) for p in patterns for name in linear):
        short = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ArgumentError(f"--lora_target_modules {' '.join(names)} matches no linear layer of this {family.name} model; its layers are: {', '.join(short)}")
    config = LoRAConfig(
        target_modules=patterns,
        r=rank,
        lora_alpha=alpha if alpha is not None else default_lora_alpha(rank),
        merge_weights=False,
        tensor_parallel_degree=getattr(model.config, "tensor_parallel_degree", 1),
        dtype=getattr(model.config, "dtype", None) or "float32",
        base_model_name_or_path=getattr(model.config, "_name_or_path", None),
        rslora=rslora,
        lora_plus_scale=lora_plus_scale,
        pissa=pissa,
    )
    lora_model = LoRAModel(model, config)
    lora_model.mark_only_lora_as_trainable()
    if pissa:
        _initialise_pissa(lora_model)
    return lora_model


def _adapted_layers(lora_model):
    return [(name, layer) for name, layer in lora_model.model.named_sublayers() if hasattr(layer, "lora_A")]


def _initialise_pissa(lora_model) -> None:
    """Run PaddleNLP's PiSSA initialisation now rather than at the first forward pass (``LoRALinear.forward``
    does it then), and keep the initial A and B: the saved adapter is expressed against the original weights
    (``pissa_as_plain_lora``). A resumed run repeats the same SVD of the same weights, then loads its checkpoint."""
    initial = {}
    for name, layer in _adapted_layers(lora_model):
        layer.pissa_init(layer.r)
        layer.apply_pissa = True
        initial[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    lora_model.pissa_initial_adapters = initial


def pissa_as_plain_lora(lora_model) -> bool:
    """Rewrite a trained PiSSA adapter as an ordinary LoRA adapter on the original weights, in place; False when
    ``lora_model`` is not PiSSA.

    PiSSA trains ``W_res + A B`` with ``W_res = W - A0 B0``. ``W + [A A0] [B; -B0]`` is the same function on the
    original ``W``, so the saved adapter (rank 2r, scaling 1) loads, merges and exports like any LoRA adapter, on the
    base model the user has. PaddleNLP 3.0.0b4 saves ``A`` and ``B`` alone with ``pissa: true``, which no base the
    user has can reproduce.
    """
    import paddle

    initial = getattr(lora_model, "pissa_initial_adapters", None)
    if not initial:
        return False
    for name, (initial_a, initial_b) in initial.items():
        layer = lora_model.model.get_sublayer(name)
        with paddle.no_grad():
            layer.weight.set_value(layer.weight + initial_a @ initial_b)
            stacked = {"lora_A": paddle.concat([layer.lora_A, initial_a], axis=1), "lora_B": paddle.concat([layer.lora_B, -initial_b], axis=0)}
        for attribute, value in stacked.items():
            parameter = layer.create_parameter(shape=value.shape, dtype=value.dtype, default_initializer=paddle.nn.initializer.Assign(value))
            parameter.stop_gradient = False
            setattr(layer, attribute, parameter)
        layer.r, layer.pissa = 2 * layer.r, False
    config = lora_model.lora_config
    config.r, config.lora_alpha, config.pissa = 2 * config.r, 2 * config.r, False  # alpha / r = 1, PiSSA's scaling
    del lora_model.pissa_initial_adapters
    return True


def merge_lora(lora_model):
    """Fold the adapters into the base weights (``W + A @ B * scaling``) and return the plain model.

    The ``LoRAModel`` is consumed: its layers are swapped back for ``nn.Linear`` holding the merged weights. A
    quantized (QLoRA) base is dequantized first, so ``W`` is the weight training saw.
    """
    from paddle_llm.peft.qlora import dequantize_lora_base

    dequantize_lora_base(lora_model)

    # PaddleNLP 3.0.0b4's restore builds each nn.Linear with a fresh zero bias even where the base layer had none
    # (Llama's projections), so a merged model would save extra ``*.bias`` tensors and lose the bias-free export
    # step. Remember which adapted layers had no bias, and take the made-up ones away again.
    bias_free = [name for name, layer in lora_model.model.named_sublayers() if hasattr(layer, "lora_A") and layer.bias is None]
    lora_model.merge()
    model = lora_model.restore_original_model()
    for name in bias_free:
        model.get_sublayer(name).bias = None
    for parameter in model.parameters():
        parameter.stop_gradient = False
    return model
