"""Raw data in, processed splits out: file readers, the report of dropped rows, sampling and splitting.

Readers, all streamed: JSON lines, a JSON array (item by item, ijson), CSV (a quoted cell keeps its line breaks),
Parquet (by row batch), any of them gzipped (detected by content), and a dataset folder or hub id through
`datasets.load_dataset` (cached under FT_CACHE); BOM and CRLF are handled; rows that are not valid UTF-8, not JSON or
not an object are counted by reason with their first line numbers. What a record must contain is the task's
business (common/tasks/); turning a record into a prompt and answer is the architecture's (common/model/arch.py).
"""
from __future__ import annotations

import csv
import gzip
import html
import io
import itertools
import json
import logging
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from common.core import paths
from common.core.io import UserError

log = logging.getLogger("ft")
MAX_EXAMPLES = 5  # line numbers kept per drop reason
BOM = b"\xef\xbb\xbf"
CSV_CELL_MAX = 64 * 2**20  # characters; a longer CSV cell stops the run (usually a quote never closed)


class Report:
    """Rows read, rows dropped by reason and rows kept after a repair, each with the first few locations."""

    def __init__(self) -> None:
        self.read = 0
        self.dropped: Counter = Counter()
        self.where: dict[str, list] = defaultdict(list)
        self.repaired: Counter = Counter()
        self.repaired_where: dict[str, list] = defaultdict(list)

    def repair(self, what: str, where: Any) -> None:
        self.repaired[what] += 1
        if len(self.repaired_where[what]) < MAX_EXAMPLES:
            self.repaired_where[what].append(where)

    def drop(self, reason: str, where: Any) -> None:
        self.dropped[reason] += 1
        if len(self.where[reason]) < MAX_EXAMPLES:
            self.where[reason].append(where)


# --------------------------------------------------------------------------- reading
def resolve(path_setting: str) -> Path:
    """data.path as a checked file: relative paths are tried against the repository first."""
    path = Path(path_setting).expanduser()
    if not path.is_absolute():
        path = (paths.REPO / path) if (paths.REPO / path).exists() else path.resolve()
    if not path.exists():
        raise UserError(f"data file {path} does not exist; set DATA_PATH in .env or --set data.path=FILE")
    if path.is_dir():
        raise UserError(f"data path {path} is a folder; point data.path at the file itself (e.g. {path}/trn.json)")
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    return path


