"""A model's shape and parameter counts without loading it: from a real configuration, a tiny stand-in's dimensions,
a GGUF file's metadata, a local config.json or the hub's (common/training/footprint.py predicts from them)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core import paths

# len(tokenizer) of each tiny.tokenizer (the stand-in's vocabulary; checked in tests/test_plan.py)
TINY_VOCAB = {"smollm2": 49152, "llama-bpe": 128256, "llama-spm": 32000, "qwen2": 151936, "phi-3": 32064}


@dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    decoder_layers: int = 0  # encoder-decoder (T5): decoder layers; `layers` are the encoder's
    source: str = ""


def shape_from(raw: dict, source: str) -> Shape:
    """A transformers-style config dict as a Shape (defaults as transformers' own for the model type)."""
    mt = raw.get("model_type", "llama")
    if mt == "t5":
        return Shape("t5", raw["d_model"], raw["d_ff"], raw["num_layers"], raw["num_heads"], raw["num_heads"],
                     raw["d_kv"], raw.get("vocab_size", 32128), True, decoder_layers=raw.get("num_decoder_layers")
                     or raw["num_layers"], source=source)
    h, heads = raw["hidden_size"], raw["num_attention_heads"]
    vocab = raw.get("vocab_size") or (151936 if mt.startswith("qwen") else 32064 if mt == "phi3" else 32000)
    return Shape(mt, h, raw["intermediate_size"], raw["num_hidden_layers"], heads,
                 raw.get("num_key_value_heads") or heads, raw.get("head_dim") or h // heads, vocab,
                 bool(raw.get("tie_word_embeddings", False)), qkv_bias=mt == "qwen2" or bool(raw.get("attention_bias")),
                 qk_norm=mt == "qwen3", source=source)


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: Path) -> tuple[dict, list[str]]:
    """A GGUF file's key/values (arrays as their length) and tensor names, read straight from its header (gguf's
    GGUFReader decodes every vocabulary string: 10 s for SmolLM2's 49k)."""
    import struct

    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def text() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return text()
            if kind == 9:
                inner, n = read("I"), read("Q")
                if inner == 8:
                    for _ in range(n):
                        f.seek(read("Q"), 1)
                else:
                    f.seek(n * struct.calcsize(_SCALAR[inner]), 1)
                return n
            return read(_SCALAR[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("I")
        n_tensors, n_kv = read("Q"), read("Q")
        kv = {}
        for _ in range(n_kv):
            key = text()
            kv[key] = value(read("I"))
        names = []
        for _ in range(n_tensors):
            names.append(text())
            f.seek(8 * read("I") + 4 + 8, 1)  # dims, type, offset
    return kv, names


def gguf_shape(path: Path) -> dict:
    kv, names = gguf_metadata(path)
    arch = kv["general.architecture"]
    f = {k.split(".", 1)[1]: v for k, v in kv.items() if k.startswith(arch + ".")}
    return {"model_type": arch, "hidden_size": f["embedding_length"], "intermediate_size": f["feed_forward_length"],
            "num_hidden_layers": f["block_count"], "num_attention_heads": f["attention.head_count"],
            "num_key_value_heads": f.get("attention.head_count_kv"), "vocab_size": kv["tokenizer.ggml.tokens"],
            "tie_word_embeddings": "output.weight" not in names}


def shape_of(cfg: Any) -> Shape:
    """The shape the run trains: tiny stand-in, real config, GGUF metadata, local or hub config.json."""
    t, m = cfg.tiny, cfg.model
    if cfg.tiny_mode and t.shape == "full" and t.full_config or not cfg.tiny_mode and t.full_config:
        f = paths.MODEL_CONFIGS_DIR / f"{t.full_config}.json"
        return shape_from(json.loads(f.read_text()), f"common/model/model_configs/{f.name}")
    if cfg.tiny_mode:  # the stand-in as common/model/standins.py builds it (its imports are light)
        from common.model import standins

        like = t.full_config or standins.FAMILY_CONFIG.get(m.family)
        raw = standins.shrink(standins.real_config(like)) if like else {**standins.TINY_LLAMA, "model_type": m.family}
        raw["vocab_size"] = max(raw.get("vocab_size") or 0, TINY_VOCAB[t.tokenizer])
        return shape_from(raw, f"tiny stand-in ({m.family}{', like ' + like if like else ''}, {t.tokenizer} tokenizer)")
    if m.gguf_file:
        from common.model.sources import gguf_dir

        f = gguf_dir(m.name_or_path) / m.gguf_file
        return shape_from(gguf_shape(f), f"{f.name} metadata")
    local = Path(m.name_or_path).expanduser() / "config.json"
    if local.is_file():
        return shape_from(json.loads(local.read_text()), str(local))
    # the hub's config.json (a few KB), when reachable
    from huggingface_hub import hf_hub_download

    got = hf_hub_download(m.name_or_path, "config.json", revision=m.revision)
    return shape_from(json.loads(Path(got).read_text()), f"hub: {m.name_or_path}/config.json")


def linears(s: Shape) -> list[tuple[str, int, int]]:
    """(module name, in, out) of every linear layer of one block, as PEFT names them (T5: per encoder block; the
    decoder blocks add the cross-attention, see parameters)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if s.model_type == "t5":
        return [("q", s.hidden, q), ("k", s.hidden, q), ("v", s.hidden, q), ("o", q, s.hidden),
                ("wi_0", s.hidden, s.inter), ("wi_1", s.hidden, s.inter), ("wo", s.inter, s.hidden)]
    if s.model_type == "phi3":
        return [("qkv_proj", s.hidden, q + 2 * kv), ("o_proj", q, s.hidden), ("gate_up_proj", s.hidden, 2 * s.inter),
                ("down_proj", s.inter, s.hidden)]
    return [("q_proj", s.hidden, q), ("k_proj", s.hidden, kv), ("v_proj", s.hidden, kv), ("o_proj", q, s.hidden),
            ("gate_proj", s.hidden, s.inter), ("up_proj", s.hidden, s.inter), ("down_proj", s.inter, s.hidden)]


def all_linears(s: Shape) -> list[tuple[str, int, int]]:
    one = linears(s)
    if s.model_type != "t5":
        return one * s.layers
    return one * s.layers + (one + one[:4]) * s.decoder_layers  # decoder: self-attention + cross-attention + FF


def parameters(s: Shape) -> dict:
    """Parameter counts: linear (quantizable), embed, head (0 when tied), other (norms, biases, rel. position)."""
    lin = sum(i * o for _, i, o in all_linears(s))
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if s.model_type == "t5":
        other = s.hidden * (2 * s.layers + 3 * s.decoder_layers + 2) + 2 * 32 * s.heads
    else:
        other = s.layers * (2 * s.hidden + (q + 2 * kv if s.qkv_bias else 0) + (2 * s.head_dim if s.qk_norm else 0))
        other += s.hidden
    embed = s.vocab * s.hidden
    return {"linear": lin, "embed": embed, "head": 0 if s.tied else embed, "other": other,
            "total": lin + embed + (0 if s.tied else embed) + other}


def targeted(s: Shape, targets: Any) -> list[tuple[str, int, int]]:
    if targets == "all-linear":
        return all_linears(s)
    names = [targets] if isinstance(targets, str) else list(targets)
    return [x for x in all_linears(s) if x[0] in names]
