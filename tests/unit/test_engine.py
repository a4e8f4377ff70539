"""Engine pieces without a real model: sampling, streamed text, and continuous batching over a toy step function.

The toy "model" keeps a real KV cache (the token ids themselves) and predicts ``(sum of attended tokens + 7 * position)
mod vocab``, so any mistake in padding, masks, positions, merging or dropping rows changes the output. Every request
must decode exactly as it would alone, however it is batched.
"""

import json
import threading
import time

import numpy as np
import pytest

from paddle_llm.inference.manifest import CacheLayout
from paddle_llm.serving.engine import Engine, EngineClosedError
from paddle_llm.serving.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample_token,
    top_k_filter,
    top_p_filter,
)
from paddle_llm.serving.text_stream import IncrementalDetokenizer, StopStringFilter

VOCAB = 50
EOS = 0
LAYOUT = CacheLayout(num_layers=1, num_kv_heads=1, head_dim=1, batch_axis=0, seq_axis=1, head_axis=2)


# ---- sampling ------------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_whatever_the_seed():
    logits = np.array([0.1, 2.0, 1.9, -1.0], dtype="float32")
    for seed in range(5):
        assert sample_token(logits, SamplingParams(temperature=0.0), np.random.default_rng(seed), np.array([])) == 1


def test_top_k_keeps_k_largest():
    filtered = top_k_filter(np.array([1.0, 5.0, 3.0, 4.0]), 2)
    assert np.isfinite(filtered).tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isfinite(top_p_filter(logits, 0.7)).tolist() == [True, True, False, False]
    assert np.isfinite(top_p_filter(logits, 0.01)).tolist() == [True, False, False, False]
    assert np.isfinite(top_p_filter(logits, 1.0)).all()


def test_repetition_penalty_pushes_seen_tokens_down_both_signs():
    logits = np.array([2.0, -2.0, 1.0])
    penalised = apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0]


def test_temperature_sampling_follows_distribution_and_seed_reproduces():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(0)
    draws = [sample_token(logits, params, rng, np.array([])) for _ in range(3000)]
    assert np.bincount(draws, minlength=3)[0] / 3000 == pytest.approx(0.7, abs=0.04)
    first = [sample_token(logits, params, np.random.default_rng(42), np.array([])) for _ in range(1)]
    again = [sample_token(logits, params, np.random.default_rng(42), np.array([])) for _ in range(1)]
    assert first == again


def test_low_temperature_concentrates():
    logits = np.array([1.0, 1.5, 0.0])
    rng = np.random.default_rng(1)
    draws = [sample_token(logits, SamplingParams(temperature=0.05), rng, np.array([])) for _ in range(200)]
    assert set(draws) == {1}


@pytest.mark.parametrize(
    "fields, name",
    [({"max_tokens": -1}, "max_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"stop": ("",)}, "stop"),
     ({"seed": -1}, "seed")],
)
def test_invalid_params_name_the_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SamplingParams(**fields).validate()


# ---- streamed text -------------------------------------------------------------------------------------------------

def test_stop_filter_holds_back_possible_stop_and_cuts_at_it():
    stop = StopStringFilter(["END"])
    assert stop.push("hello E") == ("hello ", False)
    assert stop.push("N") == ("", False)
    assert stop.push("D and more") == ("", True)


def test_stop_filter_releases_false_alarm_and_flushes():
    stop = StopStringFilter(["END", "\n\n"])
    assert stop.push("an E") == ("an ", False)
    assert stop.push("x") == ("Ex", False)
    assert stop.push("tail\n") == ("tail", False)
    assert stop.flush() == "\n"


def test_incremental_detokenizer_matches_full_decode_with_shipped_tokenizer():
    from paddle_llm.models.registry import FAMILIES, load_tokenizer

    tokenizer = load_tokenizer("tiny-llama", FAMILIES["llama"])
    prompt = tokenizer("Question:", add_special_tokens=False)["input_ids"]
    generated = tokenizer(" The fox, 你好 wörld! 42", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.push(token) for token in generated]
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)):]
    assert "" in pieces  # a multi-byte character arrived over several byte tokens and was held back until complete


