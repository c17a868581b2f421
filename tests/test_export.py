"""What leaves the repo: GGUF export + Ollama Modelfile, parity gates (merge, export), model cards, the report page
rendered in headless Chromium, and make push (dry run, and the upload call with a stand-in hub client)."""
from __future__ import annotations

import csv
import importlib
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make

from common.core import config
from common.data import prompts, templates
from common.model import gguf_tokenizer, standins
from common.shipping import export, llamacpp, ollama, report

SECRET = "hf_FAKEtokenFORtests123456"


# --------------------------------------------------------------------------- unit tests, by value
@pytest.fixture(scope="module")
def smollm2_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standins.smollm2_tokenizer_dir())


@pytest.mark.parametrize("name", list(templates.TEMPLATES))
def test_ollama_template_renders_like_the_chat_template(name, smollm2_tok):
    tok = smollm2_tok
    tok.chat_template = templates.TEMPLATES[name]
    tmpl = ollama.ollama_template(tok)
    assert '{{- if eq .Role "user" }}' in tmpl  # Ollama's messages loop (multi-turn: tests/test_ollama.py)
    user = "Write the product description for this title.\nTitle: Lamp {x}"
    for system in (None, "You write product copy."):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        try:
            want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 (the mistral template rejects a system turn; so must Ollama's: no .System)
            assert "{{ .System }}" not in tmpl
            continue
        assert ollama.render_ollama(tmpl, system, user) == want, (name, system)


def test_ollama_template_keeps_a_default_system_prompt(smollm2_tok):
    """SmolLM2's native template injects a default system prompt when none is given: the else branch keeps it."""
    tok = smollm2_tok
    tok.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                         "Default helper.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tmpl = ollama.ollama_template(tok)
    assert "{{ else }}Default helper.{{ end }}" in tmpl
    assert ollama.render_ollama(tmpl, None, "hi") == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_pre_tokenizer_names():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    byte = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert gguf_tokenizer.pre_tokenizer_name({"pre_tokenizer": byte}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte]}
    assert gguf_tokenizer.pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]}}, byte]}
    assert gguf_tokenizer.pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    assert gguf_tokenizer.pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, "custom") == "custom"
    with pytest.raises(export.Unsupported, match="export.pre_tokenizer"):
        gguf_tokenizer.pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_rope_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8 * 2, 3)  # 4 heads of dim 4, 3 inputs
    back = LlamaTensorProcessor()._reverse_permute_weights(export.permute_rope(w, 4), 4, 4)
    assert np.array_equal(back, w) and not np.array_equal(export.permute_rope(w, 4), w)


