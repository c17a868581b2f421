"""The chat task by value: each conversation format and file type read, detection, column and role mapping, every
drop and repair reason, the one-line errors, a dataset folder through datasets.load_dataset, masking of multi-turn
rows on the real Llama-3 BPE and SentencePiece tokenizers, the cut before the last answer, the retrieval baseline and
the held-out answer loss in the report."""
from __future__ import annotations

import json

import pytest
from conftest import answer_spans, make, step, write

from common.core import config, paths
from common.core.io import UserError
from common.data import conversations, prompts, readers
from common.evaluation import compare
from common.model import arch
from common.tasks import chat

IGNORE = prompts.IGNORE
U, A, S = "user", "assistant", "system"


def t(role, content):
    return {"role": role, "content": content}


def read(path, *sets):
    """(kept conversations, report) of the chat task on `path`."""
    cfg = config.load("chat", [f"data.path={path}", *sets])
    rep = readers.Report()
    kept = [f["messages"] for _, f in chat.TASK.records(path, cfg, rep)]
    return kept, rep


MESSAGES = [{"messages": [t(S, "Be brief."), t(U, f"hi {i}"), t(A, f"hello {i}")]} for i in range(3)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]}
            for i in range(3)]
ALPACA = [{"instruction": f"hi {i}", "input": "", "output": f"hello {i}"} for i in range(3)]
PROMPT_COMPLETION = [{"prompt": f"hi {i}", "completion": f"hello {i}"} for i in range(3)]
WANT = [[t(U, f"hi {i}"), t(A, f"hello {i}")] for i in range(3)]


FORMATS = [("messages", MESSAGES, "messages/role/content"), ("sharegpt", SHAREGPT, "conversations/from/value"),
           ("alpaca", ALPACA, "instruction/input/output"), ("prompt_completion", PROMPT_COMPLETION, "prompt/completion")]
FILES = [(".jsonl", False), (".json", False), (".parquet", False), (".csv", False), (".jsonl", True), (".json", True),
         (".parquet", True), (".csv", True)]


@pytest.mark.parametrize("fmt,rows,keys,suffix,gz", [
    (*f, *x) for f in FORMATS for x in FILES if not (x[0] == ".csv" and f[0] in ("messages", "sharegpt"))])
def test_every_format_from_every_file_type(tmp_path, fmt, rows, keys, suffix, gz, caplog):
    """CSV holds the flat formats (alpaca, prompt_completion) only."""
    path = write(tmp_path / f"data{suffix}", rows, gz)
    with caplog.at_level("INFO", logger="ft"):
        kept, rep = read(path)
    want = [[t(S, "Be brief."), *w] for w in WANT] if fmt == "messages" else WANT
    assert kept == want and rep.read == 3 and not rep.dropped
    assert f"format: {fmt}, from keys {keys} in the first 3 records" in caplog.text


def test_sharegpt_aliases_system_beside_the_turns_and_mapped_roles(tmp_path):
    rows = [{"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]},  # axolotl #752
            {"system": "Sys.", "conversations": [{"from": "Human", "value": "c"}, {"from": "bot", "value": "d"},
                                                 {"from": "customer", "value": "e"}, {"from": "model", "value": "f"}]}]
    kept, rep = read(write(tmp_path / "d.jsonl", rows), "data.roles={customer: user}")
    assert kept == [[t(U, "a"), t(A, "b")], [t(S, "Sys."), t(U, "c"), t(A, "d"), t(U, "e"), t(A, "f")]]
    kept, rep = read(write(tmp_path / "d.jsonl", rows))
    assert rep.dropped == {"unknown_role_customer": 1} and rep.where["unknown_role_customer"] == [2]


def test_columns_mapped_by_settings(tmp_path):
    rows = [{"dialog": [{"speaker": "human", "text": "a"}, {"speaker": "gpt", "text": "b"}]}]
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"no conversation format in the first 1 records \(keys seen: dialog\)"):
        read(path)
    kept, _ = read(path, "data.columns={messages: dialog, role: speaker, content: text}")
    assert kept == [[t(U, "a"), t(A, "b")]]
    with pytest.raises(UserError, match="data.columns has unknown column 'dialogue'"):
        read(path, "data.columns={dialogue: dialog}")
    with pytest.raises(UserError, match="data.roles maps 'x' to 'narrator'"):
        read(path, "data.roles={x: narrator}")


