"""Clean the raw data, take a seeded sample and split, and format every example for the recipe.

    make prepare RECIPE=smollm2        # or: python scripts/01_prepare.py --recipe smollm2 [--set data.path=...]

Reads data.path (DATA_PATH in .env or the shell replaces it):
  task product_description: the AmazonTitles-1.3MM trn.json (JSON lines: uid, title, content, target_ind,
      target_rel); also .jsonl, a .json array, .csv, any of them gzipped (.gz). JSON lines and CSV stream,
      so a 2 GB trn.json never sits in memory whole.
  task xauusd_forecast: a CSV of headlines with market context and direction/magnitude targets per horizon.
Cleaning: HTML entities unescaped, whitespace normalised, empty/null/too short/too long/duplicate records
dropped. Bad rows (broken JSON, invalid UTF-8, wrong types, unknown directions ...) are skipped and counted by
reason with their first line numbers; a file with no usable row stops with one line saying why.

Writes (atomically) data/processed/<run>/: train.jsonl, val.jsonl, test.jsonl (prompt/completion in the
recipe's format: chat messages for causal models, text for seq2seq) and, last, prepare_report.json (read, kept,
dropped by reason, split sizes, token-length percentiles, recipe, git commit, time).
"""
from __future__ import annotations

import csv
import gzip
import html
import io
import json
import logging
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from common import paths, prompts, run
from common.run import UserError

log = logging.getLogger("ft")

HORIZONS = ("6h", "12h", "24h", "48h")
DIRECTIONS = ("up", "down", "flat")
XAU_CONTEXT = ["generated_headline", "label", "sentiment_strength", "explanation", "symbol", "symbol_name",
               "correlation_description"]
XAU_TARGETS = [f"{kind}_{h}" for h in HORIZONS for kind in ("direction", "magnitude")]
MAX_EXAMPLES = 5  # line numbers kept per drop reason


class Report:
    def __init__(self) -> None:
        self.read = 0
        self.dropped: Counter = Counter()
        self.where: dict[str, list] = defaultdict(list)

    def drop(self, reason: str, where: Any) -> None:
        self.dropped[reason] += 1
        if len(self.where[reason]) < MAX_EXAMPLES:
            self.where[reason].append(where)


# --------------------------------------------------------------------------- reading
def _open_binary(path: Path) -> tuple[io.BufferedIOBase, Any]:
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw), raw
    raw.seek(0)
    return raw, raw


def _progress(path: Path):
    from tqdm.auto import tqdm

    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False)


