"""Cleaning rules, row-level faults counted by reason, file-level faults as one line, split determinism."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import step

from common.core import paths
from common.data import readers

GOOD = [{"uid": f"U{i}", "title": f"Acme Widget {i}", "content": f"A sturdy widget number {i} for the kitchen and home.",
         "target_ind": [i], "target_rel": [1.0]} for i in range(40)]
FAST = ["--set", "data.train_size=20", "--set", "data.val_size=5", "--set", "data.test_size=5"]


def write_jsonl(path: Path, rows: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def prepare(ft_home, data: Path, *extra: str, check=True, recipe="smollm2"):
    return step("01_prepare", "--recipe", recipe, "--set", f"data.path={data}", *FAST, *extra, check=check)


def report(ft_home, run="smollm2") -> dict:
    return json.loads((ft_home / "data/processed" / run / "prepare_report.json").read_text())


def test_clean_text_unescapes_entities_and_whitespace():
    assert readers.clean_text("It&#8217;s  a\n\t&quot;great&quot;  gift &amp;amp; more ") == "It’s a \"great\" gift & more"
    assert readers.clean_text("   ") == ""


def test_cleaning_drops_by_reason(ft_home, tmp_path):
    rows = GOOD + [
        {"uid": "e1", "title": "", "content": "A description long enough to keep."},
        {"uid": "e2", "title": "Acme Thing", "content": ""},
        {"uid": "e3", "title": None, "content": "A description long enough to keep."},
        {"uid": "e4", "title": "ab", "content": "A description long enough to keep."},
        {"uid": "e5", "title": "Acme Short", "content": "too short"},
        {"uid": "e6", "title": "Acme Widget 1", "content": "Duplicate title of an earlier record, different text."},
        {"uid": "e7", "title": 12345, "content": "A number where the title should be text."},
        {"uid": "e8", "content": "No title field at all in this record."},
        {"uid": "e9", "title": "Acme Huge", "content": "x" * 1_000_000},
    ]
    data = write_jsonl(tmp_path / "trn.json", rows, [b"{not json", b"[1, 2]", b"\xff\xfe broken utf8 \xff"])
    prepare(ft_home, data)
    r = report(ft_home)
    assert r["read"] == len(rows) + 3
    assert r["kept"] == 30  # 20 + 5 + 5 sampled from the 40 good records
    d = r["dropped"]
    assert d["empty_title"] == 2 and d["empty_content"] == 1  # null counts as empty
    assert d["short_title"] == 1 and d["short_content"] == 1 and d["duplicate_title"] == 1
    assert d["non_string_title"] == 1 and d["missing_title"] == 1 and d["long_content"] == 1
    assert d["bad_json"] == 1 and d["not_an_object"] == 1 and d["invalid_utf8"] == 1
    n = len(GOOD)
    assert r["dropped_first_lines"]["bad_json"] == [len(rows) + 1]
    assert r["dropped_first_lines"]["empty_title"][0] == n + 1
    train = [json.loads(x) for x in (ft_home / "data/processed/smollm2/train.jsonl").read_text().splitlines()]
    assert len(train) == 20
    assert train[0]["prompt"][-1]["role"] == "user" and train[0]["completion"][0]["role"] == "assistant"
    assert train[0]["title"] in train[0]["prompt"][-1]["content"]
    assert r["token_lengths"]["train"]["max"] > 0 and r["meta"]["recipe"] == "smollm2"


def test_bom_crlf_gzip_csv_and_json_array_read_alike(ft_home, tmp_path):
    body = "".join(json.dumps(r) + "\r\n" for r in GOOD).encode()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + body)
    with gzip.open(tmp_path / "trn.json.gz", "wb") as f:
        f.write(body)
    (tmp_path / "arr.json").write_text(json.dumps(GOOD))
    import csv
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uid", "title", "content"], extrasaction="ignore")
        w.writeheader()
        w.writerows(GOOD)
    outputs = []
    for name in ("bom.json", "trn.json.gz", "arr.json", "t.csv"):
        prepare(ft_home, tmp_path / name)
        r = report(ft_home)
        assert r["read"] == 40 and r["kept"] == 30 and r["dropped"] == {}, name
        outputs.append((ft_home / "data/processed/smollm2/train.jsonl").read_bytes())
    assert len(set(outputs)) == 1  # same records, same seed -> same split, whatever the container


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(ft_home, tmp_path):
    data = write_jsonl(tmp_path / "trn.json", GOOD)
    prepare(ft_home, data)
    first = {s: (ft_home / f"data/processed/smollm2/{s}.jsonl").read_bytes() for s in ("train", "val", "test")}
    prepare(ft_home, data)
    again = {s: (ft_home / f"data/processed/smollm2/{s}.jsonl").read_bytes() for s in ("train", "val", "test")}
    assert first == again
    prepare(ft_home, data, "--set", "data.seed=7")
    other = (ft_home / "data/processed/smollm2/train.jsonl").read_bytes()
    assert other != first["train"]
    ids = lambda b: {json.loads(x)["id"] for x in b.decode().splitlines()}  # noqa: E731
    assert not (ids(first["train"]) & ids(first["test"]))  # splits never overlap


def _file(p: Path, name: str, data: bytes) -> Path:
    (p / name).write_bytes(data)
    return p / name


@pytest.mark.parametrize("make_bad, fragment", [
    (lambda p: p / "missing.json", "does not exist"),
    (lambda p: p, "is a folder"),
    (lambda p: _file(p, "empty.json", b""), "is empty"),
    (lambda p: _file(p, "bin.json", bytes(range(256)) * 50), "no usable record"),
    (lambda p: _file(p, "wrong.json", b'{"name": "x", "text": "y"}\n' * 5),
     "no usable record out of 5 read (missing_title 5)"),
])
def test_file_level_faults_are_one_line_and_write_nothing(ft_home, tmp_path, make_bad, fragment):
    bad = make_bad(tmp_path)
    p = prepare(ft_home, bad, check=False)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and fragment in err[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (ft_home / "data/processed/smollm2/prepare_report.json").exists()
    assert not (ft_home / "data/processed/smollm2/train.jsonl").exists()


def test_debug_flag_shows_the_traceback(ft_home, tmp_path):
    p = prepare(ft_home, tmp_path / "missing.json", "--debug", check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_shipped_sample_has_the_real_files_quirks():
    rows = [json.loads(x) for x in (paths.REPO / "data/sample/trn.json").read_text().splitlines()]
    assert len(rows) >= 1500
    assert all(set(r) == {"uid", "title", "content", "target_ind", "target_rel"} for r in rows)
    empty = sum(1 for r in rows if not r["content"]) / len(rows)
    assert 0.3 < empty < 0.5
    assert any("&#8217;" in r["content"] or "&amp;" in r["content"] for r in rows)
    assert len({r["title"] for r in rows}) < len(rows)
    assert max(len(r["content"]) for r in rows) > 2000


def test_forecast_csv_rows_validated_and_missing_columns_named(ft_home, tmp_path):
    import csv

    src = paths.REPO / "data/sample/xauusd.csv"
    step("01_prepare", "--recipe", "smollm2-xauusd", "--set", "data.train_size=40", "--set", "data.val_size=5",
         "--set", "data.test_size=5")
    r = report(ft_home, "smollm2-xauusd")
    assert r["dropped"] == {"bad_direction": 1, "bad_magnitude": 1, "missing_target": 1, "empty_headline": 1}
    assert "direction_6h='sideways'" in r["dropped_first_lines"]["bad_direction"][0]
    ex = json.loads((ft_home / "data/processed/smollm2-xauusd/test.jsonl").read_text().splitlines()[0])
    target = json.loads(ex["completion"][0]["content"])
    assert set(target) == {"6h", "12h", "24h", "48h"} and target["6h"]["direction"] in ("up", "down", "flat")
    rows = list(csv.DictReader(src.open()))
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k not in ("magnitude_48h", "symbol")])
        w.writeheader()
        for row in rows[:5]:
            w.writerow({k: v for k, v in row.items() if k in w.fieldnames})
    p = step("01_prepare", "--recipe", "smollm2-xauusd", "--set", f"data.path={bad}", check=False)
    assert p.returncode == 2 and "missing required column(s) symbol, magnitude_48h" in p.stderr


def test_conversation_extension_chains_other_records(ft_home):
    """llama3-sharegpt: every train/val chat holds 3 user turns from 3 different records; test stays single-turn."""
    step("01_prepare", "--recipe", "llama3-sharegpt", "--tiny")
    d = ft_home / "data/processed/llama3-sharegpt-tiny"
    for split, turns in (("train", 3), ("val", 3), ("test", 1)):
        for line in (d / f"{split}.jsonl").read_text().splitlines():
            ex = json.loads(line)
            users = [m["content"] for m in ex["prompt"] if m["role"] == "user"]
            assert len(users) == turns and len(set(users)) == turns, (split, users)
            assert ex["prompt"][0]["role"] == "system"
