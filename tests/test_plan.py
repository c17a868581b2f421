"""make plan: the predicted footprint by value for a known shape (the worst micro-batch, checkpointing's overlap, the
preference step's pairs and reference forward), plan.json, the "does not fit -> change" advice, merge/export RAM
against the host, every recipe answered offline in seconds, a run's measured peak checked against the prediction,
and auto's probe started from the plan's micro-batch (opt-in)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from conftest import REPO

from common.core import config, paths
from common.training import batching, fit, footprint, shapes

# A Llama of width 64, feed-forward 128, 2 layers, 4 heads of 16 (2 key/value heads), vocabulary 1000, untied.
SMALL = shapes.Shape("llama", 64, 128, 2, 4, 2, 16, 1000, False)


def small_setting(cfg, **kw):
    st = replace(footprint.setting(cfg, "H100"), length=100, typical=100, answer_share=0.5, padding_free=False, top=())
    return replace(st, **kw)


def test_parameters_of_a_known_shape_by_hand():
    p = shapes.parameters(SMALL)
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128 = 36,864
    assert p["linear"] == 2 * 36_864
    assert p["embed"] == p["head"] == 64_000
    assert p["other"] == 2 * 2 * 64 + 64  # two RMSNorms a layer and the final one
    assert p["total"] == 202_048


@pytest.mark.parametrize("name, params", [
    ("tinyllama-1.1b", 1_100_048_384), ("mistral-7b-instruct-v0.2", 7_241_732_096), ("llama-3-8b", 8_030_261_248),
    ("flan-t5-base", 222_903_552),  # as tests/test_config.py counts them on the meta device
])
def test_real_shapes_have_the_real_parameter_counts(name, params):
    raw = json.loads((paths.MODEL_CONFIGS_DIR / f"{name}.json").read_text())
    assert shapes.parameters(shapes.shape_from(raw, name))["total"] == params


def test_static_components_are_exact(ft_home):
    """Weights (nf4 with its absmax, double-quantized or not), LoRA, gradients and optimizer states, in bytes."""
    cfg = config.load("smollm2")  # LoRA r 16 on every linear layer
    st = small_setting(cfg, quant_bits=4, double_quant=True, frozen="fp32", optim="adamw_torch")
    b = footprint.memory(cfg, SMALL, st, 2)["bytes"]
    # 73,728 4-bit weights: 0.5 byte + a uint8 absmax per 64 + an fp32 absmax per 256 blocks; 128,320 others in fp32
    assert b["weights"] == 36_864 + 1_152 + 18 + 128_320 * 4 == 551_314
    lora = 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # r x (in + out) per adapted layer
    assert lora == 32_768
    assert b["lora"] == b["gradients"] == 4 * lora
    assert b["optimizer"] == 8 * lora  # AdamW: m and v in fp32
    plain = footprint.memory(cfg, SMALL, replace(st, double_quant=False), 2)["bytes"]
    assert plain["weights"] == 36_864 + 4_608 + 128_320 * 4  # an fp32 absmax per 64
    eight = footprint.memory(cfg, SMALL, replace(st, optim="adamw_8bit"), 2)["bytes"]
    assert eight["optimizer"] == 2 * lora
    half = footprint.memory(cfg, SMALL, replace(st, quant_bits=0, frozen="bf16"), 2)["bytes"]
    assert half["weights"] == 202_048 * 2


def test_logits_only_where_labels_are(ft_home):
    """runtime.answer_only_logits: the output layer runs on the labelled positions of the real tokens only."""
    cfg = config.load("smollm2")
    st = small_setting(cfg)
    assert footprint.memory(cfg, SMALL, st, 2)["bytes"]["logits"] == 200 * 0.5 * 1000 * 12
    full = footprint.memory(cfg, SMALL, replace(st, answer_only=False), 2)["bytes"]["logits"]
    assert full == 200 * 1000 * 12
    ckpt = footprint.memory(cfg, SMALL, replace(st, checkpointing=True), 2)["bytes"]["activations"]
    assert ckpt < footprint.memory(cfg, SMALL, st, 2)["bytes"]["activations"]


def test_does_not_fit_a_t4_names_the_change_that_fits(ft_home):
    cfg = config.load("llama3-sharegpt", ["train.max_length=4096"])
    p = fit.predict(cfg, "T4")
    assert not p["fits"] and p["predicted_peak_gb"] > 15.0
    changes = [a["change"] for a in p["advice"]]
    assert fit.ORDER == ("shorter train.max_length", "smaller micro-batch", "gradient checkpointing", "4-bit",
                         "a larger device")  # the stated order
    assert changes[0] == "shorter train.max_length" and changes == sorted(changes, key=fit.ORDER.index)
    assert all(a["predicted_peak_gb"] <= 15.0 for a in p["advice"] if not a["set"].startswith("GPU="))
    first = p["advice"][0]["set"]
    again = fit.predict(config.load("llama3-sharegpt", ["train.max_length=4096", first]), "T4")
    assert again["fits"] and again["predicted_peak_gb"] == p["advice"][0]["predicted_peak_gb"]
    assert fit.predict(cfg, "H100")["fits"]


def test_plan_json_is_written_with_its_keys(ft_home, capsys):
    from scripts import plan

    assert plan.main(["--recipe", "tinyllama", "--gpu", "T4"]) == 0
    p = json.loads((ft_home / "outputs" / "tinyllama" / "plan.json").read_text())
    for key in ("predicted_peak_gb", "fits", "micro_batch", "seconds_per_step", "components", "advice", "steps"):
        assert key in p
    assert set(p["components"]) >= {"weights", "lora", "gradients", "optimizer", "activations", "logits",
                                     "cuda_context"}
    assert p["steps"]["merge"]["disk_merged_gb"] == round(1_100_048_384 * 2 / 2**30, 2)
    assert "fits" in capsys.readouterr().out
    assert plan.main(["--recipe", "tinyllama", "--gpu", "P100"]) == 2  # an unknown device: one line, nothing written


def test_every_recipe_is_planned_offline_in_seconds(ft_home):
    env = dict(os.environ, HF_HUB_OFFLINE="1", no_proxy="", https_proxy="http://0.0.0.0:9", http_proxy="http://0.0.0.0:9")
    for recipe in paths.recipe_names():
        start = time.perf_counter()
        p = subprocess.run([sys.executable, "scripts/plan.py", "--recipe", recipe, "--gpu", "T4"], cwd=REPO, env=env,
                           check=False, capture_output=True, text=True)
        took = time.perf_counter() - start
        assert p.returncode == 0, p.stderr[-2000:]
        assert took < 10, f"{recipe} on a T4: {took:.1f}s"
        for tiny in (False, True):
            cfg = config.load(recipe, tiny=tiny)
            shape = shapes.shape_of(cfg)
            for device in (*footprint.DEVICES, "24", "cpu"):
                got = fit.predict(cfg, device, shape)
                assert got["predicted_peak_gb"] > 0 and got["fits"] == (got["predicted_peak_gb"] <= got["device_memory_gb"])


def test_a_run_that_measured_more_than_predicted_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="ft"):
        ok = footprint.check({"hardware": {"device": "cpu"}, "peak_rss_mb": 2048}, 2.0)
        assert ok["measured_peak_gb"] == 2.0 and ok["measured_over_predicted"] == 1.0 and not caplog.records
        bad = footprint.check({"hardware": {"device": "cpu"}, "peak_rss_mb": 3 * 1024}, 2.0)
    assert bad["measured_over_predicted"] == 1.5
    assert "1.50x the plan's prediction" in caplog.text


def test_a_run_is_predicted_on_its_own_lengths_and_plan(ft_home):
    from common.training.plan import Plan

    cfg = config.load("smollm2", tiny=True)
    plan = Plan("cpu", "fp32", 0, "adamw_torch")
    short = footprint.predict_run(cfg, plan, [40] * 90 + [60] * 10, 0.5)
    long = footprint.predict_run(cfg, plan, [40] * 90 + [250] * 10, 0.5)
    assert 0.6 < short < long < 1.2  # the process, the stand-in, and activations of the 4 longest examples
    st = replace(footprint.setting(cfg, "cpu"), length=250, typical=40, answer_share=0.5,  # p90
                 top=(250,) * 10 + (40,) * 90)
    assert long == footprint.memory(cfg, shapes.shape_of(cfg), st)["peak"]


def test_make_plan_answers_without_installing_and_names_the_change(tmp_path):
    """`make plan` is the README's command: no install step runs before it, and a recipe that does not fit a T4 is
    told what to change."""
    env = {**os.environ, "FT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    dry = subprocess.run(["make", "-n", f"PY={sys.executable}", "plan", "RECIPE=llama3-alpaca", "GPU=T4"], cwd=REPO,
                         env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "00_install" not in dry.stdout and "scripts/plan.py" in dry.stdout, dry.stdout
    p = subprocess.run(["make", f"PY={sys.executable}", "plan", "RECIPE=llama3-alpaca", "GPU=T4"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "DOES NOT FIT" in p.stdout and "to fit: shorter train.max_length" in p.stdout
    assert json.loads((tmp_path / "outputs" / "llama3-alpaca" / "plan.json").read_text())["fits"] is False


@pytest.mark.e2e
def test_a_finished_run_records_its_predicted_and_measured_peak(tiny_run):
    """run_info.json of a real (tiny) training run: make plan's prediction for the run beside its measured peak RSS."""
    info = json.loads((tiny_run("smollm2", export=False).out / "adapter/run_info.json").read_text())
    assert info["predicted_peak_gb"] > 0 and info["measured_peak_gb"] == round(info["peak_rss_mb"] / 1024, 2)
    assert 0.5 < info["measured_over_predicted"] < 1.25, info


