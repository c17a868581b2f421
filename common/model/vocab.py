"""Real tokenizers for the tiny stand-ins: llama.cpp's vocabulary-only files, fetched once and converted to Hugging Face.

llama.cpp's vocabulary-only test files (MIT) with its reference tokenizations (<file>.inp: texts separated by
VOCAB_TEST_SEP, <file>.out: one line of ids per text, tokenized without special tokens), as shipped in the
llama-cpp-python sdist under vendor/llama.cpp/models/: `llama-bpe` (Llama-3 and 3.2's 128k byte-level BPE),
`llama-spm` (the 32k SentencePiece vocabulary of Llama-2, TinyLlama and Mistral-7B-v0.2), `qwen2` (the 151k
byte-level BPE of Qwen2, Qwen2.5 and Qwen3) and `phi-3` (Phi-3/3.5-mini's SentencePiece vocabulary: Llama-2's plus
its chat tokens). Each is converted to a plain Hugging Face tokenizer folder that tokenizes as the real model's
tokenizer.json does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common.core import paths
from common.core.io import UserError, atomic_dir
from common.model import gguf_tokenizer

log = logging.getLogger("ft")

# 0.3.12 is the smallest sdist that has them (49.8 MB; up to 0.2.86 the sdists leave models/ out, the others from
# 0.2.87 to 0.3.36 weigh 50.1-80.5 MB; the files are the same in 0.3.12 and 0.3.36).
VOCAB_PACKAGE, VOCAB_PIN = "llama-cpp-python", "0.3.12"
VOCAB_FILES = {"llama-bpe": "ggml-vocab-llama-bpe.gguf", "llama-spm": "ggml-vocab-llama-spm.gguf",
               "qwen2": "ggml-vocab-qwen2.gguf", "phi-3": "ggml-vocab-phi-3.gguf"}
VOCAB_SHA256 = {"ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
                "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
                "ggml-vocab-qwen2.gguf": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
                "ggml-vocab-phi-3.gguf": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"}
VOCAB_TEST_SEP = "\n__ggml_vocab_test__\n"
SPM = ("llama-spm", "phi-3")  # the SentencePiece ones
# What the real models' tokenizers say where llama.cpp's vocabulary file does not. Pad: Llama-3 has none;
# unsloth/llama-3-8b(-bnb-4bit), the llama3 recipes' base, sets <|reserved_special_token_250|> (a token never
# trained, so padding never looks like the end of an answer). TinyLlama-1.1B-Chat pads with </s>, and
# Mistral-7B-Instruct-v0.2 has none (load_tokenizer then pads with EOS, which is </s> too). Qwen2.5/Qwen3 and
# Phi-3.5-mini pad with <|endoftext|>.
PAD = {"llama-bpe": "<|reserved_special_token_250|>", "llama-spm": "</s>", "qwen2": "<|endoftext|>",
       "phi-3": "<|endoftext|>"}
# Qwen2.5/Qwen3-Instruct end a text on <|im_end|> (their base checkpoints on <|endoftext|>) and have no BOS. Their
# added tokens past <|im_end|> (tokenizer_config.json's added_tokens_decoder: id -> content, special), which
# llama.cpp's older Qwen2 file holds as [PAD] placeholders: vision tokens (special), then tool, FIM and repository
# tokens and Qwen3's <think>/</think> (not special). Qwen2.5's stop at 151664; the ids past Qwen3's 151668 are none.
QWEN_EOS = "<|im_end|>"
QWEN_ADDED = {151646 + i: (t, True) for i, t in enumerate(
    ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
     "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"))}
QWEN_ADDED |= {151657 + i: (t, False) for i, t in enumerate(
    ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
     "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"))}
_PLACEHOLDER = re.compile(r"\[PAD\d+\]")  # llama.cpp's name for an id its source tokenizer does not use
# Phi-3's tokenizer.json strips the whitespace after its chat tokens (rstrip), and llama.cpp does the same for a
# model whose general.name says phi-3/phi3: every special token but these.
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


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
    out = paths.cache_root() / "vocab" / f"{VOCAB_PACKAGE}-{VOCAB_PIN}-{len(VOCAB_FILES)}"
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
        raise UserError(f"could not download {VOCAB_PACKAGE}=={VOCAB_PIN} from PyPI for the stand-ins' tokenizers "
                        f"({why}); offline, set FT_VOCAB_DIR to a folder with {', '.join(VOCAB_FILES.values())} "
                        f"(from its sdist's vendor/llama.cpp/models/)")
    return archives[0]


def extract_vocab(archive: Path, dest: Path) -> None:
    """Copy the vocabulary files and their .inp/.out references out of the sdist, nothing else."""
    wanted = set(_vocab_names())
    with tarfile.open(archive) as tar:
        for m in tar:
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and name in wanted and "/vendor/llama.cpp/models/" in m.name:
                (dest / name).write_bytes(tar.extractfile(m).read())
                wanted.discard(name)
    if wanted:
        raise UserError(f"{archive.name} lacks {', '.join(sorted(wanted))}; the pin {VOCAB_PACKAGE}=={VOCAB_PIN} "
                        "in common/model/vocab.py must name an sdist that ships vendor/llama.cpp/models/")
    _check_sha256(dest, archive.name)


def _check_sha256(folder: Path, where: str) -> None:
    for f, want in VOCAB_SHA256.items():
        got = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        if got != want:
            raise UserError(f"{f} in {where} is not llama.cpp's file of {VOCAB_PACKAGE}=={VOCAB_PIN} (sha256 "
                            f"{got[:12]}, expected {want[:12]}); replace it with that release's file")


def reference_tokenizations(name: str, folder: Path | None = None) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference (text, ids) pairs for the vocabulary `name` (a key of VOCAB_FILES), from `folder`
    (default: vocab_dir())."""
    f = (folder or vocab_dir()) / VOCAB_FILES[name]
    texts = Path(f"{f}.inp").read_text(encoding="utf-8").split(VOCAB_TEST_SEP)
    lines = Path(f"{f}.out").read_text(encoding="utf-8").split("\n")
    pairs = [(t, [int(x) for x in ids.split()]) for t, ids in zip(texts, lines)]
    return pairs[:-1] if pairs and pairs[-1] == ("", []) else pairs  # the file ends with a separator