def test_incremental_detokenizer_known_piece_texts_give_what_decoding_gives():
    """Streaming skips decoding for ordinary pieces after visible text; over random streams of ordinary, byte,
    special and unknown ids its pieces are exactly those of decoding every token."""
    from paddle_llm.models.registry import FAMILIES, load_tokenizer
    from paddle_llm.serving.text_stream import TextDecoder, text_decoder

    tokenizer = load_tokenizer("tiny-llama", FAMILIES["llama"])
    fast = text_decoder(tokenizer)
    slow = TextDecoder(fast)  # the same decode, no known piece texts
    bytes_known = [i for i in fast.appended if tokenizer.sp_model.IsByte(i)]
    assert len(fast.appended) > 0.9 * (len(tokenizer) - 3 - 128)  # all but the specials and non-ASCII bytes, roughly
    assert len(bytes_known) == 128 and fast.appended[tokenizer.sp_model.PieceToId("<0x41>")] == "A"
    rng = np.random.default_rng(0)
    words = tokenizer(" The fox, 你好 wörld! 42 naïve", add_special_tokens=False)["input_ids"]
    fast_hits = 0
    for _ in range(400):
        kinds = rng.integers(0, 4, rng.integers(1, 16))
        ids = [int(rng.integers(0, 3)) if kind == 0 else int(rng.integers(3, 259)) if kind == 1
               else int(rng.choice(words)) if kind == 2 else int(rng.integers(259, len(tokenizer))) for kind in kinds]
        prompt = rng.integers(0, len(tokenizer), rng.integers(0, 4)).tolist()
        streams = [IncrementalDetokenizer(tokenizer, prompt, decode) for decode in (fast, slow)]
        for token in ids:
            fast_hits += streams[0].read_offset == len(streams[0].ids) and streams[0].ids[-1:] != [] \
                and streams[0].ids[-1] in fast.follows_text and token in fast.appended
            assert streams[0].push(token) == streams[1].push(token), (prompt, ids)
        assert streams[0].flush() == streams[1].flush(), (prompt, ids)
    assert fast_hits > 300  # the known-text path ran (432 here)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-chatglm", "tiny-chatglm2", "tiny-qwen2"])
def test_text_decoder_equals_tokenizer_decode(preset):
    from paddle_llm.models.registry import load_tokenizer, resolve_model
    from paddle_llm.serving.text_stream import text_decoder

    tokenizer = load_tokenizer(preset, resolve_model(preset).family)
    decode = text_decoder(tokenizer)
    rng = np.random.default_rng(0)
    # Random ids cover special ids, byte-fallback pieces cut mid-character, and whole words.
    for _ in range(300):
        ids = rng.integers(0, len(tokenizer), rng.integers(1, 12)).tolist()
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_llama_text_decoder_skips_paddlenlps_slow_decode(monkeypatch):
    from paddle_llm.models.registry import load_tokenizer, resolve_model
    from paddle_llm.serving.text_stream import text_decoder

    tokenizer = load_tokenizer("tiny-llama", resolve_model("tiny-llama").family)
    ids = tokenizer("The fox ran", add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    decode = text_decoder(tokenizer)
    monkeypatch.setattr(tokenizer, "decode", lambda *args, **kwargs: pytest.fail("PaddleNLP's decode was called"))
    assert decode(ids) == expected


# ---- the toy model and continuous batching -----------------------------------------------------------------------

class ToyRunner:
    """Next token = (sum of attended cache entries + 7 * position of the last token) mod VOCAB, through a real cache:
    the step graph's interface, past in, the new positions' keys and values out."""

    def __init__(self, delay: float = 0.0, fail_on_token: int | None = None):
        self.delay = delay
        self.fail_on_token = fail_on_token
        self.batch_sizes = []
        self.query_lengths = []
        self.past_columns = []

    def run(self, inputs):
        import paddle

        input_ids, positions, mask, key, value = inputs  # one layer
        if self.fail_on_token is not None and bool((input_ids == self.fail_on_token).any()):
            raise RuntimeError("toy failure")
        time.sleep(self.delay)
        self.batch_sizes.append(input_ids.shape[0])
        self.query_lengths.append(input_ids.shape[1])
        self.past_columns.append(key.shape[1])
        new = input_ids.astype("float32").reshape([input_ids.shape[0], input_ids.shape[1], 1, 1])
        grown = paddle.concat([key, new], axis=1)
        attended = (grown[:, :, 0, 0] * mask[:, 0, -1, :].astype("float32")).sum(axis=-1)
        next_tokens = (attended.astype("int64") + 7 * positions[:, -1]) % VOCAB
        logits = paddle.nn.functional.one_hot(next_tokens, VOCAB) * 10.0
        return [logits, new, new]


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    sequence, out = list(prompt), []
    while len(out) < max_tokens:
        token = (sum(sequence) + 7 * (len(sequence) - 1)) % VOCAB
        if token == EOS:
            break
        out.append(token)
        sequence.append(token)
    return out


class ToyTokenizer:
    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) if i else "" for i in ids)