def test_seq2seq_is_refused_in_one_line_and_llama3_rope_scaling_is_written():
    from transformers import AutoConfig

    with pytest.raises(export.Unsupported, match="supports the llama, mistral, qwen2, qwen3, phi3 .*'t5'"):
        export.check_supported(AutoConfig.for_model("t5"))
    cfg = AutoConfig.for_model("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192})
    export.check_supported(cfg)  # Llama-3.1/3.2: rope_freqs written (test_families.py checks the factors)


# --------------------------------------------------------------------------- the real Llama tokenizers in GGUF
@pytest.mark.parametrize("name,template", [("llama-spm", "zephyr"), ("llama-bpe", "alpaca")])
@pytest.mark.skipif(llamacpp.missing() is not None, reason=llamacpp.missing() or "")
def test_gguf_tokenizer_is_llama_cpps_own(name, template, model_cache, llama_vocab, tmp_path, monkeypatch):
    """The tinyllama (SentencePiece) and llama3-alpaca (Llama-3 BPE) stand-ins written as GGUF carry llama.cpp's own
    vocabulary file's tokenizer: the same tokens, types, merges and special ids, SentencePiece scores in the same
    order, BOS added; read back by llama.cpp, the file gives llama.cpp's reference ids (*.gguf.out) for
    every reference text, and the recipe's chat prompt tokenizes as in training."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from common.data import prompts
    from common.model import standins

    monkeypatch.setenv("FT_CACHE", str(model_cache))
    folder = standins.build("llama", "zephyr" if name == "llama-spm" else None, tokenizer=name)
    tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(folder))  # as load_tokenizer
    tok.chat_template = templates.TEMPLATES[template]
    cfg = AutoConfig.from_pretrained(folder)
    meta = gguf_tokenizer.tokenizer_metadata(tok, folder, cfg.vocab_size)
    export.write_gguf(tmp_path / "m.gguf", folder, cfg, meta, "f16", {"name": name, "description": "stand-in"})
    ours = gguf_tokenizer.gguf_metadata(tmp_path / "m.gguf")
    ref = gguf_tokenizer.gguf_metadata(llama_vocab / standins.VOCAB_FILES[name])
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id"):
        assert ours.get(f"tokenizer.ggml.{key}") == ref.get(f"tokenizer.ggml.{key}"), key  # value and raw bytes
    assert len(ref["tokenizer.ggml.tokens"][1]) > 100_000
    assert ours["tokenizer.ggml.add_bos_token"][0] is True and ours["tokenizer.ggml.add_eos_token"][0] is False
    assert ours["tokenizer.chat_template"][0] == templates.TEMPLATES[template]
    if name == "llama-spm":
        assert ours["tokenizer.ggml.add_space_prefix"][0] is True
        got, want = (np.frombuffer(f["tokenizer.ggml.scores"][1][12:], "<f4") for f in (ours, ref))
        kinds = np.frombuffer(ref["tokenizer.ggml.token_type"][1][12:], "<i4")
        n_merges = len(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"])
        merged = (kinds == gguf.TokenType.NORMAL) & (got > -n_merges - 0.5)  # made by a merge: minus its rank
        assert merged.sum() == 29_612
        order = np.lexsort((-got[merged], -want[merged]))  # by llama.cpp's score, ties by ours
        assert np.all(np.diff(got[merged][order]) <= 0)  # no pair of differently-scored tokens swapped
    with llamacpp.Runtime(tmp_path / "m.gguf") as back:  # the file read back by llama.cpp itself
        refs = standins.reference_tokenizations(name, llama_vocab)
        assert [back.llm.tokenize(text.encode(), add_bos=False, special=False) for text, _ in refs] == [
            ids for _, ids in refs]
        msgs = [{"role": "user", "content": "Title: Acme Chef Knife"}]
        assert back.tokenize(llamacpp.chat_text(tok, msgs)) == prompts.encode_prompt(tok, msgs)
        assert back.tokenize("Hello")[0] == tok.bos_token_id


def test_sentencepiece_space_prefix_llama_cpp_cannot_write_is_refused():
    """llama.cpp puts "▁" before a text and after every special token: the Prepend normalizer of Llama-2/TinyLlama's
    tokenizer.json. transformers 5's LlamaTokenizer with legacy=false prepends to the first piece only: refused."""
    meta = {"type": "Metaspace", "replacement": "\u2581", "split": False}
    assert gguf_tokenizer.space_prefix({"normalizer": gguf_tokenizer.SPM_NORMALIZER, "pre_tokenizer": None}) is True
    assert gguf_tokenizer.space_prefix({"pre_tokenizer": {**meta, "prepend_scheme": "always"}}) is True
    assert gguf_tokenizer.space_prefix({"pre_tokenizer": {**meta, "prepend_scheme": "never"}}) is False
    with pytest.raises(export.Unsupported, match="first piece of a text only.*after every special token"):
        gguf_tokenizer.space_prefix({"pre_tokenizer": {"type": "Sequence",
                                               "pretokenizers": [{**meta, "prepend_scheme": "first"}]}})


def test_the_parity_gate_fails_on_answers_alone_and_on_tokens_alone():
    """Each half of the gate stops a step by itself: identical tokens with too few identical answers, and
    identical answers with too little token agreement; at the thresholds it passes."""
    from common.shipping import parity

    fix = "lower merge.min_answer_match"
    answers = parity.answer_match(["a", "b", "c", "d"], ["a", "x", "y", "z"])  # 1 of 4 identical
    with pytest.raises(parity.ParityError, match=r"identical greedy answers 0.25 < 0.5; first different answer "
                                                 r"\(#1\): 'x' vs 'b'\. lower merge"):
        parity.gate("the merged model", {"token_agreement": 1.0, **answers}, 0.98, 0.5, fix)
    with pytest.raises(parity.ParityError, match=r"next-token agreement 0.970 < 0.98\. "):
        parity.gate("the merged model", {"token_agreement": 0.97, "answer_match": 1.0}, 0.98, 0.5, fix)
    parity.gate("the merged model", {"token_agreement": 0.98, "answer_match": 0.5}, 0.98, 0.5, fix)


def test_token_agreement_excuses_only_picks_within_one_fp16_rounding_step():
    """A different argmax counts against agreement unless the reference's own logits put the two tokens within
    2^-11 of the position's largest |logit| (a near-tie no fp16 computation resolves)."""
    import torch

    from common.shipping import parity

    step = 2.0 ** -11 * 8.0  # one fp16 rounding step at a largest |logit| of 8
    ref = torch.tensor([[8.0, 8.0 - 0.9 * step, 0.0],   # near-tie: the file's pick trails by 0.9 step
                        [8.0, 8.0 - 1.1 * step, 0.0],   # just beyond: a real disagreement
                        [8.0, 1.0, 0.0],                # a clear lead: a real disagreement
                        [8.0, 1.0, 0.0]])               # the same pick
    got = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    f = parity.agreement([ref], [got])
    assert (f["positions"], f["near_tie_flips"], f["token_agreement"]) == (4, 1, 0.5)
    assert (parity.roundoff(torch.float32), parity.roundoff(torch.bfloat16)) == (2.0 ** -11, 2.0 ** -8)


def test_a_bf16_reference_is_only_as_precise_as_bf16_through_teacher_forced_logits():
    """teacher_forced hands back float32 copies, so the unit comes from the models' weights (parity.unit): a pick
    one bf16 step behind is a near-tie against a bf16 reference (a GPU's merged/), not against an fp32 one."""
    import types

    import torch

    from common.shipping import parity

    class Model(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1, dtype=dtype))

        def forward(self, input_ids):  # 7.96875 trails 8 by one bf16 step (2^-8 of 8), 8 fp16 steps
            return types.SimpleNamespace(logits=(torch.tensor([[[8.0, 7.96875, 0.0]]]) * self.w).to(self.w.dtype))

    bf16, fp32 = Model(torch.bfloat16), Model(torch.float32)
    ref = parity.teacher_forced(bf16, [{"input_ids": [1]}])
    assert ref[0].dtype == torch.float32
    got = [torch.tensor([[0.0, 1.0, 0.0]])]
    assert (parity.unit(bf16), parity.unit(fp32), parity.unit(fp32, bf16)) == (2.0 ** -8, 2.0 ** -11, 2.0 ** -8)
    assert parity.agreement(ref, got, parity.unit(bf16))["near_tie_flips"] == 1
    assert parity.agreement(ref, got, parity.unit(fp32))["near_tie_flips"] == 0


