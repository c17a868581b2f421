"""The preference task by value: each pair format from each file type it can be in, detection and data.format, column
mapping, every drop reason with its line, the one-line errors, the split by prompt, and the shipped sample prepared
through scripts/01_prepare.py with its counts."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write

from common.core import config, paths
from common.core.io import UserError
from common.data import readers
from common.tasks import preference

U, A, S = "user", "assistant", "system"
PREPARE = importlib.import_module("scripts.01_prepare")


def t(role, content):
    return {"role": role, "content": content}


def recipe(tmp_path: Path, **data) -> Path:
    """recipes/smollm2.yaml's model and training with task: preference on `data` (the shipped sample by default)."""
    r = yaml.safe_load((paths.RECIPES_DIR / "smollm2.yaml").read_text())
    r.update(task="preference", prompt={"template": "chatml"}, data={"path": "data/sample/pairs.jsonl", **data})
    r.pop("sweep")
    f = tmp_path / "pairs-test.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


def read(tmp_path, path, *sets):
    """([(prompt, chosen, rejected)] kept, report) of the preference task on `path`."""
    cfg = config.load(str(recipe(tmp_path)), [f"data.path={path}", *sets])
    rep = readers.Report()
    kept = [(f["prompt"], f["chosen"], f["rejected"]) for _, f in preference.TASK.records(path, cfg, rep)]
    return kept, rep