def toy_engine(max_batch_size=8, prefill_chunk_tokens=256, prefix_cache_tokens=0, **runner_options):
    from paddle_llm.inference.runtime import StepDecoder

    runner = ToyRunner(**runner_options)
    decoder = StepDecoder(runner, LAYOUT, "float32", glm_positions=False, max_columns=200)
    engine = Engine(decoder, ToyTokenizer(), [EOS], max_context_length=200, max_batch_size=max_batch_size,
                    prefill_chunk_tokens=prefill_chunk_tokens, prefix_cache_tokens=prefix_cache_tokens)
    return engine.start(), runner


PROMPTS = [[3, 4, 5], [9], [1, 2, 3, 4, 5, 6, 7, 8], [11, 12], [5, 5, 5, 5], [21, 1, 7]]


def test_attention_mask_left_padding_and_causal():
    from paddle_llm.inference.runtime import step_attention_mask

    mask = step_attention_mask(np.array([[False, True]]), np.array([[False, True, True]]))
    assert mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].astype(int).tolist() == [[0, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 1]]


def test_each_request_decodes_as_alone_when_batched_and_joining_midway():
    engine, runner = toy_engine()
    try:
        handles = []
        for index, prompt in enumerate(PROMPTS):
            handles.append((prompt, 12 - index, engine.submit(prompt, SamplingParams(max_tokens=12 - index, temperature=0))))
            time.sleep(0.002 * index)  # later requests join a batch already decoding
        for prompt, max_tokens, handle in handles:
            assert list(handle.result().token_ids[: len(expected_tokens(prompt, max_tokens))]) == expected_tokens(prompt, max_tokens)
        assert max(runner.batch_sizes) > 1
    finally:
        engine.shutdown()


def test_finish_reasons_and_usage():
    engine, _ = toy_engine()
    try:
        prompt = [3, 4, 5]
        done = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0))
        assert done.finish_reason == "length" and done.completion_tokens == 5 and done.prompt_tokens == 3
        expected = expected_tokens(prompt, 5)
        assert done.text == ToyTokenizer().decode(expected)
        # A stop string made of the third token's letter cuts the text there.
        stop_text = ToyTokenizer().decode(expected[2:3])
        stopped = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0, stop=(stop_text,)))
        assert stopped.finish_reason == "stop" and stop_text not in stopped.text
    finally:
        engine.shutdown()


def test_eos_finishes_with_stop():
    # A two-token prompt whose first prediction, (a + b + 7 * 1) mod VOCAB, is the EOS id.
    prompt = next([a, b] for a in range(1, VOCAB) for b in range(1, VOCAB) if (a + b + 7) % VOCAB == EOS)
    engine, _ = toy_engine()
    try:
        result = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0))
        assert result.finish_reason == "stop" and result.completion_tokens == 0 and result.text == ""
    finally:
        engine.shutdown()


def test_streamed_events_concatenate_to_result():
    engine, _ = toy_engine()
    try:
        handle = engine.submit([9], SamplingParams(max_tokens=8, temperature=0))
        events = list(handle)
        assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
        assert "".join(e.text for e in events) == ToyTokenizer().decode(expected_tokens([9], 8))
    finally:
        engine.shutdown()


def test_batch_size_limit_queues_the_rest():
    engine, runner = toy_engine(max_batch_size=2, delay=0.005)
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0)) for p in PROMPTS]
        results = [h.result() for h in handles]
        assert max(runner.batch_sizes) <= 2
        for prompt, result in zip(PROMPTS, results):
            assert list(result.token_ids[: len(expected_tokens(prompt, 6))]) == expected_tokens(prompt, 6)
    finally:
        engine.shutdown()


def test_cancel_frees_the_slot_and_others_finish():
    engine, _ = toy_engine(max_batch_size=2, delay=0.01)
    try:
        long = engine.submit([3], SamplingParams(max_tokens=150, temperature=0))
        other = engine.submit([4], SamplingParams(max_tokens=150, temperature=0))
        time.sleep(0.05)
        long.cancel()
        queued = engine.submit([5], SamplingParams(max_tokens=3, temperature=0))
        assert queued.result().finish_reason == "length"  # it got the cancelled request's slot
        assert long.result().finish_reason == "cancelled"
        other.cancel()
    finally:
        engine.shutdown()


