"""A short real run on the embedded SmolLM2 (a few steps): the tuned model must already beat the base."""
from __future__ import annotations

import csv
import json

import pytest
from conftest import make, ran_steps

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SHORT = ("--set train.max_steps=8 --set train.eval_steps=4 --set train.save_steps=4 --set data.train_size=64 "
         "--set data.val_size=16 --set data.test_size=24 --set eval.max_new_tokens=40")


def test_smollm2_short_real_run(ft_home):
    p = make(ft_home, "all", "RECIPE=smollm2", f"ARGS={SHORT}")
    assert ran_steps(p)[-4:] == ["01_prepare", "02_sft_qlora", "03_merge_fp16", "04_eval"]
    out = ft_home / "outputs/smollm2"
    evals = [float(r["eval_loss"]) for r in csv.DictReader((out / "train_log.csv").open()) if r["eval_loss"]]
    assert len(evals) == 2 and evals[1] < evals[0]  # it learns
    m = json.loads((out / "eval/metrics.json").read_text())
    assert m["n_examples"] == 24
    assert m["tuned"]["rougeL"] > m["base"]["rougeL"] and m["comparison"]["mean"] > 0
    assert json.loads((out / "merge_report.json").read_text())["max_abs_logit_diff"] < 0.5
    # the real model leaves the repo as GGUF: f16 answers exactly like merged/, q8_0 within the recipe's threshold
    make(ft_home, "export", "RECIPE=smollm2", f"ARGS={SHORT}")
    files = json.loads((out / "export/export_report.json").read_text())["files"]
    assert files["f16"]["answer_match"] == 1.0 and files["f16"]["token_agreement"] == 1.0
    from common.core import config

    e = config.load("smollm2").export
    assert files["q8_0"]["answer_match"] >= e.q8_0_min_answer_match
    assert files["q8_0"]["token_agreement"] >= e.q8_0_min_token_agreement