STANDARD = [{"prompt": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
CONVERSATIONAL = [{"prompt": [t(U, f"q {i}")], "chosen": [t(A, f"good {i}")], "rejected": [t(A, f"bad {i}")]}
                  for i in range(3)]
HH = [{"chosen": f"\n\nHuman: q {i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q {i}\n\nAssistant: bad {i}"}
      for i in range(3)]
IMPLICIT_LISTS = [{"chosen": [t(U, f"q {i}"), t(A, f"good {i}")], "rejected": [t(U, f"q {i}"), t(A, f"bad {i}")]}
                  for i in range(3)]
ULTRAFEEDBACK = [{"prompt": f"q {i}", "chosen": [t(U, f"q {i}"), t(A, f"good {i}")],
                  "rejected": [t(U, f"q {i}"), t(A, f"bad {i}")], "messages": [t(U, f"q {i}"), t(A, f"good {i}")],
                  "score_chosen": 8.0, "score_rejected": 5.0} for i in range(3)]
INTEL = [{"system": "", "question": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
ARGILLA = [{"instruction": f"q {i}", "chosen_response": f"good {i}", "rejected_response": f"bad {i}"} for i in range(3)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"q {i}"}], "chosen": {"from": "gpt", "value": f"good {i}"},
             "rejected": {"from": "gpt", "value": f"bad {i}"}} for i in range(3)]
RANKING_MESSAGES = [{"messages": [t(U, f"q {i}")], "chosen": t(A, f"good {i}"), "rejected": t(A, f"bad {i}")}
                    for i in range(3)]
WANT = [([t(U, f"q {i}")], f"good {i}", f"bad {i}") for i in range(3)]
FORMATS = [("standard", STANDARD, "prompt/chosen/rejected", True),
           ("conversational", CONVERSATIONAL, "prompt/chosen/rejected (message lists)", False),
           ("implicit", HH, "chosen/rejected (no prompt)", True),
           ("implicit", IMPLICIT_LISTS, "chosen/rejected (no prompt)", False),
           ("ultrafeedback", ULTRAFEEDBACK, "prompt/chosen/rejected/score_chosen", False),
           ("columns", INTEL, "question/chosen/rejected", True),
           ("columns", ARGILLA, "instruction/chosen_response/rejected_response", True),
           ("sharegpt_ranking", SHAREGPT, "conversations/chosen/rejected", False),
           ("sharegpt_ranking", RANKING_MESSAGES, "messages/chosen/rejected", False)]
FILES = [(s, gz) for gz in (False, True) for s in (".jsonl", ".json", ".parquet", ".csv")]


@pytest.mark.parametrize("fmt,rows,keys,flat,suffix,gz", [
    (*f, *x) for f in FORMATS for x in FILES if f[3] or x[0] != ".csv"], ids=lambda v: v if isinstance(v, str) else "")
def test_every_format_from_every_file_type(tmp_path, fmt, rows, keys, flat, suffix, gz, caplog):
    """CSV holds the flat formats (strings in columns) only."""
    path = write(tmp_path / f"data{suffix}", rows, gz)
    with caplog.at_level("INFO", logger="ft"):
        kept, rep = read(tmp_path, path)
    assert kept == WANT and rep.read == 3 and not rep.dropped
    assert f"pair format: {fmt}, from keys {keys} in the first 3 records" in caplog.text


def test_system_prompts_and_multi_turn_prompts_are_kept(tmp_path):
    rows = [{"system": "Be kind.", "question": "q", "chosen": "good", "rejected": "bad"},
            {"system": "Be kind.", "question": "q2", "chosen": "good", "rejected": "bad"}]
    kept, _ = read(tmp_path, write(tmp_path / "d.csv", rows))
    assert kept[0] == ([t(S, "Be kind."), t(U, "q")], "good", "bad")
    hh = [{"chosen": "Human: hi\n\nAssistant: hello\n\nHuman: q\n\nAssistant: good",
           "rejected": "Human: hi\n\nAssistant: hello\n\nHuman: q\n\nAssistant: bad"}]
    kept, _ = read(tmp_path, write(tmp_path / "hh.jsonl", hh))
    assert kept == [([t(U, "hi"), t(A, "hello"), t(U, "q")], "good", "bad")]


def test_a_dataset_folder_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "my_pairs"
    folder.mkdir()
    write(folder / "train.jsonl", ULTRAFEEDBACK)
    assert preference.TASK.source(str(folder)) == folder and preference.TASK.source("hub:me/p") == "hub:me/p"
    kept, rep = read(tmp_path, folder)
    assert kept == WANT and rep.read == 3


def test_detection_explicit_format_and_column_mapping(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", [{"query": f"q {i}", "good": f"good {i}", "bad": f"bad {i}"} for i in range(3)])
    with pytest.raises(UserError, match=r"no preference pair format in the first 3 records \(keys seen: query, good, "
                                        r"bad\)") as e:
        read(tmp_path, path)
    assert "\n" not in str(e.value)
    kept, _ = read(tmp_path, path, "data.columns={prompt: query, chosen: good, rejected: bad}")
    assert kept == WANT
    with pytest.raises(UserError, match="data.columns has unknown column 'answer'"):
        read(tmp_path, path, "data.columns={answer: good}")
    mixed = write(tmp_path / "m.jsonl", [*STANDARD, CONVERSATIONAL[0]])
    with caplog.at_level("INFO", logger="ft"):
        kept, rep = read(tmp_path, mixed)
    assert kept == WANT and rep.where == {"other_format": [4]} and "1 of another or no format" in caplog.text
    with caplog.at_level("INFO", logger="ft"):
        kept, rep = read(tmp_path, mixed, "data.format=conversational")
    assert kept == WANT[:1] and rep.where == {"other_format": [1, 2, 3]}
    assert "pair format: conversational (data.format); detected: pair format: standard" in caplog.text


def test_every_drop_reason_with_its_line(tmp_path):
    def pair(p, c, r):
        return {"prompt": p, "chosen": c, "rejected": r}

    ok = pair([t(U, "q")], [t(A, "good")], [t(A, "bad")])
    rows = [
        ok,                                                                       # 1 kept
        pair([t(U, "q")], [t(A, "same")], [t(A, " same ")]),                      # 2 identical sides
        pair([t(U, "q")], [t(A, "good")], [t(A, "")]),                            # 3 empty side
        {"prompt": [t(U, "q")], "chosen": [t(A, "good")]},                         # 4 missing side
        pair([t(U, "")], [t(A, "good")], [t(A, "bad")]),                          # 5 empty prompt
        pair([t(U, "q"), t(S, "late")], [t(A, "good")], [t(A, "bad")]),           # 6 system turn not first
        pair([t(U, "q"), t(A, "a")], [t(A, "good")], [t(A, "bad")]),              # 7 prompt ends on an answer
        pair([t("narrator", "q")], [t(A, "good")], [t(A, "bad")]),                # 8 unknown role, named
        pair([t(U, "q")], [t(U, "good")], [t(A, "bad")]),                         # 9 a side that is no answer
        {"title": "x", "content": "y"},                                           # 10 no pair at all
        ok,                                                                       # 11 the same pair again
    ]
    path = write(tmp_path / "d.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"prompt": [{"role": "user", "content": "trunc\n\xff\xfe binary\n[1, 2]\n')  # 12-14
    cfg = config.load(str(recipe(tmp_path)), [f"data.path={path}"])
    rep = readers.Report()
    got = readers.collect(preference.TASK.records(path, cfg, rep), None, 0, rep, preference.TASK.duplicate_reason)
    assert [g["uid"] for g in got] == ["1"] and rep.read == 14
    assert dict(rep.where) == {"identical_sides": [2], "empty_side": [3, 4], "empty_prompt": [5],
                               "misplaced_system_turn": [6], "prompt_not_ending_on_user": [7],
                               "unknown_role_narrator": [8], "side_not_an_answer": [9], "no_pair": [10],
                               "duplicate_pair": ["11"], "bad_json": [12], "invalid_utf8": [13], "not_an_object": [14]}


def test_implicit_and_scored_drops_with_their_lines(tmp_path):
    hh = [HH[0],
          {"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: good",   # 2 they part before the end
           "rejected": "\n\nHuman: a\n\nAssistant: y\n\nHuman: b\n\nAssistant: bad"},
          {"chosen": "good answer", "rejected": "bad answer"},                       # 3 no turn markers: no prompt
          {"chosen": HH[1]["chosen"], "rejected": HH[1]["chosen"]},                   # 4 identical
          {"chosen": HH[1]["chosen"], "rejected": "\n\nHuman: q 1\n\nAssistant:"},    # 5 empty last answer
          {"chosen": HH[2]["chosen"]}]                                                # 6 a side missing
    kept, rep = read(tmp_path, write(tmp_path / "hh.jsonl", hh))
    assert kept == WANT[:1]
    assert rep.where == {"no_shared_prompt": [2, 3], "identical_sides": [4], "empty_side": [5, 6]}
    scored = [ULTRAFEEDBACK[0], {**ULTRAFEEDBACK[1], "score_rejected": 8.0}, {**ULTRAFEEDBACK[2], "score_chosen": 1}]
    kept, rep = read(tmp_path, write(tmp_path / "uf.jsonl", scored))
    assert kept == WANT[:1] and rep.where == {"tied_scores": [2], "chosen_scored_lower": [3]}


def test_nothing_usable_is_one_line_with_format_reasons_and_lines(tmp_path):
    rows = [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3 + [{"prompt": "q", "chosen": "a"}] * 2
    with pytest.raises(UserError) as e:
        read(tmp_path, write(tmp_path / "d.jsonl", rows))
    msg = str(e.value)
    assert "\n" not in msg and "no usable preference pair out of 5 read as format standard" in msg
    assert "identical_sides 3 (first at 1, 2, 3); empty_side 2 (first at 4, 5)" in msg
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    with pytest.raises(UserError, match=r"no readable record in its first 3 rows \(bad_json 2, invalid_utf8 1\)"):
        read(tmp_path, bad)


def test_split_by_prompt_keeps_every_pair_of_a_prompt_in_one_split():
    recs = [{"uid": str(i), "prompt": [t(U, f"q {i % 7}")], "chosen": "c", "rejected": f"r {i}"} for i in range(30)]
    parts = preference.by_prompt(recs, [20, 4, 6])
    held = {k: {v["prompt"][0]["content"] for v in rows} for k, rows in parts.items()}
    assert not (held["train"] & held["val"] or held["train"] & held["test"] or held["val"] & held["test"])
    assert sum(map(len, parts.values())) == 30 and len(parts["test"]) >= 6 and len(parts["val"]) >= 4
    one = preference.by_prompt(recs[:1], [1, 0, 1])  # a single prompt: train keeps it, test goes without
    assert len(one["train"]) == 1 and not one["test"]


def prepare(home: Path, recipe_file: Path, *sets: str) -> dict:
    assert PREPARE.main(["--recipe", str(recipe_file), *[a for s in sets for a in ("--set", s)]]) == 0
    return json.loads((home / "data/processed" / recipe_file.stem / "prepare_report.json").read_text())


def test_shipped_sample_prepared_split_by_prompt(ft_home, tmp_path):
    """data/sample/pairs.jsonl through scripts/01_prepare.py: its drops, the split by prompt, TRL's rows."""
    f = recipe(tmp_path, train_size=460, val_size=30, test_size=98, seed=42)
    rep = prepare(ft_home, f)
    assert rep["read"] == 606 and rep["kept"] == 588
    assert rep["dropped"] == {"duplicate_pair": 6, "identical_sides": 6, "empty_side": 6}
    assert rep["dropped_first_lines"]["identical_sides"][:2] == [32, 119]
    run = ft_home / "data/processed" / f.stem
    rows = {k: [json.loads(x) for x in (run / f"{k}.jsonl").read_text().splitlines()] for k in ("train", "val", "test")}
    assert {k: len(v) for k, v in rows.items()} == rep["splits"] and sum(rep["splits"].values()) == 588
    assert len(rows["test"]) >= 98 and len(rows["val"]) >= 30
    prompts_of = {k: {json.dumps(r["prompt"]) for r in v} for k, v in rows.items()}
    assert not (prompts_of["train"] & prompts_of["test"] or prompts_of["train"] & prompts_of["val"]
                or prompts_of["val"] & prompts_of["test"])
    r = rows["test"][0]
    assert set(r) == {"id", "prompt", "chosen", "rejected", "completion"} and r["completion"] == r["chosen"]
    assert r["prompt"][-1]["content"].startswith("Write the product description for this title.\nTitle: ")
    assert rep["token_lengths"]["train"]["p50"] > 40  # both answers of a pair counted
    assert 0 < rep["trained_token_share"] < 1


def test_prepare_drops_a_pair_with_a_side_cut_to_nothing_and_refuses_replay(ft_home, tmp_path, capsys):
    rows = [{"prompt": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
    rows.append({"prompt": "q", "chosen": "short", "rejected": "word " * 200})  # 31: rejected survives, chosen fits
    rows.append({"prompt": "word " * 200, "chosen": "a", "rejected": "b"})  # 32: no answer token on either side
    path = write(tmp_path / "d.jsonl", rows)
    f = recipe(tmp_path, path=str(path), train_size=20, val_size=5, test_size=7)
    rep = prepare(ft_home, f, "train.max_length=64")
    assert rep["dropped"] == {"no_trained_token": 1} and rep["dropped_first_lines"] == {"no_trained_token": ["32"]}
    assert rep["kept"] == 31 and max(s["max"] for s in rep["token_lengths"].values()) > 200  # the rejected side
    assert PREPARE.main(["--recipe", str(f), "--set", "data.replay=0.25"]) == 2
    assert "data.replay=0.25: replayed text is for supervised training" in capsys.readouterr().err


def test_val_extra_takes_only_prompts_no_split_holds(ft_home, tmp_path):
    f = recipe(tmp_path, train_size=100, val_size=10, test_size=20, val_extra=40, seed=3)
    rep = prepare(ft_home, f)
    run = ft_home / "data/processed" / f.stem
    held = {k: {json.dumps(json.loads(x)["prompt"]) for x in (run / f"{k}.jsonl").read_text().splitlines()}
            for k in ("train", "val", "test")}
    assert rep["val_extra"] == 40 and rep["splits"]["val"] >= 50
    assert not (held["val"] & held["train"] or held["val"] & held["test"])


def test_the_shipped_sample_is_what_its_generator_writes(tmp_path):
    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, str(paths.REPO / "data/sample/generate_pairs.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == (paths.REPO / "data/sample/pairs.jsonl").read_bytes()