def test_running_stream_keeps_producing_tokens_while_a_long_prompt_is_prefilled_in_chunks():
    engine, _ = toy_engine(prefill_chunk_tokens=4)
    log = []  # appended by the engine thread (and once by this one, before the long request exists)
    try:
        running = engine.submit([3], SamplingParams(max_tokens=150, temperature=0),
                                listener=lambda event: log.append(("running", event)))
        while not log:
            time.sleep(0.001)
        long_prompt = [(5 * i) % (VOCAB - 1) + 1 for i in range(60)]  # 15 chunks of 4
        log.append(("long submitted", None))
        long = engine.submit(long_prompt, SamplingParams(max_tokens=3, temperature=0),
                             listener=lambda event: log.append(("long", event)))
        while not any(name == "long" and event.finish_reason for name, event in log):
            time.sleep(0.001)
        running.cancel()
        names = [name for name, _ in log]
        admitted, first_long = names.index("long submitted"), names.index("long")
        # Each of the 15 prefill chunks is followed by a decoding step of the running stream.
        assert names[admitted:first_long].count("running") >= 14
        long_tokens = [t for name, event in log if name == "long" for t in event.token_ids]
        assert long_tokens == expected_tokens(long_prompt, 3)[: len(long_tokens)] and long_tokens
    finally:
        engine.shutdown()


def test_no_slot_or_cache_leaks_over_many_requests_with_cancels():
    engine, _ = toy_engine(max_batch_size=3, prefill_chunk_tokens=5)
    try:
        for round_ in range(30):
            prompts = [[round_ % 40 + 1] * (1 + (round_ + i) % 9) for i in range(5)]
            lengths = [1 + (round_ + i) % 7 for i in range(5)]
            handles = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
            handles[round_ % 5].cancel()
            for index, (prompt, length, handle) in enumerate(zip(prompts, lengths, handles)):
                result = handle.result()
                if index != round_ % 5:
                    expected = expected_tokens(prompt, length)
                    assert list(result.token_ids[: len(expected)]) == expected
        while engine.stats().running:
            time.sleep(0.001)
        assert engine.stats().waiting == 0 and not engine._decoding and not engine._prefilling
        # Rows never held more than 9 + 7 positions: the cache never grew past its first block of columns.
        assert engine.decoder.capacity == 32 and engine.decoder.slots == 3
        assert engine.generate([9], SamplingParams(max_tokens=8, temperature=0)).token_ids == tuple(expected_tokens([9], 8))
    finally:
        engine.shutdown()


def test_prefix_cache_reuses_shared_prompt_blocks_and_output_is_unchanged():
    engine, runner = toy_engine(prefix_cache_tokens=64)
    system = [(3 * i) % (VOCAB - 1) + 1 for i in range(37)]  # two full 16-token blocks and 5 more
    try:
        first = engine.generate(system + [4, 5], SamplingParams(max_tokens=5, temperature=0))
        assert engine.stats().prefix_cache_hit_rate == 0.0
        runner.query_lengths.clear()
        second = engine.generate(system + [9], SamplingParams(max_tokens=5, temperature=0))
        # The second prompt ran only what follows the two cached blocks.
        assert runner.query_lengths[0] == 38 - 32
        assert engine.stats().prefix_cache_hit_rate == pytest.approx(32 / (39 + 38))
        for prompt, result in ((system + [4, 5], first), (system + [9], second)):
            assert list(result.token_ids[: len(expected_tokens(prompt, 5))]) == expected_tokens(prompt, 5)
        # Prompt logprobs need every position's logits: no reuse for those.
        scored = engine.submit(system + [9], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))
        scored.result()
        assert len(scored.prompt_logprobs) == 37
    finally:
        engine.shutdown()


def test_cache_shrinks_back_after_a_long_request_leaves():
    engine, runner = toy_engine(max_batch_size=2)
    try:
        short = engine.submit([3], SamplingParams(max_tokens=60, temperature=0))
        long_prompt = [(5 * i) % (VOCAB - 1) + 1 for i in range(150)]
        assert engine.generate(long_prompt, SamplingParams(max_tokens=2, temperature=0)).completion_tokens >= 1
        result = short.result()  # decodes on after the long one left
        assert max(runner.past_columns) >= 150 and runner.past_columns[-1] < max(runner.past_columns)
        assert list(result.token_ids[: len(expected_tokens([3], 60))]) == expected_tokens([3], 60)
    finally:
        engine.shutdown()


