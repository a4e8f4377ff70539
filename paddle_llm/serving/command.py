"""``paddle-llm serve``: an OpenAI-compatible REST server (and optionally gRPC) over an exported model.

Examples::

    paddle-llm serve --model out/export --port 8000                         # Paddle Inference on the export
    paddle-llm serve --model out/export --port 8000 --grpc_port 50051 --api_key secret
    paddle-llm serve --model out/ckpt --engine dygraph --port 8000          # a checkpoint, no export
    paddle-llm serve --model out/fd --engine fastdeploy --port 8000         # GPU: FastDeploy 2.x behind our front end
    paddle-llm serve --model out/ckpt --engine dygraph --lora_modules sql=out/lora_sql chat=out/lora_chat
                                                                            # one base, a LoRA adapter per request's model

SIGTERM or Ctrl-C shuts down gracefully: no new connections, in-flight requests finish (up to
``--graceful_shutdown_seconds``; those still running then get an error answer), then the engine stops. Exit codes:
0 after a clean shutdown, 2 bad flags or model, 3 the drain period ended with requests unfinished.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

import uvicorn

from paddle_llm.cpu.threads import configure_cpu_runtime
from paddle_llm.inference.manifest import FORMAT_FASTDEPLOY, load_manifest
from paddle_llm.serving.adapters import RUNTIME_UPDATES_FLAG
from paddle_llm.serving.fastdeploy import FastDeployBackend, FastDeployServer, find_fastdeploy
from paddle_llm.serving.grpc_server import start_grpc_server, stop_grpc_server
from paddle_llm.serving.http_limits import header_timeout_protocol
from paddle_llm.serving.local_backend import LocalBackend
from paddle_llm.serving.metrics import ServingMetrics
from paddle_llm.inference.sizing import MEMORY_SHARE, ROWS_PER_CORE
from paddle_llm.serving.engine import DEFAULT_PREFILL_CHUNK_TOKENS, DEFAULT_PREFIX_CACHE_TOKENS
from paddle_llm.serving.model import (
    ENGINE_DYGRAPH,
    ENGINE_FASTDEPLOY,
    ENGINE_PADDLE,
    ENGINES,
    AdapterSlots,
    open_checkpoint,
    open_export,
)
from paddle_llm.serving.openai.protocol import ServingLimits
from paddle_llm.serving.process import free_port, require_port_free
from paddle_llm.serving.rest import create_app, create_proxy_app
from paddle_llm.serving.rest_common import DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_REQUEST_BYTES
from paddle_llm.serving.shutdown import EXIT_DRAIN_CUT_SHORT, DrainingServer, drain_config_seconds

API_KEY_ENV = "PADDLE_LLM_API_KEY"
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddle-llm serve", description="Serve a model over OpenAI-compatible REST and gRPC.")
    parser.add_argument("--model", required=True,
                        help="export directory (--engine paddle/fastdeploy) or checkpoint directory (--engine dygraph)")
    parser.add_argument("--engine", default=ENGINE_PADDLE, choices=ENGINES,
                        help="paddle: Paddle Inference on an export; dygraph: a checkpoint as is; fastdeploy: FastDeploy 2.x (GPU)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="REST port")
    parser.add_argument("--grpc_port", type=int, help="also serve gRPC on this port")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1/* and gRPC (default: ${API_KEY_ENV})")
    parser.add_argument("--served_model_name", help="model id clients pass (default: the directory name)")
    parser.add_argument("--max_tokens_limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    parser.add_argument("--max_prompt_tokens", type=int, help="longest prompt accepted (default: the context length)")
    parser.add_argument("--max_batch_size", type=int,
                        help="requests holding a KV cache slot at once (prefilling or decoding); more wait. Default: "
                             f"sized from this machine and the model, the smaller of {ROWS_PER_CORE} per CPU core and "
                             f"{MEMORY_SHARE * 100:.0f}%% of the available memory over one full-context request's KV cache "
                             "(printed at startup)")
    parser.add_argument("--prefill_chunk_tokens", type=int,
                        help="most prompt tokens prefilled between two decoding steps: a long prompt is prefilled in "
                             f"chunks, so running streams keep producing tokens (default: {DEFAULT_PREFILL_CHUNK_TOKENS})")
    parser.add_argument("--prefix_cache_tokens", type=int,
                        help="prompt positions whose KV cache is kept for later prompts that start alike (a shared "
                             "system prompt is prefilled once); 0 turns it off; the hit rate is in /metrics "
                             f"(default: {DEFAULT_PREFIX_CACHE_TOKENS})")
    parser.add_argument("--num_threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU math threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                        help="where --engine paddle/dygraph runs (gpu needs a CUDA build of Paddle)")
    parser.add_argument("--mkldnn", action="store_true",
                        help="use oneDNN kernels in Paddle Inference (measured slower here: decode shapes change every step)")
    parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get a 413 before they are read in full (default: %(default)s)")
    parser.add_argument("--body_timeout_seconds", type=float, default=DEFAULT_BODY_TIMEOUT_SECONDS,
                        help="a request body not received within this many seconds gets a 408 (default: %(default)s)")
    parser.add_argument("--header_timeout_seconds", type=float, default=10.0,
                        help="a new connection whose request headers take longer (seconds) is closed (default: %(default)s)")
    parser.add_argument("--timeout_keep_alive", type=int, default=5,
                        help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    parser.add_argument("--limit_concurrency", type=int, default=256,
                        help="open connections at most; more get a 503 at once instead of a slot (default: %(default)s)")
    parser.add_argument("--max_header_bytes", type=int, default=64 * 1024,
                        help="largest request line plus headers in bytes; more closes the connection (default: %(default)s)")
    parser.add_argument("--graceful_shutdown_seconds", type=float, default=30.0,
                        help="how long in-flight requests may run after SIGTERM; those still running then get an "
                             "error answer and serve exits 3")
    parser.add_argument("--lora_modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters (directories `finetune --lora` wrote) served on the base; a request picks "
                             "one by passing NAME as model, and requests for different adapters decode in one batch "
                             "(--engine dygraph only)")
    parser.add_argument("--max_loras", type=int,
                        help=f"adapter slots preallocated (default {DEFAULT_MAX_LORAS}, or as many as --lora_modules "
                             "names); a load past them gets a 400")
    parser.add_argument("--max_lora_rank", type=int,
                        help=f"largest adapter rank a slot holds (default {DEFAULT_MAX_LORA_RANK}); each slot's memory "
                             "grows with it")
    parser.add_argument(RUNTIME_UPDATES_FLAG, action="store_true",
                        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off: they answer 403)")
    parser.add_argument("--fastdeploy_port", type=int, help="port for the FastDeploy subprocess (default: a free one)")
    parser.add_argument("--fastdeploy_args", default="", help="extra FastDeploy server flags, as one string")
    return parser


def validate_args(args) -> None:
    """Raises: ValueError naming the flag."""
    for flag in ("port", "grpc_port", "fastdeploy_port"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 65536:
            raise ValueError(f"--{flag} must be in 1..65535, got {value}")
    if args.grpc_port is not None and args.grpc_port == args.port:
        raise ValueError("--grpc_port must differ from --port")
    for flag in ("max_tokens_limit", "max_batch_size", "prefill_chunk_tokens", "num_threads", "max_request_bytes",
                 "timeout_keep_alive", "limit_concurrency", "max_header_bytes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("body_timeout_seconds", "header_timeout_seconds"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    ours = ("max_batch_size", "prefill_chunk_tokens", "prefix_cache_tokens")
    given = [f"--{flag}" for flag in ours if getattr(args, flag) is not None]
    if args.engine == ENGINE_FASTDEPLOY and given:
        raise ValueError(f"{', '.join(given)}: these size our engine; FastDeploy batches and caches on its own "
                         "(pass its flags in --fastdeploy_args)")
    if args.prefix_cache_tokens is not None and args.prefix_cache_tokens < 0:
        raise ValueError(f"--prefix_cache_tokens must be at least 0, got {args.prefix_cache_tokens}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError(f"--max_prompt_tokens must be at least 1, got {args.max_prompt_tokens}")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a directory")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api_key is empty")
    adapter_paths(args)
    adapter_slots(args)


def adapter_paths(args) -> dict[str, str]:
    """``--lora_modules`` as name -> path. Raises: ValueError naming the entry."""
    paths, base_name = {}, args.served_model_name or os.path.basename(os.path.normpath(args.model))
    for entry in args.lora_modules:
        name, _, path = entry.partition("=")
        if not name or not path:
            raise ValueError(f"--lora_modules {entry!r}: write each adapter as NAME=PATH")
        if name in paths or name == base_name:
            raise ValueError(f"--lora_modules: the name {name!r} is taken (by another adapter or the base model); "
                             "give each adapter its own name")
        if not os.path.isdir(path):
            raise ValueError(f"--lora_modules {name}={path}: not a directory")
        paths[name] = path
    return paths


def adapter_slots(args) -> AdapterSlots | None:
    """The adapter slots to preallocate, None when the server takes no adapters.

    Raises:
        ValueError: adapter flags with an export (whose graph cannot take them), or slots that cannot hold them.
    """
    wanted = args.lora_modules or args.enable_lora_runtime_updates
    if not wanted:
        for flag in ("max_loras", "max_lora_rank"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} sizes the slots of LoRA adapters; pass --lora_modules or "
                                 f"{RUNTIME_UPDATES_FLAG} too, or leave it out")
        return None
    if args.engine != ENGINE_DYGRAPH:
        given = "--lora_modules" if args.lora_modules else RUNTIME_UPDATES_FLAG
        raise ValueError(f"{given} needs --engine dygraph: an export's step graph has the base weights (any "
                         f"adapter merged) and no adapter inputs, so it cannot pick an adapter per request; serve the "
                         f"checkpoint with --engine dygraph, or export one merged model per adapter "
                         f"(`paddle-llm export --lora_path`)")
    max_loras = args.max_loras if args.max_loras is not None else max(DEFAULT_MAX_LORAS, len(args.lora_modules))
    max_rank = args.max_lora_rank if args.max_lora_rank is not None else DEFAULT_MAX_LORA_RANK
    if max_loras < 1 or max_rank < 1:
        raise ValueError(f"--max_loras and --max_lora_rank must be at least 1, got {max_loras} and {max_rank}")
    if len(args.lora_modules) > max_loras:
        raise ValueError(f"--lora_modules names {len(args.lora_modules)} adapters but --max_loras is {max_loras}; "
                         "raise --max_loras")
    return AdapterSlots(max_loras, max_rank, args.enable_lora_runtime_updates)


def _local_backend(args):
    # Before the first matrix multiply: MKL's thread count and (on non-Intel CPUs) its AVX2 kernels are fixed then.
    configure_cpu_runtime(requested_threads=args.num_threads, device=args.device)

    if args.engine == ENGINE_DYGRAPH:
        slots = adapter_slots(args)
        served = open_checkpoint(args.model, args.max_batch_size, device=args.device,
                                 prefill_chunk_tokens=args.prefill_chunk_tokens,
                                 prefix_cache_tokens=args.prefix_cache_tokens, adapter_slots=slots)
        if slots is not None:
            try:
                _load_startup_adapters(served, adapter_paths(args))
            except Exception:
                served.engine.shutdown()
                raise
    else:
        served = open_export(args.model, args.num_threads, args.max_batch_size, enable_mkldnn=args.mkldnn,
                             prefill_chunk_tokens=args.prefill_chunk_tokens, prefix_cache_tokens=args.prefix_cache_tokens,
                             use_gpu=args.device == "gpu")
    if args.served_model_name:
        served.name = args.served_model_name
    max_prompt = min(args.max_prompt_tokens or served.max_context_length, served.max_context_length)
    default_max_tokens = int(served.generation_defaults.get("max_new_tokens") or 256)
    limits = ServingLimits(args.max_tokens_limit, max_prompt, default_max_tokens)
    return served, LocalBackend(served, limits)


def _load_startup_adapters(served, paths: dict[str, str]) -> None:
    """Load ``--lora_modules`` into their slots and say what the slots cost.

    Raises:
        ValueError, FileNotFoundError: the first adapter that does not load (naming it, and the tensor that does not
            fit when it was saved for another base).
    """
    adapters = served.adapters
    for name, path in paths.items():  # adapter_paths and adapter_slots checked the names are free and fit the slots
        adapters.load(name, path, f"--lora_modules {name}")
    bank = adapters.bank
    print(f"LoRA adapters: {len(paths)} loaded ({', '.join(paths) or 'none'}) in {bank.max_loras} slots of rank <= "
          f"{bank.max_rank}, {bank.bytes_per_adapter() / 2**20:.2f} MiB each", flush=True)


def _fastdeploy(args):
    manifest = load_manifest(args.model)
    if manifest.format != FORMAT_FASTDEPLOY:
        raise ValueError(f"{args.model} is a {manifest.format!r} export; --engine fastdeploy needs "
                         "`paddle-llm export --format fastdeploy`")
    find_fastdeploy()
    server = FastDeployServer(args.model, args.fastdeploy_port or free_port(), shlex.split(args.fastdeploy_args))
    print(f"starting FastDeploy: {' '.join(server.command)} (log: {server.log_path})", flush=True)
    server.start()
    return server, FastDeployBackend(server.url)


def _keep_process_alive_after_uvicorn() -> None:
    """Make SIGTERM/SIGINT harmless outside uvicorn's own handling.

    uvicorn drains HTTP requests on the first signal, then re-raises that signal into the handler that was installed
    before it started. With the default handlers that kills the process (SIGTERM) or raises KeyboardInterrupt
    (SIGINT) before gRPC calls and the engine are drained; a no-op handler lets ``serve`` finish its shutdown.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)


