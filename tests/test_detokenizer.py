"""Tests for mlx_serving.engine.detokenizer.IncrementalDetokenizer.

Uses two real tokenizers trained offline on Python stdlib sources: a byte-level BPE
(GPT-2 / Llama 3 / Qwen style) and a SentencePiece-style BPE with a Metaspace
pre-tokenizer and byte fallback (Llama 2 / Mistral style). Neither has merges for
emoji or CJK, so those characters are split into byte tokens.
"""

from __future__ import annotations

import functools
import json
import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlx_serving.engine.detokenizer import IncrementalDetokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TEXT = "Hello wörld! naïve café, 你好世界 🤖🎉 ok\ndef f(x):\n    return  x  # ünïcödé ✓\n"


def _corpus(limit_chars: int = 300_000) -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size >= limit_chars:
            return texts
    return texts


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    # The trainer does not add SentencePiece's <0xNN> byte pieces; byte fallback needs them.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def tokenizers_by_name(tmp_path_factory) -> dict[str, PreTrainedTokenizerFast]:
    """Both tokenizers, saved to tokenizer.json and loaded back as transformers would."""
    loaded = {}
    for name, build in {"byte_level": _byte_level, "metaspace": _metaspace}.items():
        path = str(tmp_path_factory.mktemp(name) / "tokenizer.json")
        build().save(path)
        loaded[name] = PreTrainedTokenizerFast(
            tokenizer_file=path,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            clean_up_tokenization_spaces=False,
        )
    return loaded


@pytest.fixture(params=["byte_level", "metaspace"])
def hf_tokenizer(request, tokenizers_by_name) -> PreTrainedTokenizerFast:
    return tokenizers_by_name[request.param]


def stream(detok: IncrementalDetokenizer, ids, rng: random.Random | None = None) -> list[str]:
    """Feed `ids` one at a time (or in random chunks of 1-4 with `rng`); end with flush()."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4) if rng else 1
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    return [*deltas, detok.flush()]


def is_byte_piece(tokenizer, token_id: int) -> bool:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    return len(piece) == 6 and piece.startswith("<0x")


def split_at(tokenizer, text: str, prompt_text: str) -> tuple[list[int], list[int]]:
    """Encode `text` and split its ids where the decoded prefix is `prompt_text`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    split = next(i for i in range(len(ids)) if tokenizer.decode(ids[:i]) == prompt_text)
    return ids[:split], ids[split:]


def test_text_round_trips_token_by_token(hf_tokenizer):
    ids = hf_tokenizer.encode(TEXT, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(hf_tokenizer), ids)
    assert "".join(deltas) == TEXT == hf_tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    # The test is only meaningful if characters really are split across tokens.
    assert any(hf_tokenizer.decode([i]) == "\ufffd" for i in ids)
    assert any("🤖" in d for d in deltas) and any("你" in d for d in deltas)


def test_split_character_is_held_until_complete(hf_tokenizer):
    ids = hf_tokenizer.encode("a🤖", add_special_tokens=False)
    detok = IncrementalDetokenizer(hf_tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas[:-1]) == "a" and deltas[-1] == "🤖"

    detok = IncrementalDetokenizer(hf_tokenizer)
    assert "".join(detok.add([i]) for i in ids[:-1]) == "a"
    assert detok.flush() == hf_tokenizer.decode(ids[:-1])[1:]  # incomplete char only at the end
    assert detok.flush() == ""
    assert detok.add([]) == ""


def test_random_ordinary_sequences_match_full_decode(hf_tokenizer):
    """Random pieces, special tokens and byte pieces of whole characters, in random chunks."""
    rng = random.Random(0)
    pieces = [i for i in range(len(hf_tokenizer)) if not is_byte_piece(hf_tokenizer, i)]
    chars = [hf_tokenizer.encode(c, add_special_tokens=False) for c in "éü✓你好世界🤖🎉ß€"]

    def random_ids(max_len: int) -> list[int]:
        ids: list[int] = []
        target = rng.randint(0, max_len)
        while len(ids) < target:
            kind = rng.random()
            if kind < 0.1:
                ids.append(rng.choice(hf_tokenizer.all_special_ids))
            elif kind < 0.3:
                ids += rng.choice(chars)
            else:
                ids.append(rng.choice(pieces))
        return ids

    for _ in range(300):
        prompt, generated = random_ids(8), random_ids(40)
        for skip in (True, False):
            decode = functools.partial(hf_tokenizer.decode, skip_special_tokens=skip)
            detok = IncrementalDetokenizer(hf_tokenizer, skip_special_tokens=skip)
            assert "".join(stream(detok, generated, rng)) == decode(generated), generated
            assert detok.token_ids == generated
            # With a prompt: exactly the text the generated ids add after it.
            detok = IncrementalDetokenizer(hf_tokenizer, prompt, skip_special_tokens=skip)
            expected = decode(prompt + generated)[len(decode(prompt)) :]
            assert "".join(stream(detok, generated, rng)) == expected, (prompt, generated)