def llama_tokenizer_dir(name: str) -> Path:
    """A plain Hugging Face tokenizer folder of llama.cpp's vocabulary `name`, converted once.

    transformers' GGUF reader gets the vocabulary, merges and special ids right but not what the real models'
    tokenizer.json files say beyond them, which llama.cpp's reference tokenizations follow; it is set here:
    Llama-3 (llama-bpe): BOS `<|begin_of_text|>` added in front of every text, whole words found in the
    vocabulary taken as one token (ignore_merges), and no extra `<|endoftext|>` token (128,256 tokens, as the
    model's embedding). SentencePiece (llama-spm, phi-3): "▁" put in front of every text and of every piece after a
    special token, a leading space kept as its own "▁" (the Prepend/Replace normalizer of Llama-2/TinyLlama's
    tokenizer.json), `<unk>` the unknown token; Phi-3's chat tokens strip the whitespace after them. Qwen (qwen2):
    no BOS, EOS `<|im_end|>` as the Instruct checkpoints, Qwen3's added tokens (QWEN_ADDED). Phi-3 and Qwen end
    where the real tokenizers do (32,011 and 151,669 tokens; their embeddings have 32,064 and 151,936 rows). And
    each gets the pad of PAD."""
    if name not in VOCAB_FILES:
        raise UserError(f"tiny.tokenizer '{name}' is not one of smollm2, {', '.join(VOCAB_FILES)}")
    src = vocab_dir() / VOCAB_FILES[name]
    key = hashlib.sha1(f"{src.name}:{src.stat().st_size}:v4".encode()).hexdigest()[:10]
    out = paths.cache_root() / "tokenizers" / f"{name}-{key}"
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
        elif name == "qwen2":
            _qwen(tj, conf)
            _drop_placeholders(tj)
        else:
            tj["normalizer"], tj["pre_tokenizer"] = gguf_tokenizer.SPM_NORMALIZER, None
            tj["model"]["unk_token"] = "<unk>"
            if name == "phi-3":
                for t in tj["added_tokens"]:
                    t["rstrip"] = t["special"] and t["content"] not in PHI3_NO_RSTRIP
                _drop_placeholders(tj)
        conf.update(pad_token=PAD[name], tokenizer_class="PreTrainedTokenizerFast")
        if name in SPM:  # load as the real SentencePiece tokenizers do (modeling.load_tokenizer fixes it)
            conf.update(tokenizer_class="LlamaTokenizer", legacy=False)
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    return out


def _qwen(tj: dict, conf: dict) -> None:
    """Qwen3-Instruct's tokenizer.json and tokenizer_config.json where llama.cpp's qwen2 file differs."""
    vocab = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        if t["id"] in QWEN_ADDED:
            old = t["content"]
            (t["content"], t["special"]), t["normalized"] = QWEN_ADDED[t["id"]], False
            vocab.pop(old, None)
            vocab[t["content"]] = t["id"]
    conf.pop("added_tokens_decoder", None)
    conf.update(bos_token=None, eos_token=QWEN_EOS, add_bos_token=False)


def _drop_placeholders(tj: dict) -> None:
    """Leave out llama.cpp's [PAD<id>] placeholders: the real tokenizer has no token there (the embedding is
    padded past it), so the ids stay unused, as in the real model's GGUF."""
    tj["added_tokens"] = [t for t in tj["added_tokens"] if not _PLACEHOLDER.fullmatch(t["content"])]
    tj["model"]["vocab"] = {k: i for k, i in tj["model"]["vocab"].items() if not _PLACEHOLDER.fullmatch(k)}
