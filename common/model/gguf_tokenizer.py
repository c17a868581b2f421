"""The tokenizer inside a GGUF file: what llama.cpp needs written (tokens and their types, scores, merges, special
ids, the pre-tokenizer's name) from a tokenizer.json; llama.cpp itself reads them back (common/shipping/llamacpp.py).

Both tokenizer kinds are converted from tokenizer.json: a byte-level BPE one (GPT-2 style: SmolLM2, Llama-3) with
its merges; a SentencePiece one (Llama-2, TinyLlama, Mistral-7B-v0.2: BPE with byte fallback) as llama.cpp's
"llama" tokenizer, each token scored by the rank of the first merge that makes it (llama.cpp merges the
highest-scored pair first, so the order of the merges is kept), byte tokens typed BYTE. Anything else stops with one
line saying so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from common.core.io import UserError
from common.data import prompts


class Unsupported(UserError):
    """The model or tokenizer cannot be written as GGUF by this exporter."""


def as_llama_cpp_applies_it(tok: Any) -> Any:
    """The tokenizer, with a SentencePiece one made to put "▁" after every special token as its tokenizer.json and
    llama.cpp/Ollama do. transformers 5 rebuilds a SentencePiece LlamaTokenizer (legacy=false: TinyLlama, Mistral)
    with "▁" before the first piece of a text only, so a chat prompt such as zephyr's `</s>\n<|assistant|>\n` would
    be trained and evaluated as [2, 13, ...] but served by llama.cpp as [2, 29871, 13, ...]. Re-wrapped as a plain
    fast tokenizer, so a save and a reload keep it. Any other tokenizer is returned as it is."""
    backend = tok.backend_tokenizer if getattr(tok, "is_fast", False) else None
    pre = backend.pre_tokenizer if backend is not None else None
    if type(pre).__name__ != "Metaspace" or pre.prepend_scheme != "first":
        return tok
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   unk_token=tok.unk_token, pad_token=tok.pad_token, chat_template=tok.chat_template)


# The pre-tokenizer llama.cpp must apply before BPE, identified by what tokenizer.json does (canonical llama.cpp
# names). A regex Split is matched against the splits transformers knows for GGUF files.
_PREFERRED_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


def pre_tokenizer_name(tokenizer_json: dict, override: str | None = None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (tokenizer.ggml.pre)."""
    if override:
        return override
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    split = next((p for p in parts if p.get("type") == "Split"), None)
    if split:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )

        pattern = split.get("pattern", {}).get("Regex")
        names = [n for n, rx in GGUF_PRE_TOKENIZER_SPLITS.items() if rx == pattern]
        if names:
            return next((n for n in _PREFERRED_PRE if n in names), names[0])
    raise Unsupported(f"cannot tell llama.cpp's pre-tokenizer for this tokenizer ({kinds}); set export.pre_tokenizer "
                      "to llama.cpp's name for it (see tokenizer.ggml.pre in a GGUF of the base model)")


