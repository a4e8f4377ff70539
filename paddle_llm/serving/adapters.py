"""The LoRA adapters a server holds on its base model: names, slots, loading and unloading at run time.

``serve --lora_modules name=path`` loads adapters at startup; ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (with ``--enable_lora_runtime_updates``) change them while serving. A request picks one by
passing its name as ``model``. Each adapter lives in one of the ``LoRABank``'s ``--max_loras`` preallocated slots, so
memory never grows: a load past the last free slot is refused (400) rather than evicting an adapter a client may be
about to use. Unloading removes the name at once (new requests get a 404) and keeps the slot until the requests
already submitted with it have finished, so they finish with the adapter they started with.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from paddle_llm.serving.openai.protocol import RequestError

RUNTIME_UPDATES_FLAG = "--enable_lora_runtime_updates"


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    path: str
    slot: int


class ServedAdapters:
    """Adapter name -> slot in a ``LoRABank``, for one engine."""

    def __init__(self, bank, engine, base_path: str, runtime_updates: bool):
        """
        Args:
            bank: the decoder's ``peft.multi_lora.LoRABank``.
            engine: the ``Engine`` decoding with it (which slots its requests still use).
            base_path: the base model directory, named when an adapter does not fit it.
            runtime_updates: whether the load/unload endpoints may change the adapters.
        """
        self.bank = bank
        self.engine = engine
        self.base_path = base_path
        self.runtime_updates = runtime_updates
        self._adapters: dict[str, ServedAdapter] = {}
        self._lock = threading.Lock()

    def listed(self) -> list[ServedAdapter]:
        with self._lock:
            return list(self._adapters.values())

    def load(self, name: str, path: str, flag: str) -> ServedAdapter:
        """Read the adapter at ``path``, check it against the base and put it in a free slot.

        Args:
            flag: how it was named, for messages (``--lora_modules NAME`` or the endpoint's ``lora_path``).

        Raises:
            FileNotFoundError, ArgumentError: not an adapter, or one that does not fit this base or --max_lora_rank.
            RequestError: the name is taken, or every slot is held.
        """
        from paddle_llm.peft.multi_lora import read_adapter

        weights = read_adapter(path, self.bank.linear_shapes(), flag, self.base_path, self.bank.max_rank)
        with self._lock:
            if name in self._adapters:
                raise RequestError(f"the lora adapter {name!r} has already been loaded", param="lora_name")
            held = {adapter.slot for adapter in self._adapters.values()}
            finishing = self.engine.adapters_in_use() - held
            free = [slot for slot in range(1, self.bank.max_loras + 1) if slot not in held | finishing]
            if not free:
                still = f" ({len(finishing)} of them held by requests of unloaded adapters until they finish)" if finishing else ""
                raise RequestError(f"all {self.bank.max_loras} adapter slots are in use{still}; unload an adapter "
                                   "first, or restart serve with a larger --max_loras", param="lora_name",
                                   code="adapter_limit_reached")
            self.bank.write(free[0], weights)
            adapter = ServedAdapter(name, os.path.abspath(path), free[0])
            self._adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        """Raises: RequestError 404 when no adapter has that name."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise RequestError(f"the lora adapter {name!r} cannot be found", param="lora_name", status=404,
                                   code="model_not_found")

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def require_runtime_updates(self) -> None:
        """Raises: RequestError 403 unless serve was started with ``--enable_lora_runtime_updates``."""
        if not self.runtime_updates:
            raise RequestError(f"loading and unloading adapters at run time is off; start serve with "
                               f"{RUNTIME_UPDATES_FLAG} to allow it", status=403, error_type="permission_error")

    @contextmanager
    def slot_for(self, name: str):
        """The slot of adapter ``name``, held (no load can take it) while the request is submitted in this context.

        Raises:
            RequestError 404: no adapter has that name (unloaded meanwhile).
        """
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise RequestError(f"the lora adapter {name!r} cannot be found", param="model", status=404,
                                   code="model_not_found")
            yield adapter.slot
