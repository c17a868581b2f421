"""Loss masking on real token labels, for every template the recipes use: SmolLM2's real tokenizer, and the real
Llama-3 (byte-level BPE) and SentencePiece Llama tokenizers of the llama and mistral recipes' stand-ins (llama.cpp's
vocabulary files): exactly one BOS, the prompt masked, the answer and its EOS trained, and generation stopping on
that EOS."""
from __future__ import annotations

import pytest
from conftest import answer_spans

from common.data import prompts, templates
from common.model import gguf_tokenizer, modeling, standins

IGNORE = prompts.IGNORE


@pytest.fixture(scope="module")
def base_tok(model_cache):
    import os

    os.environ["FT_CACHE"] = str(model_cache)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standins.smollm2_tokenizer_dir())


def with_template(tok, name):
    t = tok.__class__.from_pretrained(tok.name_or_path)
    if name != "native":
        t.chat_template = templates.TEMPLATES[name]
    return t


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("template", ["native", "chatml", "alpaca", "zephyr", "mistral", "ptbr_product_qa"])
def test_prompt_masked_answer_and_eos_trained(base_tok, template):
    tok = with_template(base_tok, template)
    system = [] if template in ("mistral", "zephyr", "native", "chatml") else [{"role": "system", "content": "Be brief."}]
    prompt = system + [user("Title: Acme Chef Knife")]
    answer = "Description: A sharp stainless steel knife."
    ids, labels = prompts.encode_chat(tok, prompt, [bot(answer)])
    p_ids = prompts.encode_prompt(tok, prompt)
    # the generation prompt is exactly the masked prefix of the training example
    assert ids[: len(p_ids)] == p_ids
    assert all(lab == IGNORE for lab in labels[: len(p_ids)])
    # every answer token is trained with its own id, and the last trained token is EOS
    trained = [(i, lab) for i, lab in zip(ids, labels) if lab != IGNORE]
    assert [i for i, _ in trained] == [lab for _, lab in trained]
    assert trained[-1][0] == tok.eos_token_id
    assert all(lab != IGNORE for lab in labels[len(p_ids):])  # every token after the prompt is answer or EOS
    assert tok.decode([i for i, _ in trained], skip_special_tokens=True).strip() == answer


def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(base_tok):
    tok = with_template(base_tok, "ptbr_product_qa")
    turns = [("Título do produto: A", "Descrição A."), ("Título do produto: B", "Descrição B."),
             ("Título do produto: C", "Descrição C.")]
    msgs = [{"role": "system", "content": "Responda à pergunta sobre o produto."}]
    for u, a in turns[:-1]:
        msgs += [user(u), bot(a)]
    msgs.append(user(turns[-1][0]))
    ids, labels = prompts.encode_chat(tok, msgs, [bot(turns[-1][1])], all_turns=True)
    spans = answer_spans(labels)
    assert len(spans) == 3
    for (s, e), (u, a) in zip(spans, turns):
        assert tok.decode(ids[s:e], skip_special_tokens=True).strip() == a
        assert ids[e - 1] == tok.eos_token_id
    trained_text = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert "Título" not in trained_text and "Pergunta" not in trained_text
    # completion-only mode trains the last turn alone
    _, last_only = prompts.encode_chat(tok, msgs, [bot(turns[-1][1])], all_turns=False)
    assert len(answer_spans(last_only)) == 1 and answer_spans(last_only)[0] == spans[-1]


def test_truncation_that_removes_the_answer_drops_the_example(base_tok):
    tok = with_template(base_tok, "chatml")
    prompt = [user("word " * 50)]
    assert prompts.encode_chat(tok, prompt, [bot("answer")], max_length=10) is None
    ids, labels = prompts.encode_chat(tok, prompt, [bot("answer " * 20)], max_length=70)
    assert len(ids) == 70 and labels[-1] != IGNORE


def test_seq2seq_labels_are_the_target_only(base_tok):
    src, tgt = prompts.encode_seq2seq(base_tok, "Pergunta: Qual é a descrição?", "Uma faca afiada.", 64, 16)
    assert base_tok.decode(tgt, skip_special_tokens=True).strip() == "Uma faca afiada."
    assert tgt[-1] == base_tok.eos_token_id
    assert "Pergunta" not in base_tok.decode(tgt)
    _, short = prompts.encode_seq2seq(base_tok, "x", "palavra " * 40, 64, 8)
    assert len(short) == 8 and short[-1] == base_tok.eos_token_id


# --------------------------------------------------------------------------- the real Llama tokenizers
# (tiny.tokenizer, template) of each llama/mistral recipe, and the ids the real models use
REAL = {"llama-bpe": {"bos": 128000, "eos": 128001, "pad": 128255, "vocab": 128256},  # <|begin_of_text|> ...
        "llama-spm": {"bos": 1, "eos": 2, "pad": 2, "vocab": 32000}}                    # <s>, </s>
RECIPE_TOKENIZERS = [("llama-bpe", "alpaca"), ("llama-bpe", "ptbr_product_qa"), ("llama-spm", "zephyr"),
                     ("llama-spm", "mistral")]


@pytest.fixture(scope="module")
def real_tok(llama_tokenizers):
    from transformers import AutoTokenizer

    loaded = {name: gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(d))  # as load_tokenizer
              for name, d in llama_tokenizers.items()}

    def get(name, template):
        tok = loaded[name]
        tok.chat_template = templates.TEMPLATES[template]
        tok._ft_adds_bos = None
        return tok

    return get