def test_decoding_steps_read_at_most_a_block_of_columns_past_the_longest_row():
    # Attention reads every column a step is given, masked or not: capacity must follow the row, not double past it.
    engine, runner = toy_engine(max_batch_size=1)
    try:
        prompt = [3, 4, 5]
        assert engine.generate(prompt, SamplingParams(max_tokens=120, temperature=0)).completion_tokens == 120
        decoding_columns = [c for c, q in zip(runner.past_columns, runner.query_lengths) if q == 1]
        row_lengths = range(len(prompt), len(prompt) + len(decoding_columns))
        assert all(length < columns <= length + 32 for columns, length in zip(decoding_columns, row_lengths))
    finally:
        engine.shutdown()


def test_growing_the_cache_copies_only_the_rows_holding_tokens():
    # A request alone on a 64-slot cache must not copy 63 idle rows each time its row grows a block.
    from paddle_llm.inference.runtime import StepDecoder

    decoder = StepDecoder(ToyRunner(), LAYOUT, "float32", glm_positions=False, slots=4, max_columns=200)
    decoder.prefill([0, 2], [[5, 6, 7], [8]])
    decoder.shrink([0])  # slot 2's request left
    decoder.prefill([0], [[9] * 40])  # row 0 grows past the first block
    assert decoder.capacity > 32
    assert decoder.row_cache(0, 0, 43)[0].ravel().tolist() == [5, 6, 7] + [9] * 40  # the toy's keys are the ids
    assert decoder.row_cache(2, 0, 1)[0].ravel().tolist() == [0]  # the freed row was not carried over


def test_prefill_attends_only_over_the_columns_its_rows_hold():
    # A fresh prompt's chunk read every column the longest decoding row had made room for, all masked.
    from paddle_llm.inference.runtime import StepDecoder

    runner = ToyRunner()
    decoder = StepDecoder(runner, LAYOUT, "float32", glm_positions=False, slots=4, max_columns=200)
    decoder.prefill([0], [[5] * 100])  # a long row: capacity 128
    decoder.prefill([3], [[6, 7, 8]])  # a fresh prompt in a slot not next to it
    decoder.prefill([3], [[9, 10]])  # its next chunk
    assert decoder.capacity == 128
    assert runner.past_columns[1:] == [1, 3]
    assert decoder.row_cache(3, 0, 5)[0].ravel().tolist() == [6, 7, 8, 9, 10]
    assert decoder.decode([11])[0].argmax() == expected_tokens([5] * 100 + [11], 1)[0]


def test_plain_greedy_rows_take_the_steps_argmax_and_biased_greedy_rows_are_still_sampled(monkeypatch):
    import paddle_llm.serving.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "sample_token", lambda *args: calls.append(args) or sample_token(*args))
    engine, _ = toy_engine(max_batch_size=2)
    try:
        plain = engine.submit([3, 4, 5], SamplingParams(max_tokens=6, temperature=0))
        forced = engine.submit([9], SamplingParams(max_tokens=6, temperature=0, logit_bias=((17, 100.0),)))
        assert list(plain.result().token_ids) == expected_tokens([3, 4, 5], 6)
        assert list(forced.result().token_ids) == [17] * 6
        assert len(calls) == 1 + 6  # the plain row's first token (after its prefill), every token of the biased row
    finally:
        engine.shutdown()


def test_default_batch_is_the_smaller_of_cores_and_memory():
    from paddle_llm.inference.sizing import kv_bytes_per_token, size_batch

    layout = CacheLayout(num_layers=4, num_kv_heads=8, head_dim=64, batch_axis=0, seq_axis=2, head_axis=1)
    per_request = kv_bytes_per_token(layout, "float32") * 2048
    assert per_request == 32 * 2**20
    by_cores = size_batch(layout, "float32", 2048, cores=2, available_memory=64 * 2**30)
    assert by_cores.max_batch_size == 64 and "32 rows x 2 cores = 64" in by_cores.reason
    by_memory = size_batch(layout, "float32", 2048, cores=2, available_memory=10 * per_request)
    assert by_memory.max_batch_size == 5 and "= 5" in by_memory.reason
    assert size_batch(layout, "float32", 2048, cores=2, available_memory=per_request).max_batch_size == 1