def test_random_byte_level_sequences_match_full_decode(tokenizers_by_name):
    """Arbitrary ids, including invalid UTF-8 byte sequences, for the byte-level tokenizer.

    (tokenizers' ByteFallback decoder turns a whole run of byte pieces into U+FFFD when
    any byte in it is invalid, which a stream cannot anticipate, so SentencePiece-style
    tokenizers are only held to this for ordinary text, in the test above.)
    """
    hf_tokenizer = tokenizers_by_name["byte_level"]
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(hf_tokenizer)) for _ in range(rng.randint(1, 40))]
        deltas = stream(IncrementalDetokenizer(hf_tokenizer), ids, rng)
        assert "".join(deltas) == hf_tokenizer.decode(ids, skip_special_tokens=True), ids


def test_special_tokens_skipped_or_kept(hf_tokenizer):
    ids = hf_tokenizer.encode("Hi there", add_special_tokens=False) + [hf_tokenizer.eos_token_id]
    skipped = stream(IncrementalDetokenizer(hf_tokenizer), ids)
    assert "".join(skipped) == "Hi there" and skipped[-2:] == ["", ""]
    kept = stream(IncrementalDetokenizer(hf_tokenizer, skip_special_tokens=False), ids)
    assert "".join(kept) == "Hi there</s>" and kept[-2] == "</s>"


def test_skipped_special_token_mid_stream_keeps_next_space(hf_tokenizer):
    # A SentencePiece decode strips the "▁" of its first token, so the window must not
    # restart at a token that produced no text.
    first, rest = split_at(hf_tokenizer, "Hi there", "Hi")
    ids = first + [hf_tokenizer.convert_tokens_to_ids("<|im_end|>")] + rest
    assert "".join(stream(IncrementalDetokenizer(hf_tokenizer), ids)) == "Hi there"
    kept = IncrementalDetokenizer(hf_tokenizer, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "Hi<|im_end|> there"


def test_prompt_context_keeps_leading_space(hf_tokenizer):
    prompt, generated = split_at(hf_tokenizer, "Answer: Hello world", "Answer:")
    with_prompt = "".join(stream(IncrementalDetokenizer(hf_tokenizer, prompt), generated))
    without = "".join(stream(IncrementalDetokenizer(hf_tokenizer), generated))
    assert with_prompt == " Hello world"
    assert without == hf_tokenizer.decode(generated)
    # SentencePiece strips the leading "▁" at the start of a decode; byte-level BPE does not.
    is_spm = hf_tokenizer.convert_ids_to_tokens(generated[0]).startswith("▁")
    assert without == ("Hello world" if is_spm else " Hello world")


def test_prompt_tail_starting_mid_character(hf_tokenizer):
    # The last 5 prompt ids start inside the first emoji; for byte fallback, a context
    # starting there would turn the whole run of byte pieces, "é" included, into U+FFFD.
    prompt, generated = split_at(hf_tokenizer, "x 🤖🤖é!", "x 🤖🤖")
    assert hf_tokenizer.decode(prompt[-5:]).startswith("\ufffd")
    assert "".join(stream(IncrementalDetokenizer(hf_tokenizer, prompt), generated)) == "é!"


def test_mlx_lm_tokenizer_wrapper(hf_tokenizer):
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    wrapper = tokenizer_utils.TokenizerWrapper(hf_tokenizer)
    ids = hf_tokenizer.encode(TEXT, add_special_tokens=False)
    assert "".join(stream(IncrementalDetokenizer(wrapper), ids)) == TEXT