def test_llama_cpp_answers_are_excused_only_with_the_training_prompt_and_their_stop_token(monkeypatch):
    """compare() asks about a different answer only when llama.cpp's prompt ids are training's, and hands over the
    answer with the token it stopped on (and nothing of the file's own error); identical answers are not asked."""
    import numpy as np
    import torch

    from common.shipping import llamacpp

    prompts = {"p0": [1, 2], "p1": [1, 3], "p2": [1, 4]}
    answers = {(1, 2): ([7, 8], 0), (1, 3): ([9], None), (1, 4): ([5, 6], 0)}

    class Runtime:
        def __init__(self, path, n_ctx):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def tokenize(self, text):
            return prompts[text]

        def greedy(self, ids, max_new_tokens):
            return answers[tuple(ids)]

        def logits(self, ids):
            return np.array([[1.0, 0.0]] * len(ids), dtype=np.float32) + np.float32(0.25)

    class Tok:
        bos_token = None

        def apply_chat_template(self, chat, tokenize, add_generation_prompt):
            return chat[0]["content"]

        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids))

    monkeypatch.setattr(llamacpp, "Runtime", Runtime)
    monkeypatch.setattr(llamacpp, "version", lambda: "stub")
    asked = []
    ref = {"ids": [[1, 2], [1, 99], [1, 4]], "answers": ["7 9", "10", "5 6"],
           "logits": [torch.tensor([[1.0, 0.0], [1.0, 0.0]])], "unit": 2.0 ** -11}
    chats = [[{"role": "user", "content": p}] for p in prompts]
    f = llamacpp.compare("x.gguf", Tok(), chats, ref, [{"input_ids": [1, 2]}], 4,
                         lambda prompt, answer: asked.append((prompt, answer)) or True)
    assert asked == [([1, 2], [7, 8, 0])]  # #1: other prompt ids, not asked; #2: identical, not asked
    assert (f["answer_match"], f["near_tie_answers"], f["stopped"], f["prompt_tokens_match"]) == (2 / 3, 1, 2, 2 / 3)


