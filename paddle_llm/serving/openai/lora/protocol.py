"""Loading and unloading LoRA adapters at run time, in vLLM's request shapes, answers and status codes.

``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` answers 200 with a line of text, 400 for a name already
loaded, a directory that is not an adapter of this base, or no free slot; ``POST /v1/unload_lora_adapter
{"lora_name"}`` answers 200, or 404 for a name not loaded. Both answer 403 unless ``serve`` was started with
``--enable_lora_runtime_updates`` (vLLM keeps them behind ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).
"""

from __future__ import annotations

from paddle_llm.serving.adapters import RUNTIME_UPDATES_FLAG
from paddle_llm.serving.openai.protocol import RequestError, check_fields

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
LOAD_FIELDS = {"lora_name": "the name requests pass as model", "lora_path": "a directory `finetune --lora` wrote"}
UNLOAD_FIELDS = {"lora_name": "the adapter to unload"}


def _text_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{name} must be a non-empty string", param=name)
    return value


def _runtime_adapters(served):
    """Raises: RequestError 403 when this server does not change its adapters at run time."""
    if served.adapters is None or not served.adapters.runtime_updates:
        raise RequestError(f"loading and unloading adapters at run time is off; serve a checkpoint with --engine "
                           f"dygraph and {RUNTIME_UPDATES_FLAG} to allow it", status=403, error_type="permission_error")
    return served.adapters


def load_adapter(served, body: dict) -> str:
    """Load the adapter a request names; returns the success line. Raises: RequestError (see the module)."""
    adapters = _runtime_adapters(served)
    check_fields(body, LOAD_FIELDS, LOAD_PATH)
    name, path = _text_field(body, "lora_name"), _text_field(body, "lora_path")
    if name == served.name:
        raise RequestError(f"{name!r} is the base model's name; give the adapter its own", param="lora_name")
    try:
        adapters.load(name, path, f"lora_path {path!r}")
    except (ValueError, FileNotFoundError) as err:  # not an adapter, another base's, or over --max_lora_rank
        raise RequestError(str(err), param="lora_path") from None
    return f"Success: LoRA adapter '{name}' added successfully."


def unload_adapter(served, body: dict) -> str:
    """Unload the adapter a request names; returns the success line. Its requests already submitted finish with it."""
    adapters = _runtime_adapters(served)
    check_fields(body, UNLOAD_FIELDS, UNLOAD_PATH)
    name = _text_field(body, "lora_name")
    adapters.unload(name)
    return f"Success: LoRA adapter '{name}' removed successfully."