def test_failed_step_fails_its_requests_and_engine_keeps_serving():
    engine, _ = toy_engine(fail_on_token=13)
    try:
        failed = engine.generate([13, 1], SamplingParams(max_tokens=4, temperature=0))
        assert failed.finish_reason == "error" and "toy failure" in failed.error
        fine = engine.generate([2, 1], SamplingParams(max_tokens=4, temperature=0))
        assert fine.finish_reason in ("length", "stop") and fine.error is None
    finally:
        engine.shutdown()


def test_shutdown_finishes_in_flight_and_refuses_new():
    engine, _ = toy_engine(delay=0.005)
    handle = engine.submit([3, 4], SamplingParams(max_tokens=20, temperature=0))
    stopper = threading.Thread(target=engine.shutdown)
    stopper.start()
    assert handle.result().finish_reason in ("length", "stop")
    stopper.join(5)
    with pytest.raises(EngineClosedError):
        engine.submit([1], SamplingParams(max_tokens=2))


def test_prompt_filling_context_is_refused():
    engine, _ = toy_engine()
    try:
        with pytest.raises(ValueError, match="context holds 200"):
            engine.submit([1] * 200, SamplingParams())
        result = engine.generate([1] * 195, SamplingParams(max_tokens=50, temperature=0))
        assert result.completion_tokens <= 5  # clipped to the context, not an error
    finally:
        engine.shutdown()


# ---- a real (random) model: slots, chunks and padding must not change logits ---------------------------------------

@pytest.mark.parametrize("implementation", ["paddlenlp", "llama_inference"])
def test_real_model_slots_and_chunks_match_rows_alone_and_the_model(implementation):
    import paddle
    from paddle_llm.export.parity import reference_logits
    from paddle_llm.inference.runtime import DygraphStepRunner, StepDecoder
    from paddle_llm.inference.step_graph import KVCacheStep, cache_layout
    from paddle_llm.models.llama.inference_step import LlamaInferenceStep
    from paddle_llm.models.registry import build_config, build_model, resolve_model

    paddle.seed(0)
    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source), load_weights=False)
    layout = cache_layout(source.family, model.config, implementation)
    step = LlamaInferenceStep(model, fused_rms_norm=False) if implementation == "llama_inference" else KVCacheStep(model, source.family, layout.num_layers)
    decoder = StepDecoder(DygraphStepRunner(step), layout, "float32", False, slots=3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    alone = []
    for prompt in prompts:
        decoder.clear(0)
        decoder.prefill([0], [prompt])
        alone.append(decoder.decode([42])[0])
        np.testing.assert_allclose(alone[-1], reference_logits(model, source.family, prompt + [42]), atol=1e-4)
    # Row 0 prefilled first, row 1 joins later in two chunks, then both decode in one step.
    for slot in range(3):
        decoder.clear(slot)
    decoder.prefill([0], [prompts[0]])
    decoder.prefill([1], [prompts[1][:1]])
    decoder.prefill([1], [prompts[1][1:]])
    np.testing.assert_allclose(decoder.decode([42, 42]), np.stack(alone), atol=1e-4)
    # Two rows prefilled together in slots out of order, one in two chunks; then row 2 packs into slot 1.
    for slot in range(3):
        decoder.clear(slot)
    decoder.prefill([2, 0], [prompts[0][:4], prompts[1]])
    decoder.prefill([2], [prompts[0][4:]])
    decoder.move(2, 1)
    np.testing.assert_allclose(decoder.decode([42, 42]), np.stack(alone[::-1]), atol=1e-4)
    # A cached prefix written into another slot continues exactly as if that slot had prefilled it.
    decoder.clear(0)
    decoder.prefill([0], [prompts[0][:4]])
    decoder.clear(1)
    decoder.write_row_cache(1, 0, decoder.row_cache(0, 0, 4))
    np.testing.assert_allclose(decoder.prefill([1], [prompts[0][4:]])[0],
                               reference_logits(model, source.family, prompts[0]), atol=1e-4)
    # A prompt longer than the first capacity grows the cache between chunks, keeping what is there.
    long_prompt = [(7 * i) % 900 + 3 for i in range(90)]
    decoder.clear(0)
    decoder.prefill([0], [long_prompt[:50]])
    np.testing.assert_allclose(decoder.prefill([0], [long_prompt[50:]])[0],
                               reference_logits(model, source.family, long_prompt), atol=1e-4)
    assert decoder.capacity >= 90


def test_abort_all_fails_running_and_waiting_requests_with_the_reason():
    engine, _ = toy_engine(max_batch_size=1, delay=0.01)
    try:
        running = engine.submit([3], SamplingParams(max_tokens=150, temperature=0))
        waiting = engine.submit([4], SamplingParams(max_tokens=150, temperature=0))
        engine.abort_all("drain over")
        for handle in (running, waiting):
            result = handle.result()
            assert result.finish_reason == "error" and result.error == "drain over"
        assert engine.generate([5], SamplingParams(max_tokens=3, temperature=0)).finish_reason == "length"
    finally:
        engine.shutdown()


def test_logprobs_are_the_raw_rows_log_softmax_and_prompt_is_scored():
    engine, _ = toy_engine()
    try:
        params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=True)
        handle = engine.submit([9, 1, 2], params)
        events = list(handle)
        entries = [entry for event in events for entry in event.logprobs]
        assert [e.token_id for e in entries] == expected_tokens([9, 1, 2], 3)
        for entry in entries:  # greedy: the sampled token is the most likely one
            assert len(entry.top) == 2 and entry.top[0] == (entry.token_id, entry.logprob) and entry.logprob <= 0
        assert [e.token_id for e in handle.prompt_logprobs] == [1, 2]
    finally:
        engine.shutdown()