def test_an_answer_counts_when_it_leaves_the_references_greedy_path_only_at_a_near_tie():
    """llama.cpp's answer differs from merged/'s: it still counts when its first token off merged/'s own greedy path
    was within one fp16 rounding step (or the quant type's allowance, `tie`) of merged/'s pick there, and not when
    that gap is wider or never comes."""
    import types

    import torch

    from common.shipping import parity

    step = 2.0 ** -11 * 8.0
    table = torch.tensor([[8.0, 1.0, 0.0],                # after the prompt: token 0, clearly
                          [8.0, 8.0 - 0.9 * step, 0.0],   # then 0 by less than a rounding step over 1
                          [8.0, 8.0 - 1.1 * step, 0.0],   # then 0 by a little more
                          [8.0, 1.0, 0.0]])

    class Merged:
        device = torch.device("cpu")

        def __call__(self, input_ids):
            return types.SimpleNamespace(logits=table[None, : input_ids.shape[1]])

    m = Merged()
    assert parity.departs_at_near_tie(m, [5], [0, 1]) is True       # left at the near-tie
    assert parity.departs_at_near_tie(m, [5], [0, 0, 1]) is False   # left beyond it
    assert parity.departs_at_near_tie(m, [5], [1]) is False         # left at a clear lead
    assert parity.departs_at_near_tie(m, [5], [0, 0, 0]) is False   # never left: no excuse for a different text
    assert parity.departs_at_near_tie(m, [5], [0, 0, 1], tie=1.2 * 2.0 ** -11) is True  # within the quant's allowance
    assert parity.departs_at_near_tie(m, [5], [1], tie=1.2 * 2.0 ** -11) is False
    f = parity.answer_match(["a", "b", "c"], ["a", "x", "y"], [True, True, False])
    assert (f["answer_match"], f["near_tie_answers"], f["first_difference"]["index"]) == (2 / 3, 1, 2)


@pytest.mark.e2e
def test_a_merge_whose_answers_differ_fails_on_the_answer_threshold(in_run, monkeypatch, capsys):
    """The merged model's next tokens agree (teacher-forced) but its greedy answers differ: the merge step fails on
    merge.min_answer_match alone."""
    from common.shipping import parity

    _, out = in_run
    report_before = (out / "merge_report.json").read_text()
    (out / "merge_report.json").unlink()
    real = parity.greedy

    def differ(cfg, model, tok, rows, desc, precision="fp32"):
        ids, answers = real(cfg, model, tok, rows, desc, precision)
        return ids, [a + " (changed)" for a in answers] if desc == "merged model" else answers

    monkeypatch.setattr(parity, "greedy", differ)
    try:
        assert _call("03_merge_fp16") == 2
        err = capsys.readouterr().err
        line = next(x for x in err.splitlines() if x.startswith("error:"))  # the gate's one line
        assert "identical greedy answers 0.00 < 0.5" in line and "next-token agreement" not in line, line
        assert not (out / "merge_report.json").exists()
    finally:
        (out / "merge_report.json").write_text(report_before)


