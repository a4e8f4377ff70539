"""Serving: a continuous-batching engine (no web imports), OpenAI-compatible REST, gRPC, and a FastDeploy launcher.

Modules: ``sampling`` and ``text_stream`` (pure per-request logic), ``engine`` (batching loop), ``model`` (opening an
export or checkpoint), ``openai_api`` (request validation and response shapes), ``rest``, ``grpc_server`` (+
``generation.proto`` and its generated stubs), ``metrics``, ``fastdeploy``, ``command`` (``paddle-llm serve``).
"""