# ---- the per-request logits hook (a grammar's) and max_tokens 0 ---------------------------------------------------

class OnlyToken:
    """A processor allowing one token id; records what the engine says was sampled."""

    def __init__(self, token_id: int):
        self.token_id, self.accepted = token_id, []

    def process(self, logits):
        allowed = np.full_like(logits, -np.inf)
        allowed[self.token_id] = logits[self.token_id]
        return allowed

    def accept_token(self, token_id: int) -> None:
        self.accepted.append(token_id)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_request_processors_mask_before_sampling_and_see_each_token(temperature):
    engine, _ = toy_engine()
    try:
        forced = OnlyToken(4)
        constrained = engine.submit([3, 4, 5], SamplingParams(max_tokens=5, temperature=temperature, seed=0),
                                    processors=[forced])
        unconstrained = engine.submit([3, 4, 5], SamplingParams(max_tokens=5, temperature=0))
        assert list(constrained.result().token_ids) == [4] * 5 == forced.accepted
        assert list(unconstrained.result().token_ids) == expected_tokens([3, 4, 5], 5)  # its neighbour is untouched
    finally:
        engine.shutdown()


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing():
    engine, _ = toy_engine()
    try:
        handle = engine.submit([3, 4, 5], SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=True))
        done = handle.result()
        assert (done.finish_reason, done.token_ids, done.completion_tokens) == ("length", (), 0)
        assert [entry.token_id for entry in handle.prompt_logprobs] == [4, 5]
    finally:
        engine.shutdown()


def test_export_whose_graph_returns_the_grown_cache_is_refused_with_re_export(tmp_path):
    from paddle_llm.inference.manifest import ExportManifest
    from paddle_llm.inference.runtime import open_export_decoder

    # A manifest written before step_interface existed: its graph returns every layer's grown cache.
    ExportManifest(format="paddle", family="llama", chat_template="llama", dtype="float32", vocab_size=VOCAB,
                   max_context_length=64, eos_token_ids=[EOS], pad_token_id=0, cache=LAYOUT.to_dict(),
                   source={"model_name_or_path": "/ckpt"}).save(str(tmp_path))
    manifest_path = tmp_path / "paddle_llm_export.json"
    fields = json.loads(manifest_path.read_text())
    del fields["step_interface"]
    manifest_path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"older paddle_llm \(step interface 1.*Re-export.*--model_name_or_path /ckpt"):
        open_export_decoder(str(tmp_path))


def test_prefix_cache_blocks_hit_only_under_the_adapter_that_stored_them():
    from paddle_llm.serving.prefix_cache import BLOCK_TOKENS, PrefixCache

    cache = PrefixCache(max_tokens=4 * BLOCK_TOKENS)
    prompt = list(range(1, 2 * BLOCK_TOKENS + 2))
    for _, link in cache.missing_blocks(prompt, (1, 1)):
        cache.store(link, [np.zeros((BLOCK_TOKENS, 1, 1))])
    assert len(cache.lookup(prompt, (1, 1))) == 2
    # The base, another adapter, and the same slot after a reload each see their own (empty) cache.
    assert [cache.lookup(prompt, key) for key in ((0, 0), (2, 1), (1, 2))] == [[], [], []]
    assert len(cache.missing_blocks(prompt, (2, 1))) == 2