def tokenizer_metadata(tok: Any, folder: Path, vocab_size: int, pre_override: str | None = None) -> dict:
    """Everything a GGUF says about the tokenizer, from the saved tokenizer in `folder` and the loaded `tok`."""
    tj_file = folder / "tokenizer.json"
    if not tj_file.exists():
        raise Unsupported(f"{folder} has no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    tj = json.loads(tj_file.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if not tok.chat_template:
        raise Unsupported(f"the tokenizer in {folder} has no chat template; set prompt.template")
    conf_file = folder / "config.json"
    conf = json.loads(conf_file.read_text(encoding="utf-8")) if conf_file.is_file() else {}
    meta: dict[str, Any] = {"chat_template": tok.chat_template, "add_bos": prompts.adds_bos(tok), "add_eos": False,
                            "ids": special_ids(tok, conf, vocab_size)}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("type") == "BPE" and not model.get("byte_fallback") and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        meta.update(model="gpt2", pre=pre_tokenizer_name(tj, pre_override), **_bpe_vocab(tok, vocab_size),
                    merges=merges)
        return meta
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        meta.update(model="llama", pre="default", add_space_prefix=space_prefix(tj),
                    **_spm_vocab(tok, merges, vocab_size, phi3=conf.get("model_type") == "phi3"))
        return meta
    raise Unsupported(f"GGUF export supports byte-level BPE tokenizers and SentencePiece ones (BPE with byte "
                      f"fallback) in tokenizer.json; {folder} has {model.get('type')}")


def special_ids(tok: Any, conf: dict, vocab_size: int) -> dict:
    """BOS/EOS/unknown/pad ids as llama.cpp's converter (gguf-py's SpecialVocab) finds them: the tokenizer's, then
    config.json's `<kind>_token_id` for a kind the tokenizer leaves unset (Qwen has no BOS token but its config
    says 151643, <|endoftext|>; with no id at all llama.cpp would take token 11, `,`, as BOS)."""
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    for k, v in ids.items():
        given = conf.get(f"{k}_token_id")
        if v is None and isinstance(given, int) and 0 <= given < vocab_size:
            ids[k] = given
    return ids


def looks_special(token: str) -> bool:
    """llama.cpp's converter's does_token_look_special: an added token it writes CONTROL even when the tokenizer
    does not call it special (Qwen's <|fim_prefix|>, <|repo_name|>, <|file_sep|> ...)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def space_prefix(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece tokenizer puts "▁" in front of its text (llama.cpp's add_space_prefix). llama.cpp
    does it before the text and after every special token, as the Prepend normalizer of Llama-2/TinyLlama's
    tokenizer.json does; transformers 5's LlamaTokenizer with legacy=false (a Metaspace that prepends to the first
    piece only) tokenizes chat prompts differently after each special token (`</s>`, `<s>`), so it is refused."""
    def parts(d: dict | None, key: str) -> list[dict]:
        d = d or {}
        return d.get(key, []) if d.get("type") == "Sequence" else [d]

    norms = parts(tokenizer_json.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in norms):
        return True
    pres = parts(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    meta = next((p for p in pres if p.get("type") == "Metaspace"), None)
    scheme = (meta or {}).get("prepend_scheme", "always" if (meta or {}).get("add_prefix_space", True) else "never")
    if meta is None or scheme == "never":
        return False
    if scheme == "first":
        raise Unsupported("this SentencePiece tokenizer puts '\u2581' before the first piece of a text only "
                          "(transformers 5's LlamaTokenizer, legacy=false); llama.cpp/Ollama also put it after every "
                          "special token, so chat prompts would not tokenize as in training: load it with its "
                          "tokenizer.json normalizer")
    return True


def _bpe_vocab(tok: Any, vocab_size: int) -> dict:
    """Tokens in id order with the types llama.cpp's converter gives them (get_vocab_base): added tokens CONTROL when
    special or looking special (looks_special), other added ones USER_DEFINED, ids the tokenizer does not use (the
    embedding is padded) UNUSED placeholders."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            control = added[i].special or looks_special(added[i].content)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return {"tokens": tokens, "token_types": [int(t) for t in types], "scores": None}


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _spm_vocab(tok: Any, merges: list[str], vocab_size: int, phi3: bool = False) -> dict:
    """llama.cpp's SentencePiece vocabulary from a tokenizer.json: tokens in id order; the score of a token made by
    a merge is minus the rank of the first merge that makes it (llama.cpp applies the best-scored pair first, as
    the tokenizer applies the lowest-ranked merge first); types as the converter writes them: the unknown token
    UNKNOWN, added tokens CONTROL when special or looking special, <0xNN> tokens BYTE, other added ones
    USER_DEFINED, unused ids UNUSED. Phi-3's converter (Phi3MiniModel) types every added token by its special
    flag alone, `<unk>` included (CONTROL)."""
    import gguf

    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        first.setdefault(m.replace(" ", "", 1), rank)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if i in added and phi3:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif i == tok.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            control = added[i].special or looks_special(added[i].content)
            kind = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(t):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(kind)
        scores.append(-float(first[t]) if kind == gguf.TokenType.NORMAL and t in first
                      else 0.0 if kind != gguf.TokenType.NORMAL else -float(len(merges) + i))
    return {"tokens": tokens, "scores": scores, "token_types": [int(k) for k in types]}


def bos_post_processor(bos: str, bos_id: int) -> dict:
    """A tokenizers post-processor that puts `bos` in front of each sequence (what Llama-3's tokenizer.json does)."""
    def seq(x: str, type_id: int) -> list[dict]:
        return [{"SpecialToken": {"id": bos, "type_id": type_id}}, {"Sequence": {"id": x, "type_id": type_id}}]

    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


# "▁" before the text and after each special token (llama.cpp's add_space_prefix), spaces -> "▁"
SPM_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path) -> dict[str, tuple[Any, bytes]]:
    """Every metadata key of a GGUF file -> (its value, or None for an array; the value's raw bytes), read from the
    header alone: gguf.GGUFReader's values for the scalar keys, without turning a 128k vocabulary into Python
    objects (12 s for Llama-3's)."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise UserError(f"{path} is not a GGUF file")
        n_kv = struct.unpack_from("<Q", m, 16)[0]
        pos, out = 24, {}

        def string(at: int) -> tuple[str, int]:
            n = struct.unpack_from("<Q", m, at)[0]
            return m[at + 8:at + 8 + n].decode("utf-8"), at + 8 + n

        for _ in range(n_kv):
            key, pos = string(pos)
            kind = struct.unpack_from("<I", m, pos)[0]
            start = pos = pos + 4
            value: Any = None
            if kind == 8:
                value, pos = string(pos)
            elif kind == 9:
                item, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if item == 8:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", m, pos)[0]
                elif item in _SCALAR:
                    pos += count * struct.calcsize(_SCALAR[item])
                else:
                    raise UserError(f"{path}: nested arrays in the metadata ({key}) are not read here")
            else:
                value = struct.unpack_from(_SCALAR[kind], m, pos)[0]
                pos += struct.calcsize(_SCALAR[kind])
            out[key] = (value, m[start:pos])
        return out


def gguf_scalars(path: Path) -> dict:
    """The scalar and string metadata of a GGUF file (arrays left out)."""
    return {k: v for k, (v, _) in gguf_metadata(path).items() if v is not None}
