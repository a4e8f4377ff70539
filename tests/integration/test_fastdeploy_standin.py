"""``--engine fastdeploy`` against a STAND-IN for FastDeploy 2.x (which needs a GPU and cannot run here).

The stand-in is a tiny ``fastdeploy.entrypoints.openai.api_server`` module written to a temp directory: a stdlib HTTP
server answering ``/health``, ``/v1/models`` and OpenAI completions with canned text. It checks our side of the
contract: detection by ``fastdeploy.entrypoints``, the launch command, waiting for health, proxying REST (plain, SSE
and errors), our gRPC front end over it, the API key, and stopping the subprocess on shutdown.
"""

import json
import os
import subprocess
import sys

import grpc
import openai
import pytest

from paddle_llm.export.command import main as export_main
from paddle_llm.serving import generation_pb2, generation_pb2_grpc
from tests.conftest import ROOT, subprocess_env
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_checkpoint import make_checkpoint

STANDIN_SERVER = r'''
"""STAND-IN for FastDeploy 2.x's OpenAI server (tests only): canned answers, same routes and flags."""
import argparse, json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--port", type=int, required=True)
args, extra = parser.parse_known_args()
with open(os.environ["STANDIN_RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "model_files": sorted(os.listdir(args.model))}, f)
MODEL = os.path.basename(os.path.normpath(args.model))
WORDS = ["standin", " reply", " from", " fastdeploy"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.send_json(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "standin"}]})
        self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        if (body.get("max_tokens") or 0) > 100:
            return self.send_json(400, {"error": {"message": "max_tokens too large (standin)", "type": "invalid_request_error", "param": "max_tokens", "code": None}})
        usage = {"prompt_tokens": 3, "completion_tokens": len(WORDS), "total_tokens": 3 + len(WORDS)}
        if not body.get("stream"):
            text = "".join(WORDS)
            choice = {"index": 0, "finish_reason": "stop"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return self.send_json(200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0, "model": MODEL, "choices": [choice], "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def send(payload):
            data = ("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        for word in WORDS:
            choice = {"index": 0, "finish_reason": None}
            choice.update({"delta": {"content": word}} if chat else {"text": word})
            send({"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0, "model": MODEL, "choices": [choice]})
            time.sleep(0.01)
        last = {"index": 0, "finish_reason": "stop"}
        last.update({"delta": {}} if chat else {"text": ""})
        send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [last]})
        if (body.get("stream_options") or {}).get("include_usage"):
            send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [], "usage": usage})
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
'''


def write_package(root, files: dict) -> str:
    for relative, text in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return str(root)


@pytest.fixture(scope="module")
def standin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    return write_package(root, {
        "fastdeploy/__init__.py": '"""STAND-IN for FastDeploy 2.x (tests only)."""\n',
        "fastdeploy/entrypoints/__init__.py": "",
        "fastdeploy/entrypoints/openai/__init__.py": "",
        "fastdeploy/entrypoints/openai/api_server.py": STANDIN_SERVER,
    })


@pytest.fixture(scope="module")
def fastdeploy_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastdeploy-export")
    checkpoint = make_checkpoint("tiny-llama", str(root / "ckpt"), train_steps=1)
    output = str(root / "fd-export")
    assert export_main(["--model_name_or_path", checkpoint, "--output_path", output, "--format", "fastdeploy"]) == 0
    return output


def test_standin_serves_rest_and_grpc_through_our_front_end(standin_path, fastdeploy_export, tmp_path):
    record = tmp_path / "standin.json"
    server = ServerProcess(["--model", fastdeploy_export, "--engine", "fastdeploy", "--api_key", "k"],
                           str(tmp_path / "server.log"), extra_pythonpath=standin_path)
    server.env["STANDIN_RECORD"] = str(record)
    server.start()
    try:
        launched = json.loads(record.read_text())
        assert launched["argv"][:2] == ["--model", fastdeploy_export] and launched["argv"][2] == "--port"
        assert "model.safetensors" in launched["model_files"]

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        model = client.models.list().data[0].id
        plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].message.content == "standin reply from fastdeploy"
        streamed = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="standin"):  # FastDeploy's own 400 passes through
            client.completions.create(model=model, prompt="hi", max_tokens=500)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()

        stub = generation_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        metadata = [("authorization", "Bearer k")]
        unary = stub.Generate(generation_pb2.GenerateRequest(prompt="hi"), metadata=metadata, timeout=30)
        assert unary.text == "standin reply from fastdeploy" and unary.finish_reason == "stop"
        assert unary.usage.completion_tokens == 4
        pieces = list(stub.GenerateStream(generation_pb2.GenerateRequest(prompt="hi"), metadata=metadata, timeout=30))
        assert "".join(p.text for p in pieces) == unary.text
        with pytest.raises(grpc.RpcError) as raised:
            stub.Generate(generation_pb2.GenerateRequest(prompt="hi", max_tokens=500), metadata=metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert server.stop() == 0, server.log_tail()
    # Our shutdown stops the FastDeploy subprocess too.
    with pytest.raises(ProcessLookupError):
        os.kill(launched["pid"], 0)


def run_python(code: str, pythonpath: str) -> subprocess.CompletedProcess:
    env = subprocess_env(PYTHONPATH=os.pathsep.join([ROOT, pythonpath]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_standin_absent_gives_clear_error(tmp_path):
    result = run_python("from paddle_llm.serving.fastdeploy import find_fastdeploy; find_fastdeploy()", str(tmp_path))
    assert result.returncode != 0
    assert "fastdeploy-gpu" in result.stderr and "different project" in result.stderr


def test_unrelated_pypi_fastdeploy_is_not_mistaken_for_the_real_one(tmp_path):
    unrelated = write_package(tmp_path, {"fastdeploy/__init__.py": '"""Some other project called fastdeploy."""\n'})
    result = run_python("from paddle_llm.serving.fastdeploy import find_fastdeploy; find_fastdeploy()", unrelated)
    assert result.returncode != 0 and "unrelated `fastdeploy`" in result.stderr


def test_standin_refuses_a_paddle_format_export(tmp_path, capsys):
    from paddle_llm.serving.command import main as serve_main

    (tmp_path / "paddle_llm_export.json").write_text(json.dumps({
        "format": "paddle", "family": "llama", "chat_template": "llama", "dtype": "float32", "vocab_size": 8,
        "max_context_length": 8, "eos_token_ids": [2], "pad_token_id": 0}))
    assert serve_main(["--model", str(tmp_path), "--engine", "fastdeploy"]) == 2
    assert "--format fastdeploy" in capsys.readouterr().err