def test_recipes_name_the_real_tokenizers():
    from common.core import config

    got = {}
    for name in ("llama3-alpaca", "llama3-sharegpt", "tinyllama", "mistral-xauusd"):
        c = config.load(name, tiny=True)
        got[name] = (c.tiny.tokenizer, c.tiny.template or c.prompt.template)
    assert got == {"llama3-alpaca": ("llama-bpe", "alpaca"), "llama3-sharegpt": ("llama-bpe", "ptbr_product_qa"),
                   "tinyllama": ("llama-spm", "zephyr"), "mistral-xauusd": ("llama-spm", "mistral")}


@pytest.mark.parametrize("name", list(REAL))
def test_real_tokenizers_tokenize_as_llama_cpp_reference(name, llama_tokenizers, llama_vocab):
    """The stand-in's tokenizer gives llama.cpp's reference ids (*.gguf.out) for every reference text, has the real
    model's vocabulary size and special ids, and puts BOS in front of a text as the real tokenizer does."""
    from transformers import AutoTokenizer

    tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(llama_tokenizers[name]))
    refs = standins.reference_tokenizations(name, llama_vocab)
    assert len(refs) == 46
    assert [tok(text, add_special_tokens=False).input_ids for text, _ in refs] == [ids for _, ids in refs]
    r = REAL[name]
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        r["vocab"], r["bos"], r["eos"], r["pad"])
    assert tok("Hello world").input_ids[0] == r["bos"] and prompts.adds_bos(tok)
    assert tok("Hello world").input_ids[1:] == tok("Hello world", add_special_tokens=False).input_ids


@pytest.mark.parametrize("name,template", RECIPE_TOKENIZERS)
def test_real_tokenizers_one_bos_prompt_masked_answer_and_eos_trained(name, template, real_tok):
    tok = real_tok(name, template)
    r = REAL[name]
    system = [] if template in ("mistral", "zephyr") else [{"role": "system", "content": "Be brief."}]
    prompt = system + [user("Title: Acme Chef Knife")]
    answer = "Description: A sharp stainless steel knife."
    ids, labels = prompts.encode_chat(tok, prompt, [bot(answer)])
    p_ids = prompts.encode_prompt(tok, prompt)
    # exactly one BOS, first, in training and generation ids (the mistral template writes it as text itself)
    assert ids[0] == p_ids[0] == r["bos"] and ids.count(r["bos"]) == 1 and p_ids.count(r["bos"]) == 1
    assert ids[: len(p_ids)] == p_ids and labels[: len(p_ids)] == [IGNORE] * len(p_ids)
    # everything after the prompt is trained with its own id and ends on the model's EOS, trained once
    assert labels[len(p_ids):] == ids[len(p_ids):]
    trained = ids[len(p_ids):]
    assert trained[-1] == r["eos"] and trained.count(r["eos"]) == 1
    assert tok.decode(trained, skip_special_tokens=True).strip() == answer
    assert r["pad"] not in ids or r["pad"] == r["eos"]


def test_llama3_multi_turn_trains_each_turns_eos_after_one_bos(real_tok):
    tok = real_tok("llama-bpe", "ptbr_product_qa")
    msgs = [{"role": "system", "content": "Responda à pergunta sobre o produto."}]
    for u, a in (("Título do produto: A", "Descrição A."), ("Título do produto: B", "Descrição B.")):
        msgs += [user(u), bot(a)]
    msgs.append(user("Título do produto: C"))
    ids, labels = prompts.encode_chat(tok, msgs, [bot("Descrição C.")], all_turns=True)
    spans = answer_spans(labels)
    assert [tok.decode(ids[s:e], skip_special_tokens=True).strip() for s, e in spans] == [
        "Descrição A.", "Descrição B.", "Descrição C."]
    assert [ids[e - 1] for s, e in spans] == [128001] * 3 and ids.count(128001) == 3
    assert ids[0] == 128000 and ids.count(128000) == 1


@pytest.mark.parametrize("name", list(REAL))
def test_generation_stops_on_the_tokenizers_eos(name, real_tok, model_cache, monkeypatch):
    """Eval's stop rate on a stand-in with the real tokenizer: a model whose every next token is the tokenizer's EOS
    stops (empty answer); one whose every next token is another end-like special token (Llama-3-Instruct's
    <|eot_id|>, SentencePiece's <unk>) does not; two prompts of different lengths share a left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.model import arch

    monkeypatch.setenv("FT_CACHE", str(model_cache))
    tiny_template = None if name == "llama-bpe" else "zephyr"  # the llama3-alpaca and tinyllama stand-ins
    tok = real_tok(name, "alpaca" if name == "llama-bpe" else "zephyr")
    model = AutoModelForCausalLM.from_pretrained(standins.build("llama", tiny_template, tokenizer=name))
    r = REAL[name]
    assert (model.config.vocab_size, model.config.bos_token_id, model.config.eos_token_id,
            model.config.pad_token_id) == (r["vocab"], r["bos"], r["eos"], r["pad"])
    model.lm_head = head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    batch = [prompts.encode_prompt(tok, [user("Title: Lamp")]), prompts.encode_prompt(tok, [user("Title: lamp " * 9)])]
    for token, stop in ((r["eos"], True), (128009 if name == "llama-bpe" else 0, False)):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(-1.0)
            head.bias[token] = 1.0
        stops: list = []
        answers = modeling.generate(model, tok, batch, 4, arch.ARCHS["causal"], 8, stops=stops)
        assert stops == [stop, stop], (token, stops, answers)
        if stop:
            assert answers == ["", ""]