# --------------------------------------------------------------------------- one tiny run, shared
@pytest.fixture(scope="module")
def run(tiny_run):
    """The session's tiny smollm2 run (prepare, train, merge, eval) and its export (conftest.tiny_run)."""
    r = tiny_run("smollm2")
    assert r.export.returncode == 0, r.export.stderr[-3000:]
    return r.home, r.out


@pytest.fixture
def in_run(tiny_run, tmp_path, model_cache, monkeypatch):
    """A copy of the shared run (the test may break it) as the environment, for calling a script's main() here."""
    home = tiny_run("smollm2").copy(tmp_path / "home")
    monkeypatch.setenv("FT_HOME", str(home))
    monkeypatch.setenv("FT_CACHE", str(model_cache))
    return home, home / "outputs" / "smollm2-tiny"


@pytest.mark.e2e
def test_export_writes_gguf_files_that_answer_like_merged(run):
    import gguf

    _, out = run
    rep = json.loads((out / "export/export_report.json").read_text())
    assert set(rep["files"]) == {"f16", "q8_0"}
    f16, q8 = rep["files"]["f16"], rep["files"]["q8_0"]
    assert f16["answer_match"] == 1.0 and f16["token_agreement"] == 1.0 and f16["prompt_tokens_match"] == 1.0
    assert f16["reader"] == q8["reader"] == llamacpp.version()  # every file is checked in a real llama.cpp
    e = config.load("smollm2", tiny=True).export
    assert q8["answer_match"] >= e.q8_0_min_answer_match and q8["token_agreement"] >= e.q8_0_min_token_agreement
    assert q8["bytes"] < f16["bytes"]
    r = gguf.GGUFReader(out / "export" / f16["file"])
    meta = {k: r.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.chat_template",
                                                 "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre")}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == templates.TEMPLATES["chatml"] and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert r.fields["tokenizer.ggml.token_type"].contents()[2] == gguf.TokenType.CONTROL  # <|im_end|> stays whole
    mf = (out / "export/Modelfile").read_text()
    assert f"FROM ./{q8['file']}" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    tmpl = mf.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert tmpl == rep["ollama_template"]
    assert ollama.render_ollama(tmpl, None, "x") == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert "Ollama" in (out / "merged/README.md").read_text()  # export adds the section to the cards


def _call(script: str, *args: str) -> int:
    return importlib.import_module(f"scripts.{script}").main(["--recipe", "smollm2", "--tiny", *args])


@pytest.mark.e2e
def test_export_without_llama_cpp_stops_in_one_line_and_writes_nothing(in_run, monkeypatch, capsys):
    """scripts/06_export.py run alone where llama.cpp is missing (make export installs it first): exit 2, one line
    naming `make llamacpp`, no export folder; the transformers reader is never a fallback."""
    _, out = in_run
    shutil.rmtree(out / "export")
    monkeypatch.setattr(llamacpp, "missing", lambda: "llama-cpp-python is not usable here; run make llamacpp")
    assert _call("06_export") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "make llamacpp" in err[-1] and "real llama.cpp" in err[-1], err[-3:]
    assert not (out / "export").exists()


@pytest.mark.e2e
def test_a_corrupted_weight_fails_the_export(in_run, monkeypatch):
    _, out = in_run
    shutil.rmtree(out / "export")
    real = export.gguf_tensors

    def corrupted(folder, config):
        for name, w in real(folder, config):
            yield name, (np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
                         if name == "output.weight" else w)

    monkeypatch.setattr(export, "gguf_tensors", corrupted)
    assert _call("06_export") == 2
    assert not (out / "export").exists() and not list(out.glob(".export*"))


