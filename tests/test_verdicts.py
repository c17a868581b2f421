"""Verdicts a user can act on, by value: paired CIs and verdict words, examples to resolve, the tasks' baselines, the
forgetting loss, which base weights eval loads, the tuned-answer cache; one case ahead by a point with a CI
spanning zero checked in every output; and one tiny run whose card-only change regenerates nothing."""
from __future__ import annotations

import csv
import json
import math
import statistics
from types import SimpleNamespace

import pytest
from conftest import make

from common.core import config, paths
from common.evaluation import compare, forgetting, metrics
from common.model import modeling
from common.shipping import cards, report
from common.tasks import Task
from common.tasks import product_description as prod
from common.tasks import xauusd_forecast as xau

ND = "not distinguishable"


# --------------------------------------------------------------------------- verdicts and sample size
def test_verdict_words_follow_the_ci_only():
    assert metrics.verdict(0.01, 0.2) == "better" and metrics.verdict(-0.2, -0.01) == "worse"
    assert metrics.verdict(-0.01, 0.2) == ND and metrics.verdict(0.0, 0.2) == ND
    assert metrics.verdict(float("nan"), float("nan")) == ND
    up = metrics.paired([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 100)
    assert (up["mean"], up["ci_low"], up["ci_high"], up["verdict"]) == (1.0, 1.0, 1.0, "better")
    assert metrics.paired([1.0] * 3, [0.0] * 3, 100, higher_is_better=False)["verdict"] == "worse"  # a loss
    with pytest.raises(ValueError, match="same examples"):
        metrics.paired([1.0], [1.0, 2.0], 10)


def test_examples_to_resolve_by_value():
    diffs = [0.0, 0.02] * 50  # mean 0.01, sd 0.01005 -> (1.96 * 1.005)^2 = 3.88 -> 4
    assert metrics.examples_to_resolve(diffs) == 4
    diffs = [1.0, -1.0, 1.0, -1.0, 1.0]  # mean 0.2, sd 1.0954 -> (1.96 * 5.477)^2 = 115.2 -> 116
    assert metrics.examples_to_resolve(diffs) == math.ceil((1.96 * statistics.stdev(diffs) / 0.2) ** 2) == 116
    assert metrics.examples_to_resolve([0.5, -0.5]) is None and metrics.examples_to_resolve([0.3]) is None


# --------------------------------------------------------------------------- baselines
def _forecast(direction: str, mag: float) -> str:
    return json.dumps({h: {"direction": direction, "magnitude": mag} for h in xau.HORIZONS}, separators=(",", ":"))


def _row(label: str, ref: str = "", **extra) -> dict:
    return {"id": label, "prompt": [{"role": "user", "content": "x"}],
            "completion": [{"role": "assistant", "content": ref}], "label": label, **extra}


def test_forecast_baselines_majority_and_sentiment_rule_by_value():
    train = [_row("bullish", _forecast("up", 1.0)), _row("bullish", _forecast("down", 3.0)),
             _row("bearish", _forecast("down", 0.5)), _row("Bullish", _forecast("up", 2.0))]
    rows = [_row("bullish"), _row("bearish"), _row("neutral"), {"id": "old", "prompt": [], "completion": ""}]
    got = xau.TASK.baselines(train, rows)
    majority = json.loads(got["majority"][0])
    assert majority["6h"] == {"direction": "up", "magnitude": round((1 + 3 + 0.5 + 2) / 4, 2)}
    assert got["majority"] == [got["majority"][0]] * 4
    rule = [json.loads(a) for a in got["sentiment_rule"]]
    assert rule[0]["24h"] == {"direction": "up", "magnitude": 2.0}  # bullish: mean of 1, 3, 2
    assert rule[1]["48h"] == {"direction": "down", "magnitude": 0.5}
    assert rule[2] == rule[3] == majority  # no neutral row in train; a row without a label: the majority answer
    assert xau.TASK.baselines([_row("bullish", "not json")], rows) == {}
    assert list(xau.TASK.baselines(train, [{"id": "old", "prompt": [], "completion": ""}])) == ["majority"]


def test_product_baselines_retrieval_and_title_by_value():
    train = [_row("", "A steel chef knife.", title="Acme Chef Knife, Steel"),
             _row("", "A blue frying pan.", title="Zephyr Frying Pan, Blue"),
             _row("", "A black fountain pen.", title="Acme Fountain Pen, Black")]
    rows = [_row("", title="Zephyr Pan, Red"), _row("", title="Fountain Pen, Gold"), _row("", title="Nothing shared")]
    got = prod.TASK.baselines(train, rows)
    assert got["retrieval"] == ["A blue frying pan.", "A black fountain pen.", "A steel chef knife."]
    assert got["title"] == ["Zephyr Pan, Red", "Fountain Pen, Gold", "Nothing shared"]


# --------------------------------------------------------------------------- forgetting loss
class _WordTok:
    """Words are their own ids ("3" -> 3); a seq2seq target ends with EOS (id 0, also the pad)."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text: str = "", text_target: str | None = None):
        ids = [int(w) for w in (text_target if text_target is not None else text).split()]
        return SimpleNamespace(input_ids=ids + ([0] if text_target is not None else []))


class _NextIsPlusOne:
    """A decoder-only 'model' that gives logit L to token (current + 1) and 0 to the other V - 1 tokens."""

    V, L = 6, 2.0
    config = SimpleNamespace(is_encoder_decoder=False)

    def __init__(self):
        import torch

        self.w = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.w])

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = torch.zeros(*input_ids.shape, self.V)
        logits.scatter_(2, ((input_ids + 1) % self.V).unsqueeze(-1), self.L)
        return SimpleNamespace(logits=logits)


def test_forgetting_encodes_the_second_half_as_labels():
    assert forgetting.halves("1 2 3 4 5") == ("1 2", "3 4 5")
    assert forgetting.encode(_WordTok(), "1 2 3 4 5", seq2seq=False) == ([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5])
    assert forgetting.encode(_WordTok(), "1 2 3 4 5", seq2seq=True) == ([1, 2], [3, 4, 5, 0])


def test_forgetting_loss_per_token_by_value():
    m = _NextIsPlusOne()
    z = math.exp(m.L) + m.V - 1
    right, wrong = -math.log(math.exp(m.L) / z), -math.log(1 / z)
    # scored: the second half. "1 2 3 4": 3, 4 each follow predecessor + 1 (right); "2 1 3 5 5 1": 5, 5, 1 after
    # 3, 5, 5 (all wrong); "1 2 3 4 5 2": 4, 5 right, 2 wrong. One padded batch.
    got = forgetting.token_losses(m, _WordTok(), ["1 2 3 4", "2 1 3 5 5 1", "1 2 3 4 5 2"], batch_size=8)
    assert got == pytest.approx([right, wrong, (2 * right + wrong) / 3])


def test_forgetting_seq2seq_scores_the_decoder_on_the_continuation():
    import torch

    class Uniform(_NextIsPlusOne):
        config = SimpleNamespace(is_encoder_decoder=True)

        def __call__(self, input_ids, attention_mask, labels):
            return SimpleNamespace(logits=torch.zeros(*labels.shape, self.V))

    got = forgetting.token_losses(Uniform(), _WordTok(), ["1 2 3 4", "1 2 3 4 5 1 1 1"])
    assert got == pytest.approx([math.log(6)] * 2)  # pads (-100) do not dilute the mean


def test_forgetting_compare_says_worse_when_the_loss_rises_beyond_the_ci():
    f = forgetting.compare([2.0, 2.1, 1.9, 2.0], [2.5, 2.6, 2.4, 2.5], 200)
    assert (f["base_loss"], f["tuned_loss"], f["verdict"]) == (2.0, 2.5, "worse") and f["mean"] == pytest.approx(0.5)
    assert len(forgetting.passages()) >= 150


# --------------------------------------------------------------------------- which base weights, the tuned cache
def _stub_models(monkeypatch, loaded: list):
    monkeypatch.setattr(modeling, "model_source", lambda cfg, full_precision=False:
                        "bf16-weights" if full_precision else "4bit-weights")
    monkeypatch.setattr(modeling, "load_model", lambda cfg, source, *a: loaded.append(source) or source)
    monkeypatch.setattr(modeling, "load_tuned", lambda cfg, rp, use: loaded.append(f"tuned-{use}") or use)
    monkeypatch.setattr(modeling, "generate", lambda model, tok, ids, *a: a[-1].extend([True] * len(ids))
                        or [f"{model}:{i}" for i in ids])
    monkeypatch.setattr(forgetting, "token_losses", lambda model, tok, texts: [1.0] * len(texts))


@pytest.mark.parametrize("use, want", [("merged", "bf16-weights"), ("adapter", "bf16-weights")])  # load_tuned too
def test_base_answers_come_from_the_weights_the_tuned_model_is_built_on(ft_home, monkeypatch, use, want):
    loaded: list = []
    _stub_models(monkeypatch, loaded)
    cfg = config.load("llama3-alpaca", [f"eval.use={use}"])
    assert cfg.quantization.prequantized and cfg.model.full_precision_name_or_path
    base = compare.base_generations(cfg, paths.RunPaths(cfg.run), None, [[1], [2]], "fp32", None, ["a b"])
    assert loaded == [want] and base.texts == [f"{want}:[1]", f"{want}:[2]"] and base.general == [1.0]
    assert compare.base_source(cfg)[0] == want


def test_tuned_answers_are_cached_by_the_tuned_weights(ft_home, monkeypatch):
    loaded: list = []
    _stub_models(monkeypatch, loaded)
    cfg = config.load("smollm2", ["eval.use=adapter"])
    rp = paths.RunPaths(cfg.run)
    rp.adapter.mkdir(parents=True)
    (rp.adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    first = compare.tuned_generations(cfg, rp, None, [[1]], "fp32", None, ["a b"])
    again = compare.tuned_generations(cfg, rp, None, [[1]], "fp32", None, ["a b"])
    assert loaded == ["tuned-adapter"] and again == first  # the second call loaded nothing
    (rp.adapter / "adapter_model.safetensors").write_bytes(b"weights v2")  # trained again
    compare.tuned_generations(cfg, rp, None, [[1]], "fp32", None, ["a b"])
    compare.tuned_generations(cfg, rp, None, [[1]], "fp32", None, ["a b", "c d"])  # another general-text set
    assert loaded == ["tuned-adapter"] * 3


# --------------------------------------------------------------------------- a point ahead, CI spanning zero
class _Exact(Task):
    name, primary, per_example = "exact", "acc", "hit"

    def score(self, preds, refs):
        per = [{"hit": float(p == r)} for p, r in zip(preds, refs)]
        return {"acc": sum(x["hit"] for x in per) / len(per)}, per

    def baselines(self, train, rows):
        # "weak" gets 30 right, "rule" 50: the strongest is the rule
        return {"weak": ["y" if i < 30 else "n" for i in range(len(rows))],
                "rule": ["y" if i < 50 else "n" for i in range(len(rows))]}


def test_a_point_ahead_with_a_ci_spanning_zero_is_not_distinguishable_everywhere(ft_home):
    cfg = config.load("smollm2")
    rp = paths.RunPaths(cfg.run)
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}],
             "completion": [{"role": "assistant", "content": "y"}]} for i in range(100)]
    tuned = ["y" if 25 <= i < 76 else "n" for i in range(100)]  # 51 right: 26 the rule misses, 25 it gets
    general = [2.0, 2.2, 1.8, 2.1]
    m, side = compare.compare(cfg, _Exact(), rows, compare.Answers(["n"] * 100, [True] * 100, general),
                                 compare.Answers(tuned, [True] * 100, [g + 0.01 for g in general]), [])
    v = m["verdict"]
    assert m["strongest_baseline"] == "rule" and v["against"] == "rule" and v["mean"] == pytest.approx(0.01)
    assert v["ci_low"] < 0 < v["ci_high"] and v["verdict"] == ND
    assert v["examples_to_resolve"] == math.ceil((1.96 * statistics.stdev([1] * 26 + [-1] * 25 + [0] * 49)
                                                  / 0.01) ** 2)
    assert m["comparison"]["verdict"] == "better" and m["vs_baselines"]["weak"]["verdict"] == "better"
    assert side[25]["rule"] == "y" and side[25]["rule_hit"] == 1.0
    m["base_weights"] = {"source": "the-base", "why": "test"}
    compare.write(cfg, rp, m, side, [], {})
    saved = json.loads((rp.eval / "metrics.json").read_text())
    assert saved["verdict"]["verdict"] == ND and saved["forgetting"]["verdict"] in ("worse", ND)
    md = (rp.eval / "report.md").read_text()
    assert "**Verdict against the strongest baseline, `rule`: the tuned model is not distinguishable from it**" in md
    assert f"roughly {v['examples_to_resolve']:,} test examples to resolve (this run has 100)" in md
    assert "Base answers from `the-base`" in md
    card = cards.render(cfg, rp, "adapter", metrics=saved)
    assert "Against the strongest simple baseline, `rule`: +0.0100" in card and f"{ND} from it" in card
    text, page, _ = report.build(paths.home() / "outputs")
    assert f'data-key="verdict.verdict">{ND}</span>' in page
    assert f'data-key="vs_baselines.rule.verdict">{ND}</td>' in page
    row = next(csv.DictReader(text.splitlines()))
    assert row["verdict"] == ND and row["strongest_baseline"] == "rule" and row["vs_base"] == "better"


# --------------------------------------------------------------------------- one tiny run
@pytest.mark.e2e
def test_a_card_only_change_reuses_both_caches(tiny_run, tmp_path, ft_home):  # ft_home: the shared model cache
    home = tiny_run("smollm2").copy(tmp_path / "copy")
    out = home / "outputs" / "smollm2-tiny"
    m = json.loads((out / "eval/metrics.json").read_text())
    assert m["base_weights"]["source"] and m["forgetting"]["passages"] == len(forgetting.passages())
    again = make(home, "eval", "RECIPE=smollm2", "TINY=1", "ARGS=--set card.license=mit")
    assert "scripts/04_eval.py" in again.stdout
    log = again.stdout + again.stderr
    assert "base generations: reusing" in log and "tuned generations: reusing" in log, log[-3000:]
    assert "license: \"mit\"" in (out / "adapter/README.md").read_text()
    assert json.loads((out / "eval/metrics.json").read_text())["verdict"] == m["verdict"]
