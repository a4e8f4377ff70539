"""The OpenAI-compatible API, one package per endpoint (the layout of vLLM's ``entrypoints/openai``).

``protocol`` holds what every endpoint shares (``RequestError``, limits, sampling fields, the response envelope);
``completions/``, ``chat/`` and ``models/`` each hold their endpoint's ``protocol`` (request and response shapes, no
web imports, so gRPC uses them too) and ``router`` (its FastAPI route); ``streaming`` answers both generate endpoints
as plain JSON or SSE.
"""
