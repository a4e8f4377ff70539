"""Serving: a continuous-batching engine (no web imports), OpenAI-compatible REST, gRPC, and a FastDeploy launcher.

Modules: ``sampling`` and ``text_stream`` (pure per-request logic), ``engine`` (batching loop), ``model`` (opening an
export or checkpoint), ``openai/`` (the OpenAI API: shared ``protocol``, then ``completions/``, ``chat/`` and
``models/``, each a ``protocol`` and a ``router``, and ``streaming``, how both generate endpoints answer),
``local_backend`` (those protocols over the local engine), ``rest`` (assembles the REST app; ``rest_common`` is what
its routers share, ``health`` its probes), ``grpc_server`` (+ ``generation.proto`` and its generated stubs),
``metrics``, ``fastdeploy``, ``command`` (``paddle-llm serve``).
"""