def test_alpaca_input_system_and_history_become_turns(tmp_path):
    rows = [{"instruction": "Translate", "input": "hola", "output": "hello", "system": "You translate.",
             "history": [["first q", "first a"], ["second q", "second a"]]}]
    kept, _ = read(write(tmp_path / "d.json", rows))
    assert kept == [[t(S, "You translate."), t(U, "first q"), t(A, "first a"), t(U, "second q"), t(A, "second a"),
                     t(U, "Translate\n\nhola"), t(A, "hello")]]


def test_prompt_completion_as_message_lists_and_openai_content_parts(tmp_path):
    rows = [{"prompt": [t(S, "S."), t(U, "q")], "completion": [t(A, "a")]},
            {"messages": [t(U, [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]), t(A, "x")]}]
    kept, rep = read(write(tmp_path / "d.jsonl", rows), "data.format=prompt_completion")
    assert kept == [[t(S, "S."), t(U, "q"), t(A, "a")]] and rep.dropped == {"other_format": 1}
    kept, _ = read(write(tmp_path / "d.jsonl", rows[1:]))
    assert kept == [[t(U, "part one\ntwo"), t(A, "x")]]


def test_every_drop_and_repair_reason_with_its_line(tmp_path):
    ok = [t(U, "q"), t(A, "a")]
    rows = [
        {"messages": ok},                                                        # 1 kept
        {"messages": [t(U, "q1"), t(U, "q2"), t(A, "a"), t(A, "more")]},          # 2 merged (LLaMA-Factory #2962)
        {"messages": [t(U, "q"), t(A, "a"), t(U, "bye")]},                        # 3 trailing user turn removed
        {"messages": [t(S, "s"), t(U, "q")]},                                     # 4 no assistant turn
        {"messages": [t(U, "q"), t(A, "  ")]},                                    # 5 empty turn
        {"messages": [t("narrator", "q"), t(A, "a")]},                            # 6 unknown role, named
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},  # 7 other format
        {"messages": [t(U, "q"), t(A, "a"), t(S, "late")]},                        # 8 system turn not first
        {"messages": [t(U, [{"type": "image_url"}]), t(A, "a")]},                 # 9 not text
        {"messages": [{"content": "no role"}, t(A, "a")]},                        # 10 malformed turn
        {"title": "x", "content": "y"},                                           # 11 no conversation at all
        {"messages": [t(U, "q"), t(A, "call"), t("tool", "42"), t(A, "It is 42.")]},  # 12 tool turn kept
    ]
    path = write(tmp_path / "d.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "trunc\n\xff\xfe binary\n[1, 2]\n')  # 13-15
    kept, rep = read(path)
    assert kept == [ok, [t(U, "q1\n\nq2"), t(A, "a\n\nmore")], ok,
                    [t(U, "q"), t(A, "call"), t("tool", "42"), t(A, "It is 42.")]]
    assert dict(rep.where) == {"no_assistant_turn": [4], "empty_turn": [5], "unknown_role_narrator": [6],
                               "other_format": [7], "misplaced_system_turn": [8], "non_text_turn": [9],
                               "malformed_turn": [10], "missing_messages": [11], "bad_json": [13],
                               "invalid_utf8": [14], "not_an_object": [15]}
    assert dict(rep.repaired_where) == {"merged_consecutive_turns": [2], "trailing_turns_removed": [3]}
    assert rep.read == 15


def test_nothing_usable_is_one_line_with_format_reasons_and_lines(tmp_path):
    rows = [{"messages": [t(U, "q")]}] * 3 + [{"messages": [t(U, "q"), t(A, "")]}] * 2
    with pytest.raises(UserError) as e:
        read(write(tmp_path / "d.jsonl", rows))
    msg = str(e.value)
    assert "\n" not in msg and "no usable conversation out of 5 read as format messages" in msg
    assert "no_assistant_turn 3 (first at 1, 2, 3); empty_turn 2 (first at 4, 5)" in msg


@pytest.mark.parametrize("content,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", r"no readable record in its first 3 rows \(bad_json 2, invalid_utf8 1\)"),
    (b'[{"messages": [{"role": "user"', "not a valid JSON array"),
    (b'{"uid": "1", "title": "a", "content": "b"}\n', r"keys seen: uid, title, content"),
])
def test_bad_files_are_one_line(tmp_path, content, match):
    path = tmp_path / ("d.json" if content.startswith(b"[") else "d.jsonl")
    path.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        read(path)
    assert "\n" not in str(e.value)


