"""Task logic by value, in milliseconds: forecast parsing and repair, macro-F1, MAE with an invalid answer,
bootstrap CI, degenerate answers, ROUGE/BLEU wrappers, drop reasons, split sizes; and the house rules: tasks and
architectures live in their modules, scripts stay thin."""
from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
from conftest import REPO

from common import tasks
from common.core import config
from common.data import readers
from common.evaluation import metrics
from common.model import standins
from common.tasks import xauusd_forecast as xau

GOLD = {"6h": {"direction": "up", "magnitude": 1.0}, "12h": {"direction": "down", "magnitude": 2.0},
        "24h": {"direction": "flat", "magnitude": 0.0}, "48h": {"direction": "up", "magnitude": 4.0}}
REF = json.dumps(GOLD, separators=(",", ":"))


def test_forecast_parsing_and_repair():
    assert xau.parse_forecast(REF, repair=False)["12h"] == {"direction": "down", "magnitude": 2.0}
    chatty = f"Sure! Here is the forecast: {REF} Hope it helps."
    assert xau.parse_forecast(chatty, repair=False) is None
    assert xau.parse_forecast(chatty, repair=True) == xau.parse_forecast(REF, repair=False)
    bad_dir = REF.replace('"flat"', '"sideways"')
    assert xau.parse_forecast(bad_dir, repair=True) is None
    assert xau.parse_forecast(REF.replace("4.0", "true"), repair=False) is None  # a bool is not a magnitude
    assert xau.parse_forecast("[1, 2]", repair=False) is None and xau.parse_forecast("", repair=True) is None


def test_forecast_scores_by_value_with_an_invalid_answer():
    half = dict(GOLD, **{"6h": {"direction": "down", "magnitude": 2.0}, "12h": {"direction": "up", "magnitude": 2.0}})
    preds = [REF, json.dumps(half), "no idea"]
    agg, per = xau.forecast_scores(preds, [REF] * 3)
    assert [p["correct"] for p in per] == [1.0, 0.5, 0.0]
    assert agg["json_valid_raw"] == pytest.approx(2 / 3) and agg["json_valid_repaired"] == pytest.approx(2 / 3)
    assert agg["direction_acc"] == pytest.approx(0.5)
    # 6h: |1-1| + |1-2| + |1-0| (invalid = a 0 forecast) = 2 over 3 answers
    assert agg["magnitude_mae_6h"] == pytest.approx(2 / 3)
    assert agg["magnitude_mae"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 4 / 3) / 4)


def test_macro_f1_by_value():
    assert metrics.macro_f1(["up", "down"], ["up", "down"], xau.DIRECTIONS) == 1.0
    # up: tp1 fp1 fn0 -> 2/3; down: tp0 fp0 fn1 -> 0; flat absent
    assert metrics.macro_f1(["up", "down"], ["up", "up"], xau.DIRECTIONS) == pytest.approx(1 / 3)
    assert metrics.macro_f1(["up"], ["invalid"], xau.DIRECTIONS) == 0.0


def test_majority_baseline_is_majority_direction_and_mean_magnitude():
    other = json.dumps(dict(GOLD, **{"6h": {"direction": "down", "magnitude": 3.0}}))
    gold = [xau.parse_forecast(r, repair=False) for r in (REF, REF, other)]
    base = json.loads(xau.majority_forecast(gold))
    assert base["6h"] == {"direction": "up", "magnitude": round((1 + 1 + 3) / 3, 2)}


def test_bootstrap_ci_by_value():
    mean, lo, hi = metrics.bootstrap_ci([0.5] * 10, 200)
    assert (mean, lo, hi) == (0.5, 0.5, 0.5)
    mean, lo, hi = metrics.bootstrap_ci([0.0, 1.0] * 50, 2000, seed=1)
    # sd of the mean 0.05: a 95% interval is 0.5 -/+ 1.96 x 0.05 (a 90% one, 1.645 x 0.05, would give 0.418/0.582)
    assert mean == 0.5 and abs(lo - 0.402) < 0.01 and abs(hi - 0.598) < 0.01
    assert all(x != x for x in metrics.bootstrap_ci([], 10))


def test_degenerate_answers():
    assert metrics.degenerate("buy now buy now buy now buy now buy now")
    assert not metrics.degenerate("A sturdy steel knife with a walnut handle for everyday kitchen work.")
    assert metrics.degenerate(" ".join(["a b c d e"] * 2) + " " + " ".join(["a b c"] * 6))


def test_text_scores_wrappers():
    agg, per = metrics.text_scores(["the red fox jumps", ""], ["the red fox jumps", "a quiet dog"])
    assert per[0]["rougeL"] == 1.0 and per[1]["rougeL"] == 0.0 and per[1]["empty"]
    assert agg["rougeL"] == 0.5 and agg["empty_share"] == 0.5 and agg["len_ratio"] == 0.5
    assert 0 < agg["sacrebleu"] < 100 and 0 < agg["chrf"] < 100


def cfg_for(recipe: str, *sets: str):
    return config.load(recipe, list(sets))


