"""``/tokenize`` and ``/detokenize`` (vLLM's shapes): ``protocol`` (request and response shapes) and ``router``."""