def serve(args) -> int:
    """Start everything, block until SIGTERM/SIGINT, then shut down in order (front ends first, engine last)."""
    metrics = ServingMetrics()
    served = fastdeploy_server = grpc_server = None
    require_port_free(args.host, args.port, "--port")
    if args.grpc_port is not None:
        require_port_free(args.host, args.grpc_port, "--grpc_port")
    try:
        if args.engine == ENGINE_FASTDEPLOY:
            fastdeploy_server, backend = _fastdeploy(args)
            app = create_proxy_app(fastdeploy_server.url, metrics, args.api_key)
            name = backend.model_name
        else:
            served, backend = _local_backend(args)
            app = create_app(backend, metrics, args.api_key, args.max_request_bytes, args.body_timeout_seconds)
            engine = served.engine
            metrics.add_gauge("running_requests", "Requests decoding now.", lambda: engine.stats().running)
            metrics.add_gauge("waiting_requests", "Requests waiting for a batch slot.", lambda: engine.stats().waiting)
            metrics.add_gauge("prefix_cache_hit_rate", "Prompt tokens whose KV cache was reused from an earlier "
                              "prompt's prefix, over all prompt tokens.", lambda: engine.stats().prefix_cache_hit_rate)
            name = served.name
        if args.grpc_port is not None:
            grpc_server = start_grpc_server(backend, metrics, args.host, args.grpc_port, args.api_key)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=drain_config_seconds(args.graceful_shutdown_seconds),
                                http=header_timeout_protocol(args.header_timeout_seconds),
                                timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.limit_concurrency,
                                h11_max_incomplete_event_size=args.max_header_bytes)
        grpc_note = f", gRPC on {args.host}:{args.grpc_port}" if grpc_server else ""
        print(f"serving {name!r} ({args.engine}) on http://{args.host}:{args.port}{grpc_note}", flush=True)
        if served is not None:
            print(f"batch: {served.batch_sizing}", flush=True)
        _keep_process_alive_after_uvicorn()
        server = DrainingServer(config, args.graceful_shutdown_seconds, None if served is None else served.engine)
        server.run()
        return EXIT_DRAIN_CUT_SHORT if server.drain_cut_short else 0
    finally:
        if grpc_server is not None:
            stop_grpc_server(*grpc_server, grace_seconds=args.graceful_shutdown_seconds)
        if served is not None:
            served.engine.shutdown(timeout=args.graceful_shutdown_seconds)
        if fastdeploy_server is not None:
            fastdeploy_server.stop(args.graceful_shutdown_seconds)
        print("server stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
        return serve(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: FastDeploy missing, a port in use
        print(f"paddle-llm serve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
