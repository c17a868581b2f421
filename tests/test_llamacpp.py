"""A real llama.cpp runs what `make export` writes, for every architecture it supports: the tokenizer in each GGUF
tokenizes llama.cpp's reference texts and the recipes' chat prompts exactly as training does, and a tiny run's f16 and
q8_0 files answer like merged/ (the export's own gate, run in llama.cpp). `make test` installs the runtime first
(`make llamacpp`); run alone without it, skipped with the reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core import config
from common.data import prompts
from common.model import gguf_tokenizer, modeling, standins
from common.shipping import export, llamacpp

pytestmark = pytest.mark.skipif(llamacpp.missing() is not None, reason=llamacpp.missing() or "")

# one recipe per architecture and tokenizer: Qwen2.5, Qwen3 (Qwen's BPE), Phi-3.5 (Phi-3's SentencePiece, fused
# projections, longrope), Llama-3.2 (Llama-3's BPE, tied), TinyLlama and Mistral (Llama-2's SentencePiece), SmolLM2
RECIPES = ("qwen2.5", "qwen3", "phi3.5", "llama3.2", "llama3-alpaca", "tinyllama", "mistral-xauusd", "smollm2")
CHATS = [[{"role": "user", "content": "Title: Acme Chef Knife, Black, Large"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Título: Faca  ção\n\ttab 12345"}],
         [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": " C "}]]


def test_runtime_names_its_version():
    assert llamacpp.version().startswith(f"llama-cpp-python {llamacpp.PINNED} ")


@pytest.mark.parametrize("recipe", RECIPES)
def test_exported_tokenizer_tokenizes_in_llama_cpp_as_training(recipe, tmp_path, model_cache, monkeypatch,
                                                              llama_vocab):
    """The recipe's tiny stand-in written as GGUF and loaded by llama.cpp: the chat prompts (the recipe's template,
    rendered as a chat app sends them) tokenize to the ids training and evaluation use, and, for the real tokenizers,
    every reference text of llama.cpp's vocabulary file to its reference ids."""
    from transformers import AutoConfig

    monkeypatch.setenv("FT_CACHE", str(model_cache))
    cfg = config.load(recipe, tiny=True)
    folder = Path(modeling.model_source(cfg))
    tok = modeling.load_tokenizer(cfg, str(folder))
    conf = AutoConfig.from_pretrained(folder)
    meta = gguf_tokenizer.tokenizer_metadata(tok, folder, conf.vocab_size)
    path = tmp_path / "m.gguf"
    export.write_gguf(path, folder, conf, meta, "q8_0", {"name": f"{recipe} ({conf.model_type} family)",
                                                          "description": "stand-in"})
    chats = [c for c in CHATS if _renders(tok, c)]
    assert chats
    with llamacpp.Runtime(path, n_ctx=256) as rt:
        assert [rt.tokenize(llamacpp.chat_text(tok, c)) for c in chats] == [prompts.encode_prompt(tok, c) for c in chats]
        name = cfg.tiny.tokenizer
        if name != "smollm2":
            refs = standins.reference_tokenizations(name, llama_vocab)
            got = [rt.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text, _ in refs]
            assert got == [ids for _, ids in refs]
        assert rt.is_eog(tok.eos_token_id)  # llama.cpp stops where training taught the model to


def _renders(tok, chat) -> bool:
    try:
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 (Mistral's template refuses a system turn)
        return False
    return True


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", ["phi3.5"])  # the most unlike Llama: fused projections, longrope, rstrip
def test_tiny_runs_gguf_answer_like_merged_in_llama_cpp(recipe, tiny_run):
    """`make all` + `make export` of a tiny run (one, for make test's time; the other families' figures are in
    docs/performance.md): its export gate ran each file in llama.cpp and every figure is
    recorded: prompt tokens all identical, f16 answers identical (near-ties apart), q8_0 at the gate's thresholds."""
    run = tiny_run(recipe)
    assert run.export.returncode == 0, run.export.stderr[-2000:]
    report = json.loads((run.out / "export" / "export_report.json").read_text())
    cfg = config.load(recipe, tiny=True)
    for quant, f in report["files"].items():
        assert f["reader"] == llamacpp.version()
        assert f["prompt_tokens_match"] == 1.0 and f["answers"] == cfg.export.check_prompts
        assert f["answer_match"] >= cfg.export[f"{quant}_min_answer_match"]
        assert f["token_agreement"] >= cfg.export[f"{quant}_min_token_agreement"]
        print(f"{recipe} {quant} in {f['reader']}: prompt tokens {f['prompt_tokens_match']:.0%}, answers "
              f"{round(f['answer_match'] * f['answers'])}/{f['answers']}, next-token {f['token_agreement']:.4f}")
    assert report["files"]["f16"]["answer_match"] == 1.0