def _open_binary(path: Path) -> tuple[io.BufferedIOBase, Any]:
    raw = open(path, "rb")
    gz = raw.read(2) == b"\x1f\x8b"  # gzip magic, whatever the file is called
    raw.seek(0)
    return (gzip.GzipFile(fileobj=raw) if gz else raw), raw


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes with the line end) of a file, gunzipped, BOM removed, with a progress bar."""
    from tqdm.auto import tqdm

    f, raw = _open_binary(path)
    with f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                 leave=False) as bar:
        for n, b in enumerate(f, 1):
            if n % 2000 == 0:
                bar.update(raw.tell() - bar.n)
            yield n, (b[3:] if n == 1 and b.startswith(BOM) else b)


def detect_format(path: Path, fmt: str = "auto") -> str:
    """csv, json (an array), jsonl or parquet; 'auto' looks at the suffix (under .gz), Parquet's magic bytes and,
    for .json, the first byte."""
    if fmt != "auto":
        return fmt
    f, _ = _open_binary(path)
    with f:
        head = f.read(4096)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1].lower() if suffixes else ""
    if head.startswith(b"PAR1") or ext == ".csv":
        return "parquet" if head.startswith(b"PAR1") else "csv"
    # trn.json is JSON lines; a .json file starting with '[' is a JSON array
    return "json" if ext == ".json" and head.lstrip(BOM + b" \t\r\n").startswith(b"[") else "jsonl"


def iter_records(path: Path, fmt: str, rep: Report) -> Iterator[tuple[Any, dict]]:
    """(location, record dict) from JSON lines, a JSON array, CSV or Parquet; row-level faults are counted, not
    raised."""
    fmt = detect_format(path, fmt)
    if fmt in ("parquet", "csv", "json"):
        yield from {"parquet": _parquet, "csv": _csv, "json": _json_array}[fmt](path, rep)
        return
    for n, b in _raw_lines(path):  # JSON lines; a blank line is skipped
        try:
            line = b.decode("utf-8")
        except UnicodeDecodeError:
            rep.read += 1
            rep.drop("invalid_utf8", n)
            continue
        if not line.strip():
            continue
        rep.read += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rep.drop("bad_json", n)
            continue
        if isinstance(rec, dict):
            yield n, rec
        else:
            rep.drop("not_an_object", n)


def _csv(path: Path, rep: Report) -> Iterator[tuple[int, dict]]:
    """(first line of the row, row by header name) of a CSV file; a quoted cell keeps its line breaks as they are,
    a row with more cells than the header or with invalid UTF-8 is counted, a blank line skipped."""
    bad = [0]  # the last line that is not valid UTF-8 (kept as surrogates until its row is dropped)

    def text() -> Iterator[str]:
        for n, b in _raw_lines(path):
            try:
                yield b.decode("utf-8")
            except UnicodeDecodeError:
                bad[0] = n
                yield b.decode("utf-8", "surrogateescape")

    csv.field_size_limit(CSV_CELL_MAX)  # the csv module's own limit is 128 KiB
    reader, header, end = csv.reader(text()), None, 0  # end: the last line of the row before
    try:
        for row in reader:
            first, end = end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None and bad[0] < first:
                header = row
                continue
            rep.read += 1
            if bad[0] >= first:
                rep.drop("invalid_utf8", first)
            elif len(row) > len(header):
                rep.drop("extra_columns", first)
            else:
                yield first, dict(zip(header, row + [None] * (len(header) - len(row))))
    except csv.Error as e:
        hint = "is a quote never closed?" if "field limit" in str(e) else "fix the file or give JSON lines"
        raise UserError(f"{path}: line {end + 1}: not readable as CSV ({e}); {hint}") from None


def _json_array(path: Path, rep: Report) -> Iterator[tuple[str, dict]]:
    """(item N, record) of a JSON array, parsed one item at a time (ijson); a fault in the JSON is one line."""
    import ijson

    f, _ = _open_binary(path)
    with f:
        head = f.read(4096)
        start = 3 if head.startswith(BOM) else 0
        if (first := head[start:].lstrip(b" \t\r\n")[:1]) != b"[":
            raise UserError(f"{path}: expected a JSON array of records or JSON lines, found "
                            f"{'an object' if first == b'{' else 'no array'}")
        i, use_float = 0, True
        while True:
            f.seek(start)
            try:  # after a restart the items already given out are parsed again, not given again
                for rec in itertools.islice(ijson.items(f, "item", use_float=use_float), i, None):
                    rep.read += 1
                    if not isinstance(rec, dict):
                        rep.drop("not_an_object", f"item {i}")
                    else:  # the exact parse gives Decimals: turned into floats as json.loads gives them
                        yield f"item {i}", rec if use_float else json.loads(json.dumps(rec, default=float))
                    i += 1
                return
            except (ijson.JSONError, UnicodeDecodeError) as e:
                arg = e.args[0] if e.args else ""  # yajl gives bytes for some faults
                msg = arg.decode(errors="replace") if isinstance(arg, bytes) else str(e)
                if use_float and "integer overflow" in msg:  # a whole number past 64 bits: exact (slower) parse
                    use_float = False
                    continue
                lines = [x.strip() for x in msg.strip().splitlines()] or [type(e).__name__]
                near = f", near {lines[1][:60]!r}" if len(lines) > 2 else ""
                raise UserError(f"{path}: not a valid JSON array at item {i} ({lines[0]}{near}); for JSON lines use "
                                "--set data.format=jsonl") from None


def _parquet(path: Path, rep: Report) -> Iterator[tuple[Any, dict]]:
    """(row N, record) of a Parquet file, read one row batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f, _ = _open_binary(path)
    with f:
        try:
            table = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        n = 0
        for batch in table.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                rep.read += 1
                yield f"row {n}", rec


def _cache() -> Path:
    """The model cache (FT_CACHE, else outputs/.cache), where downloaded datasets are kept too."""
    import os

    return Path(os.environ.get("FT_CACHE") or paths.cache_dir())


def iter_dataset(source: str, split: str, rep: Report) -> Iterator[tuple[Any, dict]]:
    """(row N, record) of a dataset folder or hub id through `datasets.load_dataset`, cached under FT_CACHE; a
    failure to load is one line."""
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, cache_dir=str(_cache() / "datasets"))
    except Exception as e:  # noqa: BLE001 (no network, no such dataset or split, unreadable files: one line)
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"could not load dataset '{source}' split '{split}' ({type(e).__name__}: {msg}); check "
                        "the id or folder and data.split, or download the files and point data.path at one") from None
    for n, rec in enumerate(ds, 1):
        rep.read += 1
        yield f"row {n}", rec


def clean_text(s: str) -> str:
    """Unescape HTML entities (also double-escaped ones such as &amp;#8217;) and normalise whitespace."""
    for _ in range(2):
        if "&" not in s:
            break
        s = html.unescape(s)
    return re.sub(r"\s+", " ", s).strip()