def test_the_worst_micro_batch_is_the_longest_examples_together(ft_home):
    """A length-grouped sampler puts an effective batch's longest examples in one micro-batch (what the probe runs):
    the n longest of the split, end to end (padding-free) or padded to the longest."""
    cfg = config.load("smollm2")
    st = small_setting(cfg, padding_free=True, length=500, typical=90, top=(500, 400, 100, 90, 80))
    m = footprint.memory(cfg, SMALL, st, 3)
    assert m["tokens"] == 500 + 400 + 100  # not 500 + 2 x p90
    assert m["bytes"]["logits"] == 1000 * 0.5 * 1000 * 12  # the labelled share of those real tokens
    padded = footprint.memory(cfg, SMALL, replace(st, padding_free=False), 3)
    assert padded["tokens"] == 3 * 500 and padded["bytes"]["logits"] == m["bytes"]["logits"]
    # without prepare_report.json's `longest` list: the top 1% from the longest down to p99, then p90
    assert footprint.estimate_top({"max": 900, "p99": 500, "p90": 120, "p50": 100}, 300, 800, 6) == (
        800, 700, 500, 120, 120, 120)


def test_with_checkpointing_the_logits_and_the_recomputed_layer_are_not_counted_together(ft_home):
    """The output layer's backward frees the logits before the first checkpointed layer is recomputed: the peak
    counts the larger of the two. Without checkpointing every layer's activations and the logits coexist."""
    cfg = config.load("smollm2")
    st = small_setting(cfg, checkpointing=True)
    b = footprint.memory(cfg, SMALL, st, 2)["bytes"]
    layer = 200 * footprint.activation_bytes(SMALL, st, cfg.lora.dropout, shapes.targeted(SMALL, cfg.lora.target_modules))
    assert b["logits"] == 200 * 0.5 * 1000 * 12 and b["overlap"] == -min(layer, b["logits"])
    assert st.frozen == "bf16"  # an unquantized model on a GPU: a half-precision residual stream
    assert b["activations"] == layer + 200 * 2 * 2 * 64 + 200 * 12 * 64  # + one residual a layer, the edges
    assert footprint.memory(cfg, SMALL, replace(st, checkpointing=False), 2)["bytes"]["overlap"] == 0


