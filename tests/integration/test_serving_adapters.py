"""Many LoRA adapters on one base (``serve --lora_modules``): rows of different adapters in one step, the merged
model's tokens, ``/v1/models``, gRPC's ``model``, load/unload at run time, the slot limit, and adapters refused for
another base.

Two real adapters are trained once per module by ``finetune --lora`` on the session's tiny Llama (3 steps, on
different targets, so their greedy tokens differ from each other and from the base); one server on 127.0.0.1 serves
both.
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest

from paddle_llm.peft.merge import main as merge_main
from paddle_llm.serving import generation_pb2, generation_pb2_grpc
from tests.conftest import ROOT, subprocess_env
from tests.integration.server_process import ServerProcess
from tests.integration.test_finetune import FINETUNE, WORDS
from tests.integration.test_hf_models import snapshot

pytestmark = pytest.mark.slow  # adapters trained, a server started

PROMPTS = ["3 plus 4 =", "The quick brown fox"]
TARGETS = {"a": lambda a, b: WORDS[(a + b) % 10], "b": lambda a, b: "banana " * 3}
GREEDY = {"max_tokens": 8, "temperature": 0}
MISMATCH = "tensor llama.layers.0.self_attn.q_proj.lora_A is [64, 4] in the adapter but [128, 4] for this base"


def train_adapters(base: str, root) -> dict[str, str]:
    """``finetune --lora`` for adapters ``a`` and ``b`` side by side: name -> adapter directory."""
    runs = {}
    for name, target in TARGETS.items():
        data = root / f"data_{name}"
        data.mkdir()
        records = [json.dumps({"src": f"{a} plus {b} =", "tgt": target(a, b)}) for a in range(8) for b in range(8)]
        (data / "train.json").write_text("\n".join(records[:56]) + "\n")
        (data / "dev.json").write_text("\n".join(records[56:]) + "\n")
        args = [FINETUNE, "--model_name_or_path", base, "--dataset_name_or_path", str(data), "--output_dir",
                str(root / name), "--do_train", "--lora", "True", "--r", "4", "--max_steps", "3", "--learning_rate",
                "0.05", "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu", "--src_length", "16",
                "--tgt_length", "8"]
        runs[name] = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=subprocess_env(), text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, f"finetune {name}: {stderr[-3000:]}"
    return {name: str(root / name) for name in runs}


@pytest.fixture(scope="module")
def trained(saved_tiny_models, tmp_path_factory):
    """The shared tiny Llama as the base, adapters ``a`` and ``b`` trained on it, ``a`` merged by merge-lora, the
    adapters' file digests, and a server of the base with both adapters (started while the merge runs)."""
    root = tmp_path_factory.mktemp("adapters")
    base = saved_tiny_models["llama"]
    paths = {"base": base, **train_adapters(base, root), "merged_a": str(root / "merged_a")}
    digests = {name: snapshot(paths[name]) for name in ("a", "b")}
    server = ServerProcess(["--model", base, "--served_model_name", "base", "--engine", "dygraph", "--lora_modules",
                            f"a={paths['a']}", f"b={paths['b']}", "--max_loras", "2", "--enable_lora_runtime_updates",
                            "--num_threads", "1"], str(root / "server.log"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(server.start)
        assert merge_main(["--model_name_or_path", base, "--lora_path", paths["a"], "--output_path",
                           paths["merged_a"]]) == 0
        started.result()
    yield paths, digests, server
    assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def server(trained):
    return trained[2]


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def complete(server, model, prompt, max_tokens=GREEDY["max_tokens"]):
    reply = post(server, "/v1/completions", {"model": model, "prompt": prompt, **GREEDY, "max_tokens": max_tokens})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def greedy_rows(decoder, prompts, adapters, steps=6, vocab=None):
    """Greedy tokens ``[rows, steps]`` of rows decoded together in the decoder's first slots (the engine is idle),
    and the prefill's logits; ``vocab``: pick among the first ids only (the engine samples the tokenizer's)."""
    slots = list(range(len(prompts)))
    for slot in slots:
        decoder.clear(slot)
    logits = decoder.prefill(slots, prompts, adapters)
    first, tokens = logits, [logits[:, :vocab].argmax(-1)]
    for _ in range(steps - 1):
        logits = decoder.decode(tokens[-1].tolist(), adapters)
        tokens.append(logits[:, :vocab].argmax(-1))
    return np.stack(tokens, axis=1), first


def test_adapter_rows_in_one_step_equal_each_alone_and_the_merged_model(trained, other_base_adapter):
    from paddle_llm.peft.adapter_match import AdapterMismatchError
    from paddle_llm.serving.model import AdapterSlots, open_checkpoint
    from paddle_llm.serving.openai.lora.protocol import load_adapter
    from paddle_llm.serving.openai.protocol import RequestError

    paths = trained[0]
    served = open_checkpoint(paths["base"], 5, adapter_slots=AdapterSlots(2, 8, runtime_updates=False))
    merged = open_checkpoint(paths["merged_a"], 4)
    try:
        slots = {name: served.adapters.load(name, paths[name], name).slot for name in ("a", "b")}
        ids = [served.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        rows = [(ids[0], 0), (ids[0], slots["a"]), (ids[0], slots["b"]), (ids[1], slots["a"]), (ids[1], 0)]
        together, together_logits = greedy_rows(served.engine.decoder, [p for p, _ in rows], [s for _, s in rows])
        for row, (prompt, slot) in enumerate(rows):
            alone, alone_logits = greedy_rows(served.engine.decoder, [prompt], [slot])
            assert together[row].tolist() == alone[0].tolist(), row
            np.testing.assert_allclose(together_logits[row], alone_logits[0], atol=1e-5)
        assert len({tuple(together[row]) for row in range(3)}) == 3  # base, a and b each decode differently
        merged_tokens, _ = greedy_rows(merged.engine.decoder, [ids[0], ids[1]], None)
        assert together[[1, 3]].tolist() == merged_tokens.tolist()  # adapter a == base + a merged by merge-lora
        with pytest.raises(RequestError) as refused:  # this server took no --enable_lora_runtime_updates
            load_adapter(served, {"lora_name": "c", "lora_path": paths["b"]})
        assert refused.value.status == 403 and "--enable_lora_runtime_updates" in refused.value.message
        with pytest.raises(AdapterMismatchError) as mismatch:  # what serve --lora_modules other=DIR prints, exit 2
            served.adapters.load("other", other_base_adapter, "--lora_modules other")
        assert str(mismatch.value).startswith(f"--lora_modules other {other_base_adapter} does not fit --model")
        assert MISMATCH in str(mismatch.value) and "\n" not in str(mismatch.value)
    finally:
        served.engine.shutdown()
        merged.engine.shutdown()


def test_prefix_cache_hits_only_within_one_adapter_and_each_gets_its_own_tokens(trained):
    from paddle_llm.serving.model import AdapterSlots, open_checkpoint
    from paddle_llm.serving.prefix_cache import BLOCK_TOKENS
    from paddle_llm.serving.sampling import SamplingParams

    paths = trained[0]
    served = open_checkpoint(paths["base"], 2, adapter_slots=AdapterSlots(2, 8, runtime_updates=True))
    engine, steps = served.engine, 6
    try:
        slots = {"base": 0, **{name: served.adapters.load(name, paths[name], name).slot for name in ("a", "b")}}
        prompt = served.tokenizer("The quick brown fox " * 8, add_special_tokens=False)["input_ids"]
        cached = (len(prompt) - 1) // BLOCK_TOKENS * BLOCK_TOKENS  # its full blocks but the last token's
        assert cached >= 2 * BLOCK_TOKENS
        alone = {name: greedy_rows(engine.decoder, [prompt], [slot], steps, engine.sampled_vocab_size)[0][0].tolist()
                 for name, slot in slots.items()}
        assert len({tuple(tokens) for tokens in alone.values()}) == 3

        def run(name, slot=None):
            """The engine's greedy tokens for ``prompt`` under adapter ``name`` (it stops at EOS; ``alone`` does not),
            and how many prompt tokens the prefix cache gave it."""
            hits = engine.prefix_cache.hit_tokens
            params = SamplingParams(max_tokens=steps, temperature=0)
            tokens = list(engine.submit(prompt, params, adapter=slots[name] if slot is None else slot).result().token_ids)
            assert tokens == alone[name][:len(tokens)], name
            return engine.prefix_cache.hit_tokens - hits

        assert run("a") == 0  # cold: a's blocks are stored
        assert run("base") == 0 and run("b") == 0  # the same tokens under another adapter: no hit
        assert run("a") == cached and run("b") == cached  # each hits its own blocks
        served.adapters.unload("a")
        reloaded = served.adapters.load("a_again", paths["a"], "a_again").slot
        assert reloaded == slots["a"]
        assert run("a", reloaded) == 0  # a slot loaded anew never reuses the KV of what it held before
    finally:
        engine.shutdown()


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, trained):
    paths = trained[0]
    cards = {card["id"]: card for card in httpx.get(server.url + "/v1/models").json()["data"]}
    assert cards["base"]["parent"] is None
    assert {name: (cards[name]["parent"], cards[name]["root"]) for name in ("a", "b")} == {
        name: ("base", os.path.abspath(paths[name])) for name in ("a", "b")}
    assert post(server, "/v1/completions", {"model": "a", "prompt": "x", **GREEDY}).json()["model"] == "a"
    tokenized = post(server, "/tokenize", {"model": "a", "prompt": "x"})
    assert tokenized.status_code == 200 and tokenized.json() == post(server, "/tokenize", {"prompt": "x"}).json()
    missing = post(server, "/v1/completions", {"model": "nope", "prompt": "x", **GREEDY})
    assert missing.status_code == 404 and "'base', 'a', 'b'" in missing.json()["error"]["message"]


def test_requests_for_different_adapters_in_one_batch_get_their_own_tokens(server):
    requests = [(model, prompt) for prompt in PROMPTS for model in ("base", "a", "b")]
    alone = [complete(server, model, prompt) for model, prompt in requests]
    assert len(set(alone[:3])) == 3
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: complete(server, *request), requests))
    assert together == alone


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield generation_pb2_grpc.TextGenerationStub(channel)


