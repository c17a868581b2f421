"""Gold (XAU/USD) news headline -> JSON forecast of direction and magnitude at 6, 12, 24 and 48 hours.

Records: a CSV with the headline, its market context and, per horizon, direction_<h> (up/down/flat) and
magnitude_<h> (percent, >= 0; a trailing % is accepted). A row with an empty headline, a missing or invalid target
is dropped and counted by reason; a file without the required columns stops with one line naming them.
The answer is compact JSON: {"6h":{"direction":"up","magnitude":0.9},...}.
Scores: share of answers that parse as JSON with every field (raw, and after taking the first {...} block), per
horizon direction accuracy and macro-F1, magnitude MAE (an invalid answer is a wrong direction and a 0 forecast);
the CI is on the per-example share of correct directions. Baselines: `majority` (the train split's majority
direction and mean magnitude per horizon, for every prompt) and `sentiment_rule` (the prompt's own sentiment label
read as a direction, bullish -> up, bearish -> down, neutral -> flat, with that label's mean train magnitude per
horizon; the majority answer for a label the rule does not know; offered only when prompt.user shows the label:
common/evaluation/compare.py gives a baseline the fields the model sees).
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from common.core.io import UserError
from common.core.schema import F
from common.data import prompts, readers
from common.tasks import Task

log = logging.getLogger("ft")

HORIZONS = ("6h", "12h", "24h", "48h")
DIRECTIONS = ("up", "down", "flat")
CONTEXT = ("generated_headline", "label", "sentiment_strength", "explanation", "symbol", "symbol_name",
           "correlation_description")
TARGETS = tuple(f"{kind}_{h}" for h in HORIZONS for kind in ("direction", "magnitude"))
LABEL_DIRECTION = {"bullish": "up", "bearish": "down", "neutral": "flat"}  # the sentiment_rule baseline


class XauusdForecast(Task):
    name = "xauusd_forecast"
    expects = f"a CSV with the columns {', '.join(CONTEXT + TARGETS)}"
    fields = (*CONTEXT, "target_json", "uid")
    prompt_defaults = {
        "user": "Headline: {generated_headline}\nSentiment: {label} (strength {sentiment_strength}/5)\nForecast "
                "XAU/USD as JSON with direction (up/down/flat) and magnitude (%) at 6h, 12h, 24h, 48h.",
        "target": "{target_json}",
    }
    settings = {"data": {"dedupe_headlines": F(bool, False)}}  # the same headline can carry different outcomes
    primary = "direction_acc"
    per_example = "correct"
    duplicate_reason = "duplicate_headline"
    demo_field = "generated_headline"
    answer_fields = ("target_json",)

    def records(self, path: Path, cfg: Any, rep: readers.Report) -> Iterator[tuple[str | None, dict]]:
        first = True
        for where, row in readers.iter_records(path, "csv", rep):
            if first:
                missing = [c for c in CONTEXT + TARGETS if c not in row]
                if missing:
                    raise UserError(f"{path}: missing required column(s) {', '.join(missing)}; "
                                    f"found: {', '.join(k for k in row if k)}")
                first = False
            fields = {k: readers.clean_text(row[k] or "") for k in CONTEXT}
            if not fields["generated_headline"]:
                rep.drop("empty_headline", where)
                continue
            target, bad = parse_targets(row, where)
            if bad:
                rep.drop(*bad)
                continue
            fields["target_json"] = json.dumps(target, separators=(",", ":"))
            fields["uid"] = f"row{where}"
            yield (fields["generated_headline"].lower() if cfg.data.dedupe_headlines else None), fields
        if first:
            raise UserError(f"{path}: no data rows; expected {self.expects}")

    def example_extra(self, fields: dict) -> dict:
        return {"headline": fields["generated_headline"], "label": fields["label"]}

    def score(self, preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
        return forecast_scores(preds, refs)

    def baselines(self, train: list[dict], rows: list[dict]) -> dict[str, list[str]]:
        gold = [(r.get("label", "").lower(), parse_forecast(prompts.reference(r), repair=False)) for r in train]
        gold = [(label, g) for label, g in gold if g]
        if not gold:
            return {}
        majority = majority_forecast([g for _, g in gold])
        out = {"majority": [majority] * len(rows)}
        if not any("label" in r for r in rows):  # prompt.user does not show it (or an older prepare dropped it)
            log.warning("baseline sentiment_rule skipped: the eval prompts do not show the sentiment label "
                        "(prompt.user has no {label}), so a rule reading it would see more than the model")
            return out
        rule = sentiment_forecasts(gold)
        return {**out, "sentiment_rule": [rule.get(r.get("label", "").lower(), majority) for r in rows]}


def _compact(forecast: dict) -> str:
    return json.dumps(forecast, separators=(",", ":"))


def majority_forecast(gold: list[dict]) -> str:
    """Per horizon, the most common direction and the mean magnitude of the parsed train forecasts."""
    return _compact({h: {"direction": Counter(g[h]["direction"] for g in gold).most_common(1)[0][0],
                         "magnitude": round(sum(g[h]["magnitude"] for g in gold) / len(gold), 2)} for h in HORIZONS})


def sentiment_forecasts(gold: list[tuple[str, dict]]) -> dict[str, str]:
    """{label: forecast} for each label of LABEL_DIRECTION seen in train: its direction, its mean magnitude."""
    out = {}
    for label, direction in LABEL_DIRECTION.items():
        mine = [g for lab, g in gold if lab == label]
        if mine:
            out[label] = _compact({h: {"direction": direction, "magnitude": round(
                sum(g[h]["magnitude"] for g in mine) / len(mine), 2)} for h in HORIZONS})
    return out


def parse_targets(row: dict, where: Any) -> tuple[dict, tuple | None]:
    """({horizon: {direction, magnitude}}, None) or ({}, (drop reason, location)) for one CSV row."""
    target = {}
    for h in HORIZONS:
        dcol, mcol = f"direction_{h}", f"magnitude_{h}"
        direction = (row[dcol] or "").strip().lower()
        raw_mag = (row[mcol] or "").strip()
        if not direction or not raw_mag:
            return {}, ("missing_target", f"line {where} {dcol if not direction else mcol}")
        if direction not in DIRECTIONS:
            return {}, ("bad_direction", f"line {where} {dcol}={direction!r}")
        try:
            mag = float(raw_mag.rstrip("%"))
        except ValueError:
            return {}, ("bad_magnitude", f"line {where} {mcol}={raw_mag!r}")
        if mag < 0 or mag != mag:
            return {}, ("bad_magnitude", f"line {where} {mcol}={raw_mag!r}")
        target[h] = {"direction": direction, "magnitude": round(mag, 2)}
    return target, None


def parse_forecast(text: str, repair: bool) -> dict | None:
    """The forecast if `text` is (or, with repair, contains) a JSON object with every horizon's fields."""
    cand = text.strip()
    if repair:
        m = re.search(r"\{.*\}", cand, re.S)
        if not m:
            return None
        cand = m.group(0)
    try:
        obj = json.loads(cand)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    out = {}
    for h in HORIZONS:
        v = obj.get(h)
        if not isinstance(v, dict) or v.get("direction") not in DIRECTIONS:
            return None
        mag = v.get("magnitude")
        if isinstance(mag, bool) or not isinstance(mag, (int, float)):
            return None
        out[h] = {"direction": v["direction"], "magnitude": float(mag)}
    return out