def _lines(path: Path, rep: Report) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for each non-empty line; BOM and CRLF handled, invalid UTF-8 counted."""
    f, raw = _open_binary(path)
    with f, _progress(path) as bar:
        last = 0
        for n, b in enumerate(f, 1):
            if n % 2000 == 0:
                pos = raw.tell()
                bar.update(pos - last)
                last = pos
            if n == 1 and b.startswith(b"\xef\xbb\xbf"):
                b = b[3:]
            try:
                line = b.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                rep.read += 1
                rep.drop("invalid_utf8", n)
                continue
            if line.strip():
                yield n, line


def _fmt(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1].lower() if suffixes else ""
    if ext == ".csv":
        return "csv"
    if ext == ".json":  # trn.json is JSON lines; a file starting with '[' is a JSON array
        f, _ = _open_binary(path)
        with f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if head.startswith(b"[") else "jsonl"
    return "jsonl"


def iter_records(path: Path, fmt: str, rep: Report) -> Iterator[tuple[Any, dict]]:
    """(location, record dict) from JSON lines, a JSON array or CSV; row-level faults are counted, not raised."""
    fmt = _fmt(path, fmt)
    if fmt == "csv":
        lines = _lines(path, rep)
        line_no = {"n": 0}

        def text() -> Iterator[str]:
            for n, line in lines:
                line_no["n"] = n
                yield line

        reader = csv.DictReader(text())
        for row in reader:
            rep.read += 1
            if None in row:  # more cells than the header has columns
                rep.drop("extra_columns", line_no["n"])
                continue
            yield line_no["n"], row
        return
    if fmt == "json":
        f, _ = _open_binary(path)
        try:
            with f:
                data = json.loads(f.read().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a valid JSON array ({e}); for JSON lines use --set data.format=jsonl") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records or JSON lines, found a {type(data).__name__}")
        for i, rec in enumerate(data):
            rep.read += 1
            if isinstance(rec, dict):
                yield f"item {i}", rec
            else:
                rep.drop("not_an_object", f"item {i}")
        return
    for n, line in _lines(path, rep):
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


def clean_text(s: str) -> str:
    """Unescape HTML entities (also double-escaped ones such as &amp;#8217;) and normalise whitespace."""
    for _ in range(2):
        if "&" not in s:
            break
        s = html.unescape(s)
    return re.sub(r"\s+", " ", s).strip()


def _text_field(rec: dict, key: str, rep: Report, where: Any) -> str | None:
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


# --------------------------------------------------------------------------- tasks
def product_records(path: Path, cfg: Any, rep: Report) -> Iterator[tuple[str, dict]]:
    """(dedupe key, fields) of clean AmazonTitles records."""
    d = cfg.data
    for where, rec in iter_records(path, d.format, rep):
        title = _text_field(rec, "title", rep, where)
        if title is None:
            continue
        content = _text_field(rec, "content", rep, where)
        if content is None:
            continue
        if not title:
            rep.drop("empty_title", where)
        elif not content:
            rep.drop("empty_content", where)
        elif len(title) < d.min_title_chars:
            rep.drop("short_title", where)
        elif len(content) < d.min_content_chars:
            rep.drop("short_content", where)
        elif d.max_content_chars and len(content) > d.max_content_chars:
            rep.drop("long_content", where)
        else:
            uid = rec.get("uid")
            yield title.lower(), {"uid": str(uid) if uid is not None else str(where), "title": title,
                                  "content": content}


def xau_records(path: Path, cfg: Any, rep: Report) -> Iterator[tuple[str, dict]]:
    """(dedupe key, fields) of valid forecast rows; fields['target_json'] is the compact JSON answer."""
    first = True
    for where, row in iter_records(path, "csv", rep):
        if first:
            missing = [c for c in XAU_CONTEXT + XAU_TARGETS if c not in row]
            if missing:
                raise UserError(f"{path}: missing required column(s) {', '.join(missing)}; "
                                f"found: {', '.join(k for k in row if k)}")
            first = False
        fields = {k: clean_text(row[k] or "") for k in XAU_CONTEXT}
        if not fields["generated_headline"]:
            rep.drop("empty_headline", where)
            continue
        target, bad = {}, None
        for h in HORIZONS:
            dcol, mcol = f"direction_{h}", f"magnitude_{h}"
            direction = (row[dcol] or "").strip().lower()
            raw_mag = (row[mcol] or "").strip()
            if not direction or not raw_mag:
                bad = ("missing_target", f"line {where} {dcol if not direction else mcol}")
                break
            if direction not in DIRECTIONS:
                bad = ("bad_direction", f"line {where} {dcol}={direction!r}")
                break
            try:
                mag = float(raw_mag.rstrip("%"))
            except ValueError:
                bad = ("bad_magnitude", f"line {where} {mcol}={raw_mag!r}")
                break
            if mag < 0 or mag != mag:
                bad = ("bad_magnitude", f"line {where} {mcol}={raw_mag!r}")
                break
            target[h] = {"direction": direction, "magnitude": round(mag, 2)}
        if bad:
            rep.drop(*bad)
            continue
        fields["target_json"] = json.dumps(target, separators=(",", ":"))
        fields["uid"] = f"row{where}"
        yield fields["generated_headline"].lower(), fields
    if first:
        raise UserError(f"{path}: no data rows; expected a CSV header with {', '.join(XAU_CONTEXT + XAU_TARGETS)}")


READERS = {"product_description": product_records, "xauusd_forecast": xau_records}


# --------------------------------------------------------------------------- sampling and splitting
def sizes(n: int, d: Any) -> tuple[list[int], str | None]:
    want = [d.train_size, d.val_size, d.test_size]
    counts = [int(x) if isinstance(x, int) else int(round(x * n)) for x in want]
    note = None
    if sum(counts) > n:
        scale = n / sum(counts)
        scaled = [max(1, int(c * scale)) for c in counts]
        scaled[0] = n - sum(scaled[1:])
        note = f"asked for {counts} train/val/test but only {n} clean records: scaled to {scaled}"
        counts = scaled
    return counts, note


def collect(records: Iterator[tuple[str, dict]], keep: int | None, dedupe: bool, seed: int,
            rep: Report) -> list[dict]:
    """Dedupe, then a seeded reservoir sample of `keep` records (all when None) in one streaming pass."""
    rng = random.Random(seed)
    seen: set[int] = set()
    out: list[dict] = []
    n = 0
    for key, fields in records:
        if dedupe:
            h = hash(key)
            if h in seen:
                rep.drop("duplicate_title", fields["uid"])
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


def to_examples(cfg: Any, records: list[dict], seed: int, extend: bool) -> list[dict]:
    """Format records; with conversation_extension=k each example chains k-1 other random records before it."""
    rng = random.Random(seed)
    k = cfg.prompt.conversation_extension if extend else 1
    out = []
    for i, fields in enumerate(records):
        others = [j for j in rng.sample(range(len(records)), min(k, len(records))) if j != i][: k - 1] if k > 1 else []
        ex = {"id": fields["uid"], **prompts.build(cfg, fields, [records[j] for j in others])}
        if cfg.task == "product_description":
            ex["title"] = fields["title"]
        else:
            ex["headline"] = fields["generated_headline"]
        out.append(ex)
    return out


def token_stats(cfg: Any, splits: dict[str, list[dict]]) -> dict:
    from common import modeling

    tok = modeling.load_tokenizer(cfg, modeling.model_source(cfg))
    stats = {}
    for name, rows in splits.items():
        lengths = []
        for ex in rows:
            if cfg.model.arch == "seq2seq":
                lengths.append(len(tok(ex["prompt"]).input_ids) + len(tok(text_target=ex["completion"]).input_ids))
            else:
                enc = prompts.encode_chat(tok, ex["prompt"], ex["completion"], None, True)
                lengths.append(len(enc[0]) if enc else 0)
        lengths.sort()
        if not lengths:
            continue
        pct = {f"p{p}": lengths[min(len(lengths) - 1, int(len(lengths) * p / 100))] for p in (50, 90, 99)}
        stats[name] = {**pct, "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
                       "over_max_length": sum(x > cfg.train.max_length for x in lengths)}
    return stats


def body(ctx: run.Context) -> None:
    cfg, rp = ctx.cfg, ctx.paths
    d = cfg.data
    path = Path(d.path).expanduser()
    if not path.is_absolute():
        path = (paths.REPO / path) if (paths.REPO / path).exists() else path.resolve()
    if not path.exists():
        raise UserError(f"data file {path} does not exist; set DATA_PATH in .env or --set data.path=FILE")
    if path.is_dir():
        raise UserError(f"data path {path} is a folder; point data.path at the file itself (e.g. {path}/trn.json)")
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    rep = Report()
    keep = d.sample
    if keep is None and all(isinstance(x, int) for x in (d.train_size, d.val_size, d.test_size)):
        keep = d.train_size + d.val_size + d.test_size
    share = keep if isinstance(keep, float) else None
    records = collect(READERS[cfg.task](path, cfg, rep), None if share else keep, d.dedupe_titles, d.seed, rep)
    if share is not None and 0 < share < 1:  # a subset fraction (flan-t5's --train_subset)
        records = random.Random(d.seed).sample(records, max(1, int(len(records) * share)))
    if not records:
        reasons = ", ".join(f"{k} {v}" for k, v in rep.dropped.most_common(4)) or "no rows"
        raise UserError(f"{path}: no usable record out of {rep.read} read ({reasons}); check the file's format "
                        f"(task {cfg.task} expects {'a CSV' if cfg.task == 'xauusd_forecast' else 'JSON lines with title and content'})")
    random.Random(d.seed).shuffle(records)
    (n_tr, n_va, n_te), note = sizes(len(records), d)
    if note:
        log.warning(note)
    parts = {"train": records[:n_tr], "val": records[n_tr:n_tr + n_va], "test": records[n_tr + n_va:n_tr + n_va + n_te]}
    splits = {name: to_examples(cfg, recs, d.seed + i, extend=name != "test") for i, (name, recs) in
              enumerate(parts.items())}
    try:
        stats = token_stats(cfg, splits)
    except UserError as e:  # data preparation does not need the model; say so and go on
        log.warning("token lengths not computed: %s", e)
        stats = {}
    for name, rows in splits.items():
        run.write_jsonl(rp.split(name), rows)
    if d.export_formatted:
        export = [{"id": ex["id"], "prompt": ex["prompt"], "response": prompts.reference(ex)} for ex in splits["train"]]
        run.atomic_write_json(rp.data / d.export_formatted, export)
    report = {
        "source": str(path),
        "read": rep.read,
        "kept": len(records),
        "dropped": dict(rep.dropped.most_common()),
        "dropped_first_lines": dict(rep.where),
        "splits": {k: len(v) for k, v in splits.items()},
        "split_note": note,
        "token_lengths": stats,
        "meta": run.describe(cfg, "prepare"),
    }
    run.atomic_write_json(rp.prepare_report, report)
    log.info("read %d, kept %d, dropped %s -> %s", rep.read, len(records), dict(rep.dropped), rp.data)
    for name, s in stats.items():
        log.info("tokens %-5s p50=%s p90=%s max=%s over max_length=%s", name, s["p50"], s["p90"], s["max"],
                 s["over_max_length"])


def main(argv: list[str] | None = None) -> int:
    return run.main("prepare", body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