def generate(stub, prompt, **fields):
    """gRPC ``Generate``'s greedy text, with the same limits as ``complete``."""
    return stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, **GREEDY, **fields), timeout=120).text


def test_grpc_model_picks_the_adapter_or_the_base_as_rest_does(server, stub):
    texts = {model: complete(server, model, PROMPTS[0]) for model in ("base", "a", "b")}
    assert len(set(texts.values())) == 3  # a's greedy answer is empty (EOS first), b's is not
    assert {model: generate(stub, PROMPTS[0], model=model) for model in texts} == texts
    assert generate(stub, PROMPTS[0]) == texts["base"]  # unset, as the base's name


def test_grpc_unknown_model_is_not_found_with_rests_error_body(server, stub):
    rest = post(server, "/v1/completions", {"model": "nope", "prompt": PROMPTS[0], **GREEDY})
    assert rest.status_code == 404
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, PROMPTS[0], model="nope")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    error = json.loads(refused.value.details())
    assert error == rest.json()
    assert error["error"]["code"] == "model_not_found" and "'nope'" in error["error"]["message"]


def test_load_unload_limit_and_in_flight_requests(server, trained):
    paths = trained[0]
    full = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": paths["b"]})
    assert full.status_code == 400 and full.json()["error"]["code"] == "adapter_limit_reached", full.text
    long = 48  # decoding while the unload arrives
    expected_b = complete(server, "b", PROMPTS[0], long)
    body = {"model": "b", "prompt": PROMPTS[0], "stream": True, **GREEDY, "max_tokens": long}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        unloaded = post(server, "/v1/unload_lora_adapter", {"lora_name": "b"})
        assert unloaded.status_code == 200 and "removed" in unloaded.text
        rest = [line for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(line[len("data: "):])["choices"][0]["text"] for line in [first] + rest)
    assert text == expected_b  # submitted before the unload: finished with adapter b
    assert post(server, "/v1/completions", {"model": "b", "prompt": "x", **GREEDY}).status_code == 404
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 404
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": paths["b"]})
    assert loaded.status_code == 200, loaded.text
    assert complete(server, "c", PROMPTS[0], long) == expected_b
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": paths["b"]})
    assert again.status_code == 400 and "already been loaded" in again.text


@pytest.fixture(scope="module")
def other_base_adapter(trained, tmp_path_factory) -> str:
    """Adapter ``a`` as a base of hidden size 64 would have it: every A takes 64 inputs."""
    import paddle

    paths = trained[0]
    other = tmp_path_factory.mktemp("other_base_adapter")
    (other / "lora_config.json").write_text(open(os.path.join(paths["a"], "lora_config.json")).read())
    state = paddle.load(os.path.join(paths["a"], "lora_model_state.pdparams"), return_numpy=True)
    state = {name: value[:64] if name.endswith("lora_A") else value for name, value in state.items()}
    paddle.save(state, str(other / "lora_model_state.pdparams"))
    return str(other)


def test_adapter_saved_for_another_base_is_refused_naming_the_tensor(server, other_base_adapter):
    refused = post(server, "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": other_base_adapter})
    message = refused.json()["error"]["message"]
    assert refused.status_code == 400 and MISMATCH in message and "does not fit --model" in message


def test_input_adapter_directories_are_unchanged(server, trained):
    paths, digests, _ = trained
    assert {name: snapshot(paths[name]) for name in ("a", "b")} == digests