def text_field(rec: dict, key: str, rep: Report, where: Any) -> str | None:
    """The cleaned text of rec[key] ('' for null); None (and a counted drop) when missing or not text."""
    if key not in rec:
        rep.drop(f"missing_{key}", where)
        return None
    v = rec[key]
    if v is None:
        return ""
    if not isinstance(v, str):
        rep.drop(f"non_string_{key}", where)
        return None
    return clean_text(v)


# --------------------------------------------------------------------------- sampling and splitting
def sizes(n: int, d: Any) -> tuple[list[int], str | None]:
    """Train/val/test counts for n clean records. When the recipe asks for more than there is, the counts are
    scaled down; train keeps at least one record, then test and val each get one while records remain."""
    if n < 1:
        raise UserError("no clean record to split")
    want = [d.train_size, d.val_size, d.test_size]
    counts = [int(x) if isinstance(x, int) else int(round(x * n)) for x in want]
    if sum(counts) <= n and counts[0] >= 1:
        return counts, None
    scale = n / max(1, sum(counts))
    scaled = [int(c * scale) for c in counts]
    scaled[0] += n - sum(scaled)  # what rounding left over goes to train
    for i in (2, 1):  # a split that was asked for gets one record, as long as train keeps one
        if counts[i] > 0 and scaled[i] == 0 and scaled[0] > 1:
            scaled[0] -= 1
            scaled[i] = 1
    return scaled, f"asked for {counts} train/val/test but only {n} clean records: scaled to {scaled}"


def collect(records: Iterator[tuple[str | None, dict]], keep: int | None, seed: int, rep: Report,
            duplicate_reason: str) -> list[dict]:
    """Drop repeated keys (None = no check), then a seeded reservoir sample of `keep` records (all when None)."""
    rng = random.Random(seed)
    seen: set[int] = set()
    out: list[dict] = []
    n = 0
    for key, fields in records:
        if key is not None:
            h = hash(key)
            if h in seen:
                rep.drop(duplicate_reason, fields["uid"])
                continue
            seen.add(h)
        n += 1
        if keep is None or len(out) < keep:
            out.append(fields)
        else:
            j = rng.randrange(n)
            if j < keep:
                out[j] = fields
    return out


def split_records(cfg: Any, task: Any, path: Path, rep: Report) -> tuple[dict[str, list[dict]], str | None]:
    """Clean records of `task` from `path`, sampled (data.sample), shuffled and split by the recipe's sizes."""
    d = cfg.data
    keep = d.sample
    if keep is None and all(isinstance(x, int) for x in (d.train_size, d.val_size, d.test_size)):
        keep = d.train_size + d.val_size + d.test_size
    share = keep if isinstance(keep, float) else None
    records = collect(task.records(path, cfg, rep), None if share else keep, d.seed, rep, task.duplicate_reason)
    if share is not None and 0 < share < 1:  # a subset fraction (flan-t5's --train_subset)
        records = random.Random(d.seed).sample(records, max(1, int(len(records) * share)))
    if not records:
        reasons = ", ".join(f"{k} {v}" for k, v in rep.dropped.most_common(4)) or "no rows"
        raise UserError(f"{path}: no usable record out of {rep.read} read ({reasons}); task {task.name} expects "
                        f"{task.expects}")
    random.Random(d.seed).shuffle(records)
    (n_tr, n_va, n_te), note = sizes(len(records), d)
    if note:
        log.warning(note)
    return {"train": records[:n_tr], "val": records[n_tr:n_tr + n_va],
            "test": records[n_tr + n_va:n_tr + n_va + n_te]}, note


def to_examples(cfg: Any, task: Any, architecture: Any, records: list[dict], seed: int, extend: bool) -> list[dict]:
    """Processed examples; with prompt.conversation_extension=k each chains k-1 other random records before it."""
    rng = random.Random(seed)
    k = cfg.prompt.conversation_extension if extend else 1
    out = []
    for i, fields in enumerate(records):
        others = [j for j in rng.sample(range(len(records)), min(k, len(records))) if j != i][: k - 1] if k > 1 else []
        ex = architecture.build(cfg, fields, [records[j] for j in others])
        out.append({"id": fields["uid"], **ex, **task.example_extra(fields)})
    return out


def percentiles(lengths: list[int], max_length: int) -> dict:
    lengths = sorted(lengths)
    pct = {f"p{p}": lengths[min(len(lengths) - 1, int(len(lengths) * p / 100))] for p in (50, 90, 99)}
    return {**pct, "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1), "longest": lengths[::-1][:256],
            "over_max_length": sum(x > max_length for x in lengths)}  # longest: make plan's worst micro-batch
