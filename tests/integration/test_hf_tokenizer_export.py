"""`export --format hf` writes a tokenizer.json that gives our ids (issue 23): transformers' own conversion of a
SentencePiece model drops its NFKC normaliser and whitespace rules, so full-width punctuation, tabs, newlines and
runs of spaces got other ids than training used."""

import functools
import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddle_llm.data.tokenizer import train_tokenizer
from paddle_llm.models.registry import SHIPPED_TOKENIZER_DIR, load_tokenizer
from paddle_llm.models.sentencepiece_json import sentencepiece_tokenizer
from tests.conftest import DEMO_CORPUS, ROOT, run_script, subprocess_env, write_chinese_corpus

TEXTS = [
    "你好，世界！这是一个测试。",  # full-width CJK punctuation (NFKC makes it half-width)
    "你好,世界!这是一个测试.",  # the same, half-width
    "「引号」《书名》——破折号…省略号、顿号；分号：冒号？",
    "ＡＢＣ１２３ｆｕｌｌ　ｗｉｄｔｈ",  # full-width Latin, digits, ideographic space
    "emoji 😀🎉👩‍👩‍👧 here",
    "罕见字：龘靐齉爨",  # rare characters: byte fallback
    "Ω≈ç√∫˜µ≤≥÷ ß İ ﬁ ①②③",
    "Hello   world    with  runs",
    "\tTabbed\tline\t",
    "line one\nline two\n\nthree\r\nfour",
    "   leading and trailing   ",
    "x  \t  y \n z",
    "\u00a0no-break\u3000ideographic\u2003em space",
    "mixed 中文 English カタカナ 한국어 العربية",
    "数字 12345 and 3.14159",
    " ",
    "a",
    "hi<sop>there, a [MASK] b,  <eop>  end",  # user-defined symbols, matched inside the normalised text
]
# Characters the examples are drawn from: each kind the normaliser, the whitespace rules or byte fallback treats
# in its own way.
ALPHABET = ("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好"
            "，。！？；：、「」《》（）【】—…·＂＇ＡＢＣａｂｃ１２３　,.!?;:()[]\"'-abcXYZ0123456789 \t\n\r\u00a0\u2003"
            "😀🎉👍龘靐齉爨鬱カタカナ한국ßİﬁ①Ω")


def _our_ids(tokenizer) -> list[list[int]]:
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in TEXTS]


def _our_text(tokenizer, ids) -> str:
    """SentencePiece's decoding: PaddleNLP's decode also drops spaces before punctuation unless told not to."""
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(tmp_path_factory) -> dict[str, str]:
    """name -> tokenizer directory: the shipped demo tokenizer and ones `tokenizer train` makes, bpe and unigram,
    on English and on Chinese text."""
    root = tmp_path_factory.mktemp("tokenizers")
    chinese = write_chinese_corpus(str(root / "zh.jsonl"))
    directories = {"shipped": SHIPPED_TOKENIZER_DIR}
    for model_type in ("bpe", "unigram"):
        directories[f"en-{model_type}"] = str(root / f"en-{model_type}")
        train_tokenizer(DEMO_CORPUS, directories[f"en-{model_type}"], vocab_size=600, model_type=model_type)
        directories[f"zh-{model_type}"] = str(root / f"zh-{model_type}")
        train_tokenizer(chinese, directories[f"zh-{model_type}"], vocab_size=3000, model_type=model_type)
    return directories