def preference_cfg(method: str, precompute: bool = False):
    cfg = config.load("smollm2")
    cfg.train["method"], cfg.train["precompute_ref"] = method, precompute  # the preference task's keys
    return cfg


def test_a_preference_micro_batch_is_pairs_and_dpo_adds_the_reference_forward(ft_home):
    """b pairs = 2b sequences with grad, padded together (TRL), logits on every position; dpo/ipo without
    train.precompute_ref add the no-grad reference forward (one layer's intermediates), orpo/simpo do not."""
    dpo = preference_cfg("dpo")
    st = replace(footprint.setting(dpo, "H100"), length=100, typical=100, top=())
    assert st.pairs and st.reference and not st.padding_free and not st.answer_only
    m = footprint.memory(dpo, SMALL, st, 2)
    assert m["sequences"] == 4 and m["tokens"] == 4 * 100
    assert m["bytes"]["logits"] == 400 * 1000 * 12
    wide = 4 if st.frozen == "fp32" and st.quant_bits else 2  # the MLP's intermediates' dtype
    assert m["bytes"]["reference"] == 400 * (16 * 64 + 3 * wide * 128)
    for other in (preference_cfg("orpo"), preference_cfg("simpo"), preference_cfg("dpo", precompute=True)):
        o = replace(footprint.setting(other, "H100"), length=100, typical=100, top=())
        assert footprint.memory(other, SMALL, o, 2)["bytes"]["reference"] == 0
    sft = footprint.memory(config.load("smollm2"), SMALL, small_setting(config.load("smollm2")), 2)
    assert sft["sequences"] == 2 and sft["bytes"]["reference"] == 0


