"""Random-weight MLX language models with a locally trained tokenizer.

``make_model`` writes a folder that plain ``mlx_lm.load`` accepts: ``config.json``,
safetensors weights written by mlx-lm itself, and a byte-level BPE tokenizer with
a ChatML template. Nothing is downloaded, and the same arguments give
byte-identical files, so tests, benchmarks and the demo can build what they need.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
import mlx.core as mx
from mlx.utils import tree_map_with_path
from mlx_lm.utils import quantize_model, save_config, save_model

from mlx_serving.engine.tokenizer_gen import (EOS_TOKENS, SPECIAL_TOKENS, non_text_ids, save_tokenizer,
                                              train_tokenizer)

ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")

# Every size pins all dimensions, the vocabulary included, for every arch.
# 1b and 8b follow Llama-3.2-1B and Llama-3.1-8B.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1536, vocab_size=8192, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}

_ARCH_FIELDS = {
    "llama": dict(architectures=["LlamaForCausalLM"], rope_theta=500000.0, rms_norm_eps=1e-5,
                  attention_bias=False, mlp_bias=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0, rms_norm_eps=1e-6,
                  use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0, rms_norm_eps=1e-6,
                  attention_bias=False, use_sliding_window=False),
}

MAX_POSITION_EMBEDDINGS = 131072
QUANT_GROUP_SIZE = 64
MARKER = "mlx_serving_model.json"
# Bump when the generated files change, so ensure_model rebuilds cached folders.
GENERATOR_VERSION = 1

# Weight scaling, see _init_weights.
QK_GAIN = 4.0
LOGIT_STD = 2.0
RARE_ROW_SCALE = 0.5


def model_config(arch: str = "llama", size: str = "tiny", dtype: str = "float32") -> dict:
    """The ``config.json`` contents (before quantization) for an arch and size."""
    if arch not in ARCHS or size not in SIZES or dtype not in DTYPES:
        raise ValueError(f"unknown arch/size/dtype {arch!r}/{size!r}/{dtype!r}; "
                         f"choose from {ARCHS}, {tuple(SIZES)}, {DTYPES}")
    dims = SIZES[size]
    config = dict(model_type=arch, **_ARCH_FIELDS[arch], **dims, hidden_act="silu",
                  head_dim=dims["hidden_size"] // dims["num_attention_heads"],
                  max_position_embeddings=MAX_POSITION_EMBEDDINGS, torch_dtype=dtype,
                  bos_token_id=None, eos_token_id=[SPECIAL_TOKENS.index(t) for t in EOS_TOKENS])
    if arch == "qwen2":  # Qwen2 derives head_dim itself and has no such field.
        del config["head_dim"]
    return config


def _init_weights(model, config: dict, rare_ids: list[int], dtype: mx.Dtype) -> None:
    """Re-draw the weights so that greedy decoding gives varied text.

    mlx's default init makes a tied-embedding model echo its input (the logit of
    the current token is ~|e|^2) and its attention is near-uniform, so greedy
    output repeats one token. Instead:

    - every matrix is N(0, 1/fan_in) and embedding rows are N(0, 1), so the
      embedding and each residual branch add O(1) per coordinate;
    - queries and keys get a gain of QK_GAIN (through q/k_norm for qwen3, whose
      norms undo any scale of the projections): attention logits have std
      QK_GAIN^2 = 16, so heads pick a few context- and position-dependent tokens
      instead of averaging, and the model acts like a random high-order n-gram
      model, whose greedy paths do not fall into short cycles;
    - the final norm gain is random +-LOGIT_STD/sqrt(hidden): random signs
      decorrelate the tied output head from the input embedding (no echo), and
      logits get std ~LOGIT_STD, so sampling at temperature 1 is not greedy;
    - ``rare_ids`` rows (special tokens such as EOS, and lone bytes of multi-byte
      characters, which decode to U+FFFD) are scaled by RARE_ROW_SCALE: their
      logits spread half as far, so they are rarely chosen, yet never impossible.
    """
    row_scale = mx.ones((config["vocab_size"], 1))
    row_scale[mx.array(rare_ids)] = RARE_ROW_SCALE
    final_gain = LOGIT_STD / math.sqrt(config["hidden_size"])
    qk = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias", "q_norm.weight", "k_norm.weight")

    def draw(path: str, w: mx.array) -> mx.array:
        if path.endswith(("embed_tokens.weight", "lm_head.weight")):
            w = mx.random.normal(w.shape) * row_scale
        elif path == "model.norm.weight":
            w = mx.where(mx.random.bernoulli(shape=w.shape), final_gain, -final_gain)
        else:
            gain = QK_GAIN if path.endswith(qk) else 1.0
            # Vectors (norm gains, biases) keep mlx's init, times the q/k gain.
            w = mx.random.normal(w.shape) * (gain / math.sqrt(w.shape[1])) if w.ndim == 2 else w * gain
        return w.astype(dtype)

    model.update(tree_map_with_path(draw, model.parameters()))


def make_model(path: str | Path, *, arch: str = "llama", size: str = "tiny", dtype: str = "float32",
               quantize: int | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random-weight MLX model folder that ``mlx_lm.load`` accepts; return its path.

    ``quantize`` (4 or 8 bits, group size 64) quantizes like ``mlx_lm.convert -q``.
    The folder is built beside ``path`` and renamed into place, so ``path`` never
    holds a half-written model. An existing non-empty ``path`` is replaced only
    with ``overwrite=True``, and only if it was made by this module.
    """
    path = Path(path)
    config = model_config(arch, size, dtype)
    if quantize not in (None, 4, 8):
        raise ValueError(f"quantize must be None, 4 or 8, not {quantize!r}")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if _read_marker(path) is None:
            raise FileExistsError(f"refusing to replace {path}: it was not made by modelgen")
    marker = _marker(arch=arch, size=size, dtype=dtype, quantize=quantize, seed=seed)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        _write(tmp, config, dtype=dtype, quantize=quantize, seed=seed)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def ensure_model(path: str | Path, **kwargs) -> Path:
    """Return ``path``, first running ``make_model(path, **kwargs)`` if needed.

    A folder with ``config.json`` is kept as is, unless modelgen made it with other
    arguments (or an older generator version): then it is rebuilt. Folders from
    elsewhere are never touched.
    """
    path = Path(path)
    if (path / "config.json").exists():
        found = _read_marker(path)
        if found is None or found == _marker(**kwargs):
            return path
    return make_model(path, overwrite=True, **kwargs)


def _marker(**kwargs) -> dict:
    """What the marker file records: the generator version and every make_model argument."""
    params = inspect.signature(make_model).parameters
    args = {name: p.default for name, p in params.items() if p.kind is p.KEYWORD_ONLY and name != "overwrite"}
    unknown = set(kwargs) - set(args)
    if unknown:
        raise TypeError(f"unexpected make_model arguments: {sorted(unknown)}")
    return {"generator": __name__, "version": GENERATOR_VERSION, **args, **kwargs}


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, config: dict, *, dtype: str, quantize: int | None, seed: int) -> None:
    tokenizer = train_tokenizer(config["vocab_size"])

    mx.random.seed(seed)
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    _init_weights(model, config, non_text_ids(tokenizer), getattr(mx, dtype))
    if quantize:
        model, config = quantize_model(model, config, QUANT_GROUP_SIZE, quantize)

    save_model(path, model, donate_model=True)
    save_config(config, path / "config.json")
    save_tokenizer(tokenizer, path, MAX_POSITION_EMBEDDINGS)