def test_prefix_cache_hash_collision_is_a_miss_and_lru_bounds_it():
    from paddle_llm.serving.prefix_cache import BLOCK_TOKENS, PrefixCache

    cache = PrefixCache(max_tokens=2 * BLOCK_TOKENS)
    first, other = list(range(1, 2 * BLOCK_TOKENS + 2)), list(range(100, 100 + 2 * BLOCK_TOKENS + 1))
    for _, link in cache.missing_blocks(first):
        cache.store(link, [np.zeros((BLOCK_TOKENS, 1, 1))])
    assert len(cache.lookup(first)) == 2
    # Another prompt whose first key collides with a stored block (simulated): its tokens differ, so it misses.
    other_key = cache._chain(other, 1)[0][0]
    cache._blocks[other_key] = cache._blocks[cache._chain(first, 1)[0][0]]
    assert cache.lookup(other) == []
    assert len(cache._blocks) <= 3
    cache.store((1, 0, (1,)), [np.zeros((BLOCK_TOKENS, 1, 1))])
    assert len(cache._blocks) == 2  # the least recently used went


def _resident_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_growing_a_many_slot_cache_for_one_row_takes_memory_for_that_row_only():
    # Each growth allocates the whole cache. With np.zeros, glibc serves those sizes from its heap once a cache
    # array was freed (its mmap threshold rises to the freed size) and memsets all of it: every idle slot cost time
    # and memory at each growth (21% of one request's decoding time on a 64-slot cache, issue 25).
    from paddle_llm.inference.runtime import StepDecoder

    layout = CacheLayout(num_layers=2, num_kv_heads=8, head_dim=64, batch_axis=0, seq_axis=1, head_axis=2)
    decoder = StepDecoder(ToyRunner(), layout, "float32", glm_positions=False, slots=64, max_columns=2048)
    row = [np.ones((16, 8, 64), dtype="float32")] * 4
    for start in range(0, 224, 16):  # a first request: its cache grows to 7 blocks, 4 arrays of 64 slots (29 MB each)
        decoder.write_row_cache(0, start, row)
    decoder.shrink([])  # it finished
    before = _resident_bytes()
    for start in range(0, 224, 16):  # the next one, as long
        decoder.write_row_cache(0, start, row)
    grown = _resident_bytes() - before
    assert decoder.capacity == 224
    assert decoder.row_cache(0, 0, 224)[0].min() == 1.0
    assert grown < 40 * 2**20, f"{grown / 2**20:.0f} MB resident for one row of 4 x 0.5 MB"


def test_a_cache_growing_again_after_shrinking_reuses_its_memory(monkeypatch):
    # Fresh memory costs a page fault per 4 KiB written (110 ms per 100 MB on a VM without huge pages, against 10 ms
    # into memory touched before), so reallocations alternate between two sets of mappings instead of new ones.
    from paddle_llm.inference import runtime

    fresh = []
    real_mapping = runtime.anonymous_mapping
    monkeypatch.setattr(runtime, "anonymous_mapping", lambda size: fresh.append(size) or real_mapping(size))
    layout = CacheLayout(num_layers=1, num_kv_heads=2, head_dim=4, batch_axis=0, seq_axis=2, head_axis=1)
    decoder = runtime.StepDecoder(ToyRunner(), layout, "float32", glm_positions=False, slots=4, max_columns=512)

    def columns(count, value):
        return [np.full((count, 2, 4), value, dtype="float32")] * 2

    for slot, length in enumerate((60, 100, 120, 140)):
        decoder.write_row_cache(slot, 0, columns(length, slot + 1))  # capacity grows to 160
    decoder.shrink([0])  # the longer rows finish
    assert decoder.capacity == 96
    allocated = len(fresh)
    for slot in (1, 2):  # new requests as long as the ones before
        decoder.clear(slot)
        decoder.write_row_cache(slot, 0, columns(150, 10 + slot))
    assert decoder.capacity == 160
    assert len(fresh) == allocated, "growing back took fresh memory"
    for slot, length, value in ((0, 60, 1), (1, 150, 11), (2, 150, 12)):
        assert all((cache == value).all() for cache in decoder.row_cache(slot, 0, length))
    decoder.shrink([])
    assert decoder._spare_mappings == []  # idle: the spare set is given back
