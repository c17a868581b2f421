"""Loss masking on real token labels, for every template the recipes use (SmolLM2's real tokenizer)."""
from __future__ import annotations

import pytest

from common import modeling, prompts, templates

IGNORE = prompts.IGNORE


@pytest.fixture(scope="module")
def base_tok(model_cache):
    import os

    os.environ["FT_CACHE"] = str(model_cache)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(modeling.smollm2_tokenizer_dir())


def with_template(tok, name):
    t = tok.__class__.from_pretrained(tok.name_or_path)
    if name != "native":
        t.chat_template = templates.TEMPLATES[name]
    return t


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def answer_spans(ids, labels):
    """Contiguous runs of trained positions, as (start, end)."""
    spans, start = [], None
    for i, lab in enumerate(labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


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
    spans = answer_spans(ids, labels)
    assert len(spans) == 3
    for (s, e), (u, a) in zip(spans, turns):
        assert tok.decode(ids[s:e], skip_special_tokens=True).strip() == a
        assert ids[e - 1] == tok.eos_token_id
    trained_text = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert "Título" not in trained_text and "Pergunta" not in trained_text
    # completion-only mode trains the last turn alone
    _, last_only = prompts.encode_chat(tok, msgs, [bot(turns[-1][1])], all_turns=False)
    assert len(answer_spans(ids, last_only)) == 1 and answer_spans(ids, last_only)[0] == spans[-1]


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