def test_merge_and_export_ram_is_judged_against_colabs_t4_host(ft_home):
    """An 8B model's fp16 merge needs ~15 GB of RAM: over the 12.7 GB of Colab's T4 runtime; disk per GGUF."""
    cfg = config.load("llama3-alpaca")
    n = 8_030_261_248
    t4 = fit.later_steps(cfg, n, "T4")
    assert t4["merge"]["ram_gb"] == round(n * 2 / 2**30, 2) and t4["merge"]["host_ram_gb"] == 12.7
    assert t4["merge"]["ram_fits"] is False and t4["export"]["ram_fits"] is False
    assert t4["export"]["disk_gguf_gb"] == {q: round(n * b / 2**30, 2) for q, b in (("f16", 2), ("q8_0", 34 / 32))
                                            if q in cfg.export.quantizations}
    assert fit.later_steps(cfg, n, "H100")["merge"]["ram_fits"] is None  # host RAM not known for that card
    small = fit.later_steps(config.load("smollm2"), 134_515_008, "cpu")
    assert small["merge"]["ram_fits"] is True and small["merge"]["ram_gb"] == round(134_515_008 * 4 / 2**30, 2)


def test_the_eval_report_line_says_measured_over_predicted():
    info = {"predicted_peak_gb": 2.0, "measured_peak_gb": 2.6, "hardware": {"device": "cpu"}}
    got = footprint.peak_summary(info)
    assert got["measured_over_predicted"] == 1.3 and got["line"].startswith("peak memory 2.60 GB measured (peak RSS), "
                                                                            "2.00 GB predicted (make plan): 1.30x")
    assert "under-predicted" in got["line"] and footprint.peak_summary({"peak_rss_mb": 10}) is None


class Rows(list):
    """A stand-in for an encoded split: rows by index, a column by name."""

    def __getitem__(self, k):
        return [r[k] for r in self] if isinstance(k, str) else list.__getitem__(self, k)


def test_auto_probe_starts_from_the_plans_micro_batch_when_asked(ft_home, monkeypatch):
    """runtime.probe_from_plan: the first probe is make plan's micro-batch for the run's lengths; the result is still
    the probe's (a fake memory of 1 GiB per example: 2 fits the 2.7 GiB budget of a 4 GB cap, 4 does not)."""
    import torch

    from common.training import loss
    from common.training.plan import Plan

    seen = []
    monkeypatch.setattr(batching, "collate", lambda ds, idx, *a: {"n": len(idx)})
    monkeypatch.setattr(batching, "probe_step", lambda model, plan, batch, answer_only: seen.append(batch["n"]))
    monkeypatch.setattr(loss, "align_dtypes", lambda *a: None)
    monkeypatch.setattr(batching.gc, "collect", lambda: 0)
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: seen[-1] * 2**30)
    ds = Rows({"input_ids": [1] * n} for n in [250] * 4 + [60] * 60)
    plan, model = Plan("cuda", "bf16", 0, "adamw_torch"), torch.nn.Linear(2, 2)
    cfg = config.load("smollm2", ["runtime.probe_from_plan=true"])  # effective batch 8
    start = fit.planned_micro_batch(cfg, plan, [len(r["input_ids"]) for r in ds], 8, 4.0)
    assert start == 4  # what make plan predicts fits 4 GB for these lengths (the fake memory says otherwise)
    b = batching.choose(cfg, plan, model, ds, 0, 4.0)
    assert seen == [4, 2] and b.micro_batch == 2 and "make plan's 4" in b.why
    seen.clear()
    monkeypatch.setattr(fit, "planned_micro_batch", lambda *a: 1)  # a plan that under-sizes: the probe goes up
    assert batching.choose(cfg, plan, model, ds, 0, 4.0).micro_batch == 2 and seen == [1, 2, 4]
    seen.clear()
    off = batching.choose(config.load("smollm2"), plan, model, ds, 0, 4.0)  # the default: from the top
    assert seen == [8, 4, 2] and off.micro_batch == 2