@pytest.mark.e2e
def test_a_dropped_chat_template_fails_the_export(in_run, monkeypatch, capsys):
    shutil.rmtree(in_run[1] / "export")
    _, out = in_run
    real = gguf_tokenizer.tokenizer_metadata

    def without_template(*a, **k):
        meta = real(*a, **k)
        meta["chat_template"] = None
        return meta

    monkeypatch.setattr(gguf_tokenizer, "tokenizer_metadata", without_template)
    assert _call("06_export") == 2
    assert "cannot format the recipe's prompts" in capsys.readouterr().err
    assert not (out / "export").exists()


@pytest.mark.e2e
def test_a_broken_merge_fails_the_merge(in_run, monkeypatch, capsys):
    import torch
    from peft.tuners.lora import LoraModel  # PeftModel.merge_and_unload forwards to it

    _, out = in_run
    report_before = (out / "merge_report.json").read_text()
    weights_before = (out / "merged/model.safetensors").read_bytes()
    (out / "merge_report.json").unlink()
    real = LoraModel.merge_and_unload

    def broken(self, *a, **k):
        model = real(self, *a, **k)
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    try:
        assert _call("03_merge_fp16") == 2
        assert "does not answer like the model it was made from" in capsys.readouterr().err
        assert not (out / "merge_report.json").exists()
        assert (out / "merged/model.safetensors").read_bytes() == weights_before  # the old merge is untouched
    finally:
        (out / "merge_report.json").write_text(report_before)


@pytest.mark.e2e
def test_model_cards_match_what_was_evaluated(run):
    _, out = run
    m = json.loads((out / "eval/metrics.json").read_text())
    for kind, library in (("adapter", "peft"), ("merged", "transformers")):
        text = (out / kind / "README.md").read_text()
        front = yaml.safe_load(text.split("---")[1])
        assert front["library_name"] == library and front["pipeline_tag"] == "text-generation"
        assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
        assert {"llm-finetune-recipes", "lora", "product_description"} <= set(front["tags"])
        for k, v in m["tuned"].items():
            assert f"| {k} | {report.fmt(m['base'][k])} | {report.fmt(v)} |" in text
        c = m["comparison"]
        assert f"95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" in text
        v, f = m["vs_baselines"][m["strongest_baseline"]], m["forgetting"]
        assert f"`{m['strongest_baseline']}`: {v['mean']:+.4f}, 95% CI [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]" in text
        assert "there are too few to tell" in text  # 8 eval examples
        assert f"base {f['base_loss']:.4f}, tuned {f['tuned_loss']:.4f}, change {f['mean']:+.4f}" in text
        assert "Test run on a random-init stand-in" in text and "![training and validation loss](loss.png)" in text
        assert (out / kind / "loss.png").stat().st_size > 1000
    state = json.loads((out / "adapter/trainer_state.json").read_text())
    info = json.loads((out / "adapter/run_info.json").read_text())
    assert state["global_step"] == info["global_step"] and any("loss" in h for h in state["log_history"])


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", ["smollm2", "tinyllama", "mistral-xauusd"])  # no BOS; BOS added; BOS in template
def test_the_cards_python_snippets_run_on_the_saved_model_with_the_tokens_eval_uses(recipe, tiny_run):
    """The card's "How to use" code, executed as a user copies it (the hub id pointed at the saved folder): it
    generates, from exactly the prompt ids eval feeds the model (one BOS where the tokenizer adds one)."""
    import contextlib
    import io as stdio

    from transformers import AutoTokenizer

    from common.model import arch

    r = tiny_run(recipe)
    cfg = config.load(recipe, tiny=True)
    for kind in ("merged", "adapter"):
        card = (r.out / kind / "README.md").read_text()
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        assert f'"<user>/{cfg.run}"' in code
        code = code.replace(f'"<user>/{cfg.run}"', repr(str(r.out / kind)))
        ns: dict = {}
        with contextlib.redirect_stdout(stdio.StringIO()) as printed:
            exec(compile(code, f"{kind}/README.md", "exec"), ns)  # noqa: S102 (the card's own code)
        tok = AutoTokenizer.from_pretrained(r.out / "adapter")
        want = arch.get(cfg).encode_prompt(cfg, tok, {"prompt": ns["messages"], "completion": []})
        got = ns["inputs"]["input_ids"][0].tolist()
        assert got == want, (kind, tok.convert_ids_to_tokens(got[:3]), tok.convert_ids_to_tokens(want[:3]))
        if prompts.adds_bos(tok):  # one BOS, as training and eval have it (not none, not two)
            assert got[0] == tok.bos_token_id != got[1], tok.convert_ids_to_tokens(got[:3])
        assert ns["out"].shape[1] > len(got) and printed.getvalue().endswith("\n")  # it generated and printed


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self._key = None
        self.images = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-key" in a:
            self._key = (a["data-run"], a["data-key"])
            self.cells[self._key] = ""
        if tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_endtag(self, tag):
        self._key = None

    def handle_data(self, data):
        if self._key:
            self.cells[self._key] += data


