"""File readers at real size, in seconds: a CSV cell keeps its line breaks and may be long, a JSON array is read
item by item (memory stays far below the file's size) with the same records, locations and one-line faults as a
whole-file parse."""
from __future__ import annotations

import csv
import gzip
import json
import tracemalloc

import pytest

from common.core import config
from common.core.io import UserError
from common.data import readers
from common.tasks import chat, product_description

CODE = "def f():\n    return 1\n\n\n# blank lines above\r\nand a CRLF"


@pytest.fixture
def csv_limit():
    """The csv module's field size limit is process-wide: put back whatever it was."""
    before = csv.field_size_limit()
    yield
    csv.field_size_limit(before)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_multi_line_cell_is_kept_exactly_with_the_first_line_of_its_row(tmp_path, csv_limit):
    path = write_csv(tmp_path / "d.csv", ["prompt", "completion"], [
        ["Write f", CODE],              # lines 2-7
        ["one\ntwo", "x", "extra"],     # lines 8-9: more cells than the header
        ["q", ""],                      # line 10: empty answer
        ["last", "answer\n"],           # lines 11-12
    ])
    rep = readers.Report()
    rows = list(readers.iter_records(path, "auto", rep))
    assert rows == [(2, {"prompt": "Write f", "completion": CODE}), (10, {"prompt": "q", "completion": ""}),
                    (11, {"prompt": "last", "completion": "answer\n"})]
    assert rep.read == 4 and dict(rep.where) == {"extra_columns": [8]}

    cfg = config.load("chat", [f"data.path={path}"])  # the conversation CSV, as prepare reads it
    rep = readers.Report()
    got = list(chat.TASK.records(path, cfg, rep))
    assert [f["uid"] for _, f in got] == ["2", "11"]
    assert got[0][1]["messages"][1] == {"role": "assistant", "content": CODE}
    assert dict(rep.where) == {"extra_columns": [8], "empty_turn": [10]}


def test_a_product_csv_cell_over_lines_keeps_its_words_apart(tmp_path, csv_limit):
    path = write_csv(tmp_path / "p.csv", ["uid", "title", "content"],
                     [["a", "Kettle", "Boils water.\nSwitches off\n\nby itself."]])
    cfg = config.load("smollm2", [f"data.path={path}"])
    got = [f for _, f in product_description.TASK.records(path, cfg, readers.Report())]
    assert got == [{"uid": "a", "title": "Kettle", "content": "Boils water. Switches off by itself."}]


def test_a_cell_over_128_kib_is_read_and_one_over_the_limit_is_one_line(tmp_path, csv_limit, monkeypatch):
    big = ("word " * 60_000 + "\n") * 2  # 600 KB with a line break: over the csv module's own 128 KiB limit
    path = write_csv(tmp_path / "big.csv", ["prompt", "completion"], [["q", "a"], ["long", big], ["after", "b"]])
    rows = list(readers.iter_records(path, "csv", readers.Report()))
    assert [r[0] for r in rows] == [2, 3, 6] and rows[1][1]["completion"] == big

    monkeypatch.setattr(readers, "CSV_CELL_MAX", 100_000)
    with pytest.raises(UserError, match=rf"^{path}: line 3: not readable as CSV \(field larger than field limit") as e:
        list(readers.iter_records(path, "csv", readers.Report()))
    assert "\n" not in str(e.value) and "quote never closed" in str(e.value)


def test_invalid_utf8_in_a_multi_line_row_drops_that_row_at_its_first_line(tmp_path, csv_limit):
    path = tmp_path / "u.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,completion\r\nq,"one\r\n\xff two"\r\n\r\nq2,a2\r\n')
    rep = readers.Report()
    assert list(readers.iter_records(path, "csv", rep)) == [(5, {"prompt": "q2", "completion": "a2"})]
    assert rep.read == 2 and dict(rep.where) == {"invalid_utf8": [2]}


def array_bytes(n: int) -> bytes:
    """A ShareGPT-style JSON array of n conversations of about 1 KB each."""
    turn = "lorem ipsum dolor sit amet " * 18
    return ("[" + ",\n".join(json.dumps({"id": i, "conversations": [
        {"from": "human", "value": f"question {i} {turn}"}, {"from": "gpt", "value": f"answer {i} {turn}"}]})
        for i in range(n)) + "]").encode()


def test_a_json_array_is_read_item_by_item(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(array_bytes(20_000))  # about 21 MB
    size = path.stat().st_size
    rep = readers.Report()
    tracemalloc.start()
    try:
        n = last = 0
        for where, rec in readers.iter_records(path, "auto", rep):
            n, last = n + 1, rec["id"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 20_000 and last == 19_999 and rep.read == 20_000
    assert peak < size / 10, f"peak {peak / 1e6:.1f} MB of Python memory for a {size / 1e6:.0f} MB array"


SMALL = [{"id": 1, "f": 0.1, "e": -1.5e-300, "t": "é \u2028 \\n", "nested": [{"x": None}, True]},
         7, "text", {"conversations": []}, None, [1],
         {"big": 2**70, "f": 1e308}]  # past 64 bits: the parse starts again, exact, and gives no item twice


@pytest.mark.parametrize("wrap", ["plain", "bom", "gzip"])
def test_a_json_array_gives_what_a_whole_file_parse_gives(tmp_path, wrap):
    data = json.dumps(SMALL, ensure_ascii=False, indent=1).encode()
    data = {"plain": data, "bom": b"\xef\xbb\xbf\n " + data, "gzip": gzip.compress(data)}[wrap]
    path = tmp_path / "a.json"
    path.write_bytes(data)
    rep = readers.Report()
    got = list(readers.iter_records(path, "auto", rep))
    want = [(f"item {i}", r) for i, r in enumerate(SMALL) if isinstance(r, dict)]
    assert json.dumps(got) == json.dumps(want)  # floats as floats (a Decimal would not serialise), ints exact
    assert type(got[0][1]["f"]) is float and type(got[-1][1]["f"]) is float and got[-1][1]["big"] == 2**70
    assert rep.read == len(SMALL) and dict(rep.where) == {"not_an_object": ["item 1", "item 2", "item 4", "item 5"]}


@pytest.mark.parametrize("content,match", [
    (b'[{"a": 1}, {"a" 2}, {"a": 3}]', r"not a valid JSON array at item 1 \(parse error: object key and value"),
    (b'[{"a": 1}, {"a": 2}', r"not a valid JSON array at item 2 \(parse error: premature EOF"),
    (b'[{"a": 1}] [2]', r"not a valid JSON array at item 1 \(parse error: trailing garbage, near '\[\{\"a\": 1\}\] "),
    (b'[{"a": "\xff"}]', r"not a valid JSON array at item 0 \(lexical error: invalid bytes in UTF8 string"),
    (b'{"a": [1, 2]}', r"expected a JSON array of records or JSON lines, found an object"),
])
def test_a_malformed_json_array_is_one_line_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"^{path}: {match}") as e:
        list(readers.iter_records(path, "json", readers.Report()))
    assert "\n" not in str(e.value)