def test_product_records_drop_reasons_by_value(ft_home, tmp_path):
    rows = [{"uid": 1, "title": "Acme Knife", "content": "A sharp knife for the kitchen."},
            {"uid": 2, "title": "acme knife", "content": "The same title in other letters."},
            {"uid": 3, "title": "Acme Pan", "content": "short"},
            {"uid": 4, "title": 5, "content": "A number for a title."}]
    f = tmp_path / "trn.json"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    rep = readers.Report()
    task = tasks.get("product_description")
    cfg = cfg_for("smollm2", "data.min_content_chars=10")
    got = readers.collect(task.records(f, cfg, rep), None, 0, rep, task.duplicate_reason)
    assert [r["uid"] for r in got] == ["1"] and rep.read == 5
    assert rep.dropped == {"duplicate_title": 1, "short_content": 1, "non_string_title": 1, "bad_json": 1}
    assert rep.where["bad_json"] == [5] and rep.where["short_content"] == [3]


def test_forecast_duplicates_are_headlines_and_kept_by_default(ft_home, tmp_path):
    head = ",".join(xau.CONTEXT + xau.TARGETS)
    row = ",".join(["Gold up", "bullish", "3", "x", "XAU", "Gold", "y"] + ["up", "1.0"] * 4)
    f = tmp_path / "x.csv"
    f.write_text("\n".join([head, row, row]) + "\n")
    task = tasks.get("xauusd_forecast")
    for dedupe, kept, dropped in (("false", 2, {}), ("true", 1, {"duplicate_headline": 1})):
        rep = readers.Report()
        cfg = cfg_for("smollm2-xauusd", f"data.dedupe_headlines={dedupe}")
        got = readers.collect(task.records(f, cfg, rep), None, 0, rep, task.duplicate_reason)
        assert len(got) == kept and dict(rep.dropped) == dropped


@pytest.mark.parametrize("n, want, got", [
    (1, (480, 32, 120), [1, 0, 0]), (2, (480, 32, 120), [1, 0, 1]), (3, (480, 32, 120), [1, 1, 1]),
    (100, (0.8, 0.1, 0.1), [80, 10, 10]), (632, (480, 32, 120), [480, 32, 120]),
])
def test_split_sizes_never_leave_train_empty(n, want, got):
    counts, note = readers.sizes(n, SimpleNamespace(train_size=want[0], val_size=want[1], test_size=want[2]))
    assert counts == got and sum(counts) <= n and (note is None) == (n >= 632 or isinstance(want[0], float))


def test_registry_finds_every_task_module():
    assert tasks.names() == ("chat", "preference", "product_description", "xauusd_forecast")
    for name in tasks.names():
        t = tasks.get(name)
        assert t.name == name and t.primary and t.per_example and set(t.prompt_defaults) == {"user", "target"}


def test_forecast_recipe_without_prompt_user_uses_the_task_default(ft_home, tmp_path):
    f = tmp_path / "r.yaml"
    text = (REPO / "recipes/smollm2-xauusd.yaml").read_text()
    f.write_text("\n".join(x for x in text.splitlines() if not x.strip().startswith(("user:", "target:"))))
    cfg = config.load(str(f))
    assert cfg.prompt.user == xau.TASK.prompt_defaults["user"] and cfg.prompt.target == "{target_json}"


def test_no_script_names_a_task_or_an_architecture():
    out = subprocess.run(["git", "grep", "-nE", r"cfg\.task ?[!=]=|arch ?[!=]=|product_description|xauusd_forecast|"
                          r"seq2seq|\"causal\"", "--", "scripts/*.py"], cwd=REPO, capture_output=True, text=True)
    assert out.stdout == "", out.stdout


def test_numbered_scripts_stay_thin():
    for f in sorted((REPO / "scripts").glob("0*.py")):
        text = f.read_text()
        assert len(text.splitlines()) < 200, f.name
        assert text.startswith('"""') and "def main(argv" in text and 'if __name__ == "__main__":' in text, f.name


def test_generate_reports_which_answers_stopped_on_eos():
    """stop_rate's source: an answer stopped when EOS came before max_new_tokens (padding after it is EOS too)."""
    import torch
    from transformers import AutoTokenizer

    from common.model import arch, modeling

    tok = AutoTokenizer.from_pretrained(standins.smollm2_tokenizer_dir())
    eos, word = tok.eos_token_id, tok("hello", add_special_tokens=False).input_ids[0]

    class Fixed(torch.nn.Module):  # answers: "hello" + EOS (stopped), "hello hello hello" (cut at 3 tokens)
        config = type("C", (), {"is_encoder_decoder": False})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kw):
            tails = {4: [word, eos, eos], 3: [word, word, word]}  # keyed by prompt length
            return torch.tensor([row.tolist() + tails[int((kw["attention_mask"][i]).sum())]
                                 for i, row in enumerate(input_ids)])

    stops: list = []
    out = modeling.generate(Fixed(), tok, [[1, 2, 3, 4], [1, 2, 3]], 3, arch.ARCHS["causal"], 2, "t", "fp32", stops)
    assert stops == [True, False] and out[0] == "hello" and out[1].count("hello") == 3