def test_an_empty_file_or_folder_without_data_is_one_line(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert chat.TASK.source(str(empty)) is None  # a file: prepare resolves it as every task's file
    with pytest.raises(UserError, match="is empty"):
        readers.resolve(str(empty))
    monkeypatch.setenv("FT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="could not load dataset") as e:
        read(tmp_path / "nothing")
    assert "\n" not in str(e.value)


def test_duplicates_are_dropped_with_their_line(tmp_path):
    rows = [{"messages": [t(U, "q"), t(A, "a")]}] * 2 + [{"messages": [t(U, "q"), t(A, "b")]}]
    path = write(tmp_path / "d.jsonl", rows)
    cfg = config.load("chat", [f"data.path={path}"])
    rep = readers.Report()
    got = readers.collect(chat.TASK.records(path, cfg, rep), None, 0, rep, chat.TASK.duplicate_reason)
    assert [g["uid"] for g in got] == ["1", "3"] and rep.where == {"duplicate": ["2"]}


def test_a_dataset_folder_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write(folder / "train.jsonl", SHAREGPT)
    assert chat.TASK.source(str(folder)) == folder and chat.TASK.source("hub:me/chats") == "hub:me/chats"
    assert chat.TASK.source(str(folder / "train.jsonl")) is None
    kept, rep = read(folder)
    assert kept == WANT and rep.read == 3
    assert any((tmp_path / "cache" / "datasets").iterdir())  # cached under FT_CACHE
    with pytest.raises(UserError, match="could not load dataset 'me/no-such-dataset' split 'train'"):
        read("hub:me/no-such-dataset")


def test_the_cut_falls_before_the_last_answer_and_the_recipe_system_is_a_fallback():
    cfg = config.load("chat", ["prompt.system=Recipe system."])
    turns = [t(U, "q1"), t(A, "a1"), t(U, "q2"), t(A, "a2")]
    ex = arch.get(cfg).build(cfg, {"uid": "1", "messages": turns})
    assert ex == {"prompt": [t(S, "Recipe system."), *turns[:3]], "completion": [t(A, "a2")]}
    ex = arch.get(cfg).build(cfg, {"uid": "1", "messages": [t(S, "Data system."), *turns]})
    assert ex["prompt"][0] == t(S, "Data system.")
    demo = arch.get(cfg).build(cfg, chat.TASK.demo_fields("Where is my order?", {}))
    assert demo["prompt"] == [t(S, "Recipe system."), t(U, "Where is my order?")]


@pytest.mark.parametrize("sets,match", [
    (["model.arch=seq2seq", "model.family=t5", "train.loss_on=completion"], "task chat needs model.arch=causal"),
    (["prompt.user=Hello"], "task chat takes its turns from the data"),
    (["data.format=xml"], "data.format must be one of auto, messages, sharegpt, alpaca, prompt_completion"),
])
def test_settings_that_do_not_fit_a_conversation_fail_in_one_line(sets, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load("chat", sets)


# --------------------------------------------------------------------------- real tokenizers
@pytest.fixture(scope="module")
def real_tok(llama_tokenizers):
    from transformers import AutoTokenizer

    from common.data import templates
    from common.model import gguf_tokenizer

    def get(name, template):
        tok = gguf_tokenizer.as_llama_cpp_applies_it(AutoTokenizer.from_pretrained(llama_tokenizers[name]))
        tok.chat_template = templates.TEMPLATES[template]
        return tok

    return get


def test_task_chat_trains_every_assistant_turn_in_a_recipe_that_does_not_say_so(tmp_path, real_tok):
    recipe = tmp_path / "my-chat.yaml"  # the chat recipe without its train.loss_on line
    recipe.write_text("\n".join(line for line in (paths.RECIPES_DIR / "chat.yaml").read_text().splitlines()
                                if "loss_on" not in line))
    cfg = config.load(str(recipe))
    assert cfg.train.loss_on == "assistant_turns"
    tok = real_tok("llama-bpe", "zephyr")
    turns = [t(U, "Where is order 12?"), t(A, "Order 12 shipped."), t(U, "And order 7?"), t(A, "Order 7 is packed.")]
    ids, labels = arch.get(cfg).encode_train(cfg, tok, arch.get(cfg).build(cfg, {"uid": "1", "messages": turns}))
    assert [tok.decode(ids[s:e], skip_special_tokens=True).strip() for s, e in answer_spans(labels)] == [
        "Order 12 shipped.", "Order 7 is packed."]


@pytest.mark.parametrize("name,template,eos", [("llama-bpe", "zephyr", 128001), ("llama-bpe", "alpaca", 128001),
                                               ("llama-spm", "zephyr", 2), ("llama-spm", "mistral", 2)])
def test_every_assistant_turn_and_its_end_of_turn_trained_nothing_else(real_tok, name, template, eos):
    tok = real_tok(name, template)
    system = [] if template == "mistral" else [t(S, "Answer briefly.")]
    turns = [*system, t(U, "Where is order 12?"), t(A, "Order 12 shipped."), t(U, "And order 7?"),
             t(A, "Order 7 is packed."), t(U, "Thanks. Hours in Reno?"), t(A, "Reno opens at 10am.")]
    cfg = config.load("chat")
    ex = arch.get(cfg).build(cfg, {"uid": "1", "messages": turns})
    ids, labels = prompts.encode_chat(tok, ex["prompt"], ex["completion"], all_turns=True)
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert [labels[i] for i in trained] == [ids[i] for i in trained]
    spans = answer_spans(labels)
    assert [tok.decode(ids[s:e], skip_special_tokens=True).strip() for s, e in spans] == [
        "Order 12 shipped.", "Order 7 is packed.", "Reno opens at 10am."]
    assert [ids[e - 1] for _, e in spans] == [eos] * 3  # each turn's end-of-turn token is trained
    assert sum(len(range(s, e)) for s, e in spans) == len(trained)  # nothing else is
    last_only = prompts.encode_chat(tok, ex["prompt"], ex["completion"])[1]
    assert [i for i, lab in enumerate(last_only) if lab != IGNORE] == list(range(*spans[-1]))


def test_tool_turns_kept_where_the_template_renders_them(real_tok):
    turns = [t(U, "What is 6 x 7?"), t(A, "calc(6*7)"), t("tool", "42"), t(A, "It is 42.")]
    assert conversations.unrenderable(real_tok("llama-bpe", "chatml"), turns) is None
    assert conversations.unrenderable(real_tok("llama-spm", "mistral"), turns) == "tool_turn_unsupported"
    assert conversations.unrenderable(real_tok("llama-spm", "zephyr"), turns) == "tool_turn_unsupported"  # left out
    assert conversations.unrenderable(real_tok("llama-spm", "mistral"), [t(A, "hi"), t(U, "q"), t(A, "a")]) == \
        "template_error"


def test_prepare_drops_what_keeps_no_trained_token_and_logs_the_share(ft_home, tmp_path):
    long = "word " * 400
    rows = [{"messages": [t(U, f"q {i}"), t(A, f"answer {i}")]} for i in range(30)] + [
        {"messages": [t(U, long), t(A, "cut away")]}]
    path = write(tmp_path / "d.jsonl", rows)
    sizes = ["--set", "data.train_size=20", "--set", "data.val_size=5", "--set", "data.test_size=6"]
    p = step("01_prepare", "--recipe", "chat", "--set", f"data.path={path}", "--set", "train.max_length=64", *sizes)
    rep = json.loads((ft_home / "data/processed/chat/prepare_report.json").read_text())
    assert rep["dropped"] == {"no_trained_token": 1} and rep["dropped_first_lines"] == {"no_trained_token": ["31"]}
    assert rep["kept"] == 30 and 0 < rep["trained_token_share"] < 1
    assert f"trained tokens: {100 * rep['trained_token_share']:.1f}%" in p.stderr + p.stdout
    p = step("01_prepare", "--recipe", "chat", "--set", f"data.path={path}", "--set", "train.max_length=4", *sizes,
             check=False)
    assert p.returncode == 2 and "no training example keeps a trained token within train.max_length=4" in p.stderr


# --------------------------------------------------------------------------- evaluation
def test_retrieval_baseline_answers_with_the_most_similar_train_prompt():
    def ex(q, a):
        return {"id": q, "prompt": [t(U, "hello"), t(A, "hi"), t(U, q)], "completion": [t(A, a)]}

    train = [ex("hours in Denver", "9 to 8"), ex("shipping to Japan", "$30")]
    got = chat.TASK.baselines(train, [ex("what does shipping to Japan cost", "?"), ex("Denver hours?", "?")])
    assert got == {"retrieval": ["$30", "9 to 8"]}


def test_held_out_answer_loss_is_paired_and_reported(ft_home):
    cfg = config.load("chat")
    rp = paths.RunPaths(cfg.run)
    rows = [{"id": str(i), "prompt": [t(U, f"q{i}")], "completion": [t(A, f"answer {i}")]} for i in range(40)]
    train = [{"id": "t", "prompt": [t(U, "q1")], "completion": [t(A, "answer 1")]}]
    texts = [f"answer {i}" for i in range(40)]
    base = compare.Answers(["no"] * 40, [True] * 40, [2.0] * 4, [3.0 + 0.01 * i for i in range(40)])
    tuned = compare.Answers(texts, [True] * 40, [2.1] * 4, [1.0 + 0.01 * i for i in range(40)])
    m, side = compare.compare(cfg, chat.TASK, rows, base, tuned, train)
    h = m["answer_loss"]
    assert h["examples"] == 40 and h["base_loss"] == pytest.approx(3.195) and h["tuned_loss"] == pytest.approx(1.195)
    assert h["mean"] == pytest.approx(-2.0) and h["verdict"] == "better" and h["ci_high"] < 0
    assert m["tuned"]["rougeL"] == 1.0 and m["strongest_baseline"] == "retrieval"
    assert m["baselines"]["retrieval"]["rougeL"] == pytest.approx(1 / 40 + 39 / 40 * 0.5)
    m["base_weights"] = {"source": "b", "why": "test"}
    compare.write(cfg, rp, m, side, [], {})
    md = (rp.eval / "report.md").read_text()
    assert "Held-out answer loss per token (40 `test` reference answers; lower is better): base 3.1950, tuned 1.1950" \
        in md and "the tuned model is **better than the base model**" in md


@pytest.mark.e2e
def test_make_all_chat_reports_verdicts_and_the_held_out_loss_and_the_demo_answers_a_prompt(tiny_run):
    run = tiny_run("chat", export=False)  # the export of this architecture is smollm2's
    rep = json.loads((run.data / "prepare_report.json").read_text())
    assert rep["dropped"]["duplicate"] > 0 and rep["repaired"] and 0 < rep["trained_token_share"] < 1
    m = json.loads((run.out / "eval" / "metrics.json").read_text())
    assert m["task"] == "chat" and m["strongest_baseline"] == "retrieval" and m["verdict"]["against"] == "retrieval"
    assert {"rougeL", "sacrebleu", "chrf", "len_ratio", "stop_rate"} <= set(m["tuned"])
    h = m["answer_loss"]
    assert h["examples"] == m["n_examples"] and h["ci_low"] <= h["mean"] <= h["ci_high"] and h["base_loss"] > 0
    assert "Held-out answer loss per token" in (run.out / "eval" / "report.md").read_text()
    demo = make(run.home, "demo", "RECIPE=chat", "TINY=1", "PROMPT=Where is my order TO-12345?")
    head = next(line for line in demo.stdout.splitlines() if line.startswith("BASE"))
    assert "TUNED (merged)" in head and demo.stdout.count("|") >= 2, demo.stdout[-2000:]