def forecast_scores(preds: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
    """Invalid outputs count as wrong directions and add the reference magnitude to the MAE (a 0 forecast)."""
    from common.evaluation import metrics

    gold = [parse_forecast(r, repair=False) for r in refs]
    if any(g is None for g in gold):
        raise ValueError("a reference is not a valid forecast")
    raw = [parse_forecast(p, repair=False) for p in preds]
    fixed = [parse_forecast(p, repair=True) for p in preds]
    n = max(1, len(preds))
    agg: dict[str, Any] = {"json_valid_raw": sum(x is not None for x in raw) / n,
                           "json_valid_repaired": sum(x is not None for x in fixed) / n}
    per = [{"valid_raw": r is not None, "correct": 0.0} for r in raw]
    for h in HORIZONS:
        y = [g[h]["direction"] for g in gold]
        p = [f[h]["direction"] if f else "invalid" for f in fixed]
        agg[f"direction_acc_{h}"] = sum(a == b for a, b in zip(y, p)) / n
        agg[f"direction_macro_f1_{h}"] = metrics.macro_f1(y, p, DIRECTIONS)
        agg[f"magnitude_mae_{h}"] = sum(abs(g[h]["magnitude"] - (f[h]["magnitude"] if f else 0.0))
                                        for g, f in zip(gold, fixed)) / n
        for i, (a, b) in enumerate(zip(y, p)):
            per[i]["correct"] += (a == b) / len(HORIZONS)
    for name in ("direction_acc", "direction_macro_f1", "magnitude_mae"):
        agg[name] = sum(agg[f"{name}_{h}"] for h in HORIZONS) / len(HORIZONS)
    return agg, per


TASK = XauusdForecast()