@pytest.mark.e2e
def test_report_page_in_headless_chromium_shows_each_runs_metrics(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    home, out = run
    # a second run in the same root: the page lists both
    second = home / "outputs" / "copy-of-tiny"
    shutil.copytree(out / "eval", second / "eval")
    make(home, "report", "RECIPE=smollm2", "TINY=1")
    rows = list(csv.DictReader((home / "outputs/summary.csv").open()))
    assert [r["run"] for r in rows] == ["copy-of-tiny", "smollm2-tiny"]
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
                          (home / "outputs/report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    page = _Cells()
    page.feed(dom)
    assert page.images >= 1  # the loss curve is embedded
    for name in ("smollm2-tiny", "copy-of-tiny"):
        m = json.loads((home / "outputs" / name / "eval/metrics.json").read_text())
        for model in ("base", "tuned"):
            for k, v in m[model].items():
                assert page.cells[(name, f"{model}.{k}")] == report.fmt(v), (name, model, k)
        for k in ("mean", "ci_low", "ci_high"):
            assert page.cells[(name, f"comparison.{k}")] == report.fmt(m["comparison"][k])
        assert page.cells[(name, "summary.tuned")] == report.fmt(m["tuned"][m["primary_metric"]])
        row = next(r for r in rows if r["run"] == name)
        assert float(row["tuned"]) == m["tuned"][m["primary_metric"]] and float(row["ci_low"]) == m["comparison"]["ci_low"]


@pytest.mark.e2e
def test_push_dry_run_writes_what_would_go_and_never_the_token(in_run, monkeypatch):
    home, out = in_run
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert _call("08_push", "--dry-run", "--set", "card.repo_id=someone/tiny") == 0
    manifest = json.loads((out / "push-dry-run.json").read_text())
    staged = out / "push-dry-run"
    names = {f["path"] for f in manifest["files"]}
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= names
    assert "run_info.json" not in names and names == {str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()}
    import hashlib

    for f in manifest["files"]:
        assert hashlib.sha256((staged / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert manifest["repo_id"] == "someone/tiny" and manifest["private"] is True
    for f in home.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f


@pytest.mark.e2e
def test_push_uploads_the_staged_folder_with_the_token_from_the_environment(in_run, monkeypatch):
    import huggingface_hub

    _, out = in_run
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert _call("08_push", "--set", "card.repo_id=someone/tiny") == 2  # no token: one line, nothing sent
    assert calls == []
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert _call("08_push", "--set", "card.repo_id=someone/tiny", "--set", "card.push=merged") == 0
    assert calls[0] == ("token", SECRET) and calls[1] == ("create", "someone/tiny", True, True)
    assert calls[2][0] == "upload" and "model.safetensors" in calls[2][1] and "README.md" in calls[2][1]
