"""Train a small byte-level BPE tokenizer on local text and save it in HF format.

The training text is the Python standard library's source, so no download is
needed; files are read in sorted order and the BPE trainer is deterministic, so
the same vocabulary size gives the same tokenizer on a given Python install.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
EOS_TOKENS = (IM_END, ENDOFTEXT)

# ChatML. Every tag strips the whitespace before it, so newlines are emitted
# only through string literals.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Enough text for BPE to reach the target vocabulary: ~256k characters for 1k
# tokens, 2M for 8k; 128k tokens takes the whole standard library (~30M).
TEXT_CHARS_PER_TOKEN = 256


def stdlib_sources(max_chars: int) -> Iterator[str]:
    """Yield the stdlib's ``.py`` files (sorted walk, no site-packages) up to ``max_chars``."""
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            text = Path(dirpath, name).read_text(encoding="utf-8", errors="replace")
            yield text
            total += len(text)
            if total >= max_chars:
                return


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` ids.

    Ids 0-2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``. If the text
    runs out of merges first, the remaining ids become
    ``<|reserved_special_token_N|>`` (as in Llama 3) so every id decodes.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stdlib_sources(vocab_size * TEXT_CHARS_PER_TOKEN), trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(missing)])
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


def non_text_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of special tokens and of tokens that are not valid UTF-8 on their own."""
    special = tokenizer.get_added_tokens_decoder()
    texts = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())])
    return [i for i, text in enumerate(texts) if i in special or "\ufffd" in text]


def save_tokenizer(tokenizer: Tokenizer, path: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    tokenizer.save(str(path / "tokenizer.json"))
    special = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "unk_token": None,
        **special,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (path / name).write_text(json.dumps(data, indent=2) + "\n")
