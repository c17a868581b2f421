"""Product title -> product description, from the AmazonTitles-1.3MM `trn.json` format.

Records: JSON lines with uid, title, content (target_ind and target_rel are ignored); also a JSON array, CSV, or
any of them gzipped (common/data/readers.py reads them). Cleaning: HTML entities unescaped, whitespace normalised; a
record is dropped (and counted by reason) when a field is missing, not text, empty, too short or too long, or
when its title repeats an earlier one (data.dedupe_titles).
Scores: ROUGE-1/2/L, sacreBLEU, chrF, length ratio, empty and degenerate shares; the CI is on ROUGE-L.
Baselines: `retrieval` (the description of the most similar train title, TF-IDF cosine over title words,
common/evaluation/retrieval.py, sparse) and `title` (the title itself as its description).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from common.core.schema import F
from common.data import prompts, readers
from common.tasks import Task


class ProductDescription(Task):
    name = "product_description"
    expects = "JSON lines with title and content (the AmazonTitles trn.json format)"
    fields = ("title", "content", "uid")
    prompt_defaults = {"user": "{title}", "target": "{content}"}
    settings = {
        "data": {
            "format": F(str, "auto", ("auto", "jsonl", "json", "csv")),
            "min_title_chars": F(int, 1),
            "min_content_chars": F(int, 1),
            "max_content_chars": F(int),  # longer records are dropped (null = keep all)
            "dedupe_titles": F(bool, True),
        },
        "eval": {
            "fixed_prompts": F(list, []),  # extra titles answered by base and tuned, e.g. the reference's examples
        },
    }
    primary = "rougeL"
    per_example = "rougeL"
    duplicate_reason = "duplicate_title"
    demo_field = "title"
    answer_fields = ("content",)

    def records(self, path: Path, cfg: Any, rep: readers.Report) -> Iterator[tuple[str | None, dict]]:
        d = cfg.data
        for where, rec in readers.iter_records(path, d.format, rep):
            title = readers.text_field(rec, "title", rep, where)
            if title is None:
                continue
            content = readers.text_field(rec, "content", rep, where)
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
                yield (title.lower() if d.dedupe_titles else None), {
                    "uid": str(uid) if uid is not None else str(where), "title": title, "content": content}

    def example_extra(self, fields: dict) -> dict:
        return {"title": fields["title"]}

    def score(self, preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
        from common.evaluation import metrics

        return metrics.text_scores(preds, refs)

    def baselines(self, train: list[dict], rows: list[dict]) -> dict[str, list[str]]:
        from common.evaluation import retrieval

        titles = [_title(r) for r in rows]
        if not train:
            return {"title": titles}
        best = retrieval.nearest([_title(r) for r in train], titles)
        return {"retrieval": [prompts.reference(train[i]) for i in best], "title": titles}

    def extra_prompts(self, cfg: Any) -> list[tuple[str, dict]]:
        return [(t, {"title": t, "content": "", "uid": f"fixed{i}"}) for i, t in enumerate(cfg.eval.fixed_prompts)]


def _title(row: dict) -> str:
    return row.get("title") or prompts.prompt_text(row)


TASK = ProductDescription()
