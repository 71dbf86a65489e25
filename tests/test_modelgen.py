"""The random-weight model generator: loadable by plain mlx-lm, deterministic, varied output."""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlx_serving.engine import tokenizer_gen
from mlx_serving.engine.modelgen import SIZES, ensure_model, make_model

PROMPTS = ["Tell me about continuous batching.", "def fibonacci(n):", "What is 2 + 2?",
           "Write a short poem about the sea"]


def _chat_ids(tokenizer, content: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _greedy(model, tokenizer, content: str, n: int = 64) -> list[int]:
    prompt = mx.array(_chat_ids(tokenizer, content))
    return [int(token) for token, _ in generate_step(prompt, model, max_tokens=n)]


def _check_variety(model, tokenizer, prompts: list[str]) -> None:
    outputs = [_greedy(model, tokenizer, p) for p in prompts]
    for out in outputs:
        assert len(set(out)) >= 16, tokenizer.decode(out)
        assert not set(out) & set(tokenizer.eos_token_ids)
    assert len({tuple(out) for out in outputs}) == len(prompts)


def _digests(path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_tiny_model_loads_with_mlx_lm(tiny_model_path):
    model, tokenizer, config = load(str(tiny_model_path), return_config=True)
    assert config["model_type"] == "llama"
    assert config["max_position_embeddings"] == 131072
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert tokenizer.bos_token is None
    assert not tokenizer.has_tool_calling
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert n_params * 4 < 1_000_000


def test_vocab_size_matches_config(tiny_model_path):
    _, tokenizer, config = load(str(tiny_model_path), return_config=True)
    assert config["vocab_size"] == SIZES["tiny"]["vocab_size"] == len(tokenizer.get_vocab())
    assert all(tokenizer.convert_ids_to_tokens(i) is not None for i in range(config["vocab_size"]))


def test_short_text_fills_vocab_with_reserved_tokens(monkeypatch):
    monkeypatch.setattr(tokenizer_gen, "TEXT_CHARS_PER_TOKEN", 2)
    tokenizer = tokenizer_gen.train_tokenizer(2048)
    assert tokenizer.get_vocab_size() == 2048
    assert tokenizer.id_to_token(2047).startswith("<|reserved_special_token_")


def test_chat_template(tiny_model_path):
    _, tokenizer = load(str(tiny_model_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == prompt


def test_same_arguments_give_identical_files(tmp_path):
    first = make_model(tmp_path / "a", arch="qwen3", seed=7)
    second = make_model(tmp_path / "b", arch="qwen3", seed=7)
    other = make_model(tmp_path / "c", arch="qwen3", seed=8)
    assert _digests(first) == _digests(second)
    assert _digests(first)["model.safetensors"] != _digests(other)["model.safetensors"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_greedy_output_is_varied(tmp_path, arch):
    model, tokenizer = load(str(make_model(tmp_path / arch, arch=arch)))
    _check_variety(model, tokenizer, PROMPTS)


def test_small_greedy_output_is_varied(small_model_path):
    model, tokenizer = load(str(small_model_path))
    _check_variety(model, tokenizer, PROMPTS[:3])


def test_quantized_4bit_loads_and_generates(tmp_path):
    path = make_model(tmp_path / "q4", quantize=4)
    model, tokenizer, config = load(str(path), return_config=True)
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert len(_greedy(model, tokenizer, PROMPTS[0], n=16)) == 16


def test_bfloat16_loads(tmp_path):
    path = make_model(tmp_path / "bf16", arch="qwen2", dtype="bfloat16")
    model, tokenizer, config = load(str(path), return_config=True)
    assert config["torch_dtype"] == "bfloat16"
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    assert len(_greedy(model, tokenizer, PROMPTS[0], n=16)) == 16


def test_ensure_model_reuses_rebuilds_and_leaves_foreign_folders(tmp_path):
    path = ensure_model(tmp_path / "m", seed=1)
    before = _digests(path)
    (path / "tokenizer.json").touch()
    mtime = (path / "tokenizer.json").stat().st_mtime_ns
    assert ensure_model(path, seed=1) == path
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    ensure_model(path, seed=2)
    assert json.loads((path / "mlx_serving_model.json").read_text())["seed"] == 2
    assert _digests(path)["model.safetensors"] != before["model.safetensors"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert ensure_model(foreign, seed=3) == foreign
    assert (foreign / "config.json").read_text() == "{}"
    with pytest.raises(FileExistsError):
        make_model(foreign, overwrite=True)
    with pytest.raises(FileExistsError):
        make_model(path)