def test_tokenizer_json_from_the_sentencepiece_proto_gives_our_ids_and_text(sentencepiece_tokenizers):
    for name, directory in sentencepiece_tokenizers.items():
        ours, rebuilt = _loaded(directory), _rebuilt(directory)
        for text, ids in zip(TEXTS, _our_ids(ours)):
            assert rebuilt.encode(text).ids == ids, (name, text)
            assert rebuilt.decode(ids) == _our_text(ours, ids), (name, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_drawn_texts_get_our_ids(sentencepiece_tokenizers, text):
    for name in ("shipped", "zh-bpe", "zh-unigram"):
        directory = sentencepiece_tokenizers[name]
        ours = _loaded(directory)
        ids = list(ours(text, add_special_tokens=False)["input_ids"])
        rebuilt = _rebuilt(directory)
        assert rebuilt.encode(text).ids == ids, name
        assert rebuilt.decode(ids) == _our_text(ours, ids), name


@functools.lru_cache(maxsize=None)
def _loaded(directory: str):
    return load_tokenizer(directory)


@functools.lru_cache(maxsize=None)
def _rebuilt(directory: str):
    """The tokenizer as its tokenizer.json loads: ``tokenizers`` normalises added tokens' text only on loading."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(sentencepiece_tokenizer(os.path.join(directory, "tokenizer.model"), None, None).to_str())


def _save_models(presets: dict[str, tuple[str, str]], root) -> dict[str, str]:
    """Tiny models saved with a tokenizer each: name -> (preset, tokenizer directory) becomes name -> model directory."""
    script = (
        "import sys, paddle\n"
        "from paddle_llm.models.registry import resolve_model, build_config, build_model, load_tokenizer\n"
        "paddle.seed(0)\n"
        "for preset, tokenizer_dir, out in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):\n"
        "    source = resolve_model(preset)\n"
        "    build_model(source, build_config(source), load_weights=False).save_pretrained(out)\n"
        "    load_tokenizer(tokenizer_dir).save_pretrained(out)\n"
    )
    models = {name: str(root / f"model-{name}") for name in presets}
    run_script(["-c", script, *[arg for name, (preset, tokenizer) in presets.items() for arg in (preset, tokenizer, models[name])]])
    return models


def _transformers_ids(venv: str, directory: str) -> dict:
    """AutoTokenizer's ids, decoded text and pad token, fast and slow, PreTrainedTokenizerFast's, and transformers
    4's slow LlamaTokenizer's for a directory with tokenizer.model, in the venv's transformers."""
    script = (
        "import json, os, sys, warnings\n"
        "warnings.filterwarnings('ignore')\n"
        "import transformers\n"
        "directory, texts = sys.argv[1], json.loads(sys.argv[2])\n"
        "loaders = {'fast': lambda: transformers.AutoTokenizer.from_pretrained(directory, use_fast=True),\n"
        "           'slow': lambda: transformers.AutoTokenizer.from_pretrained(directory, use_fast=False),\n"
        "           'PreTrainedTokenizerFast': lambda: transformers.PreTrainedTokenizerFast.from_pretrained(directory)}\n"
        "if transformers.__version__.startswith('4.') and os.path.isfile(os.path.join(directory, 'tokenizer.model')):\n"
        "    # transformers 4's SentencePiece class, which AutoTokenizer no longer picks (tokenizer_class names the fast one)\n"
        "    loaders['LlamaTokenizer'] = lambda: transformers.LlamaTokenizer.from_pretrained(directory)\n"
        "result = {}\n"
        "for kind, load in loaders.items():\n"
        "    tok = load()\n"
        "    ids = [tok(t, add_special_tokens=False)['input_ids'] for t in texts]\n"
        "    result[kind] = {'ids': ids, 'text': [tok.decode(i) for i in ids], 'pad': tok.pad_token}\n"
        "print(json.dumps(result))\n"
    )
    result = subprocess.run([os.path.join(venv, "bin", "python"), "-c", script, directory, json.dumps(TEXTS)],
                            capture_output=True, text=True, timeout=300, env={**subprocess_env(), "PYTHONPATH": ""}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_hf_export_tokenizer_gives_our_ids_in_tokenizers_and_transformers(sentencepiece_tokenizers, tmp_path):
    """Each SentencePiece tokenizer, and an HF fixture's tokenizer.json re-exported unchanged: the exported
    tokenizer.json (plain `tokenizers`, no torch) and, where the venvs exist, transformers 4 and 5's AutoTokenizer
    give our ids and our decoded text, with config.json's pad token."""
    from tokenizers import Tokenizer

    presets = {name: ("tiny-llama", sentencepiece_tokenizers[name]) for name in ("shipped", "en-unigram", "zh-bpe", "zh-unigram")}
    presets["qwen2-shipped"] = ("tiny-qwen2", sentencepiece_tokenizers["shipped"])
    models = _save_models(presets, tmp_path)
    for fixture in ("llama2", "llama3", "qwen2"):  # llama2 ships tokenizer.model, the others tokenizer.json
        models[f"hf-{fixture}"] = os.path.join(ROOT, "tests", "assets", "hf", fixture)
    venvs = [venv for venv in ("/work/torchvenv", "/work/torchvenv5") if os.path.isfile(os.path.join(venv, "bin", "python"))]
    for name, model_dir in models.items():
        exported = str(tmp_path / f"hf-{name}")
        export = run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", model_dir, "--output_path", exported])
        # transformers 5 forces Qwen2Tokenizer on model_type qwen2 (a byte-level BPE): export says so, and what works
        forced_class = name == "qwen2-shipped"
        assert ("PreTrainedTokenizerFast.from_pretrained" in export.stderr + export.stdout) == forced_class, name
        ours = load_tokenizer(model_dir)
        ids = _our_ids(ours)
        texts = [_our_text(ours, i) for i in ids]
        files = set(os.listdir(exported))
        assert "tokenizer.json" in files, (name, files)
        if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            with open(os.path.join(model_dir, "tokenizer.json"), "rb") as f, open(os.path.join(exported, "tokenizer.json"), "rb") as g:
                assert f.read() == g.read(), "an HF tokenizer.json is re-exported byte for byte"
        else:
            assert "tokenizer.model" in files, (name, files)  # for the slow class
        exported_json = Tokenizer.from_file(os.path.join(exported, "tokenizer.json"))
        assert [exported_json.encode(t, add_special_tokens=False).ids for t in TEXTS] == ids, name
        assert [exported_json.decode(i) for i in ids] == texts, name
        with open(os.path.join(exported, "config.json")) as f:
            pad_id = json.load(f)["pad_token_id"]
        pad = ours.convert_ids_to_tokens(pad_id)
        for file_name in ("tokenizer_config.json", "special_tokens_map.json"):
            with open(os.path.join(exported, file_name)) as f:
                assert json.load(f)["pad_token"] == pad, (name, file_name)
        for venv in venvs:
            for kind, result in _transformers_ids(venv, exported).items():
                if forced_class and venv.endswith("5") and kind in ("fast", "slow"):
                    continue
                assert result["ids"] == ids, (venv, kind, name)
                assert result["text"] == texts, (venv, kind, name)
                assert result["pad"] == pad, (venv, kind, name)
    if not venvs:
        pytest.skip("tokenizers checked; /work/torchvenv and /work/torchvenv5 (transformers 4 and 5) absent, so AutoTokenizer was not")
