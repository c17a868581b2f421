"""make plan: the predicted footprint by value for a known shape, plan.json, the "does not fit -> change" advice, every
recipe answered offline in seconds, and a run's measured peak checked against the prediction."""
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
from common.training import footprint, shapes

# A Llama of width 64, feed-forward 128, 2 layers, 4 heads of 16 (2 key/value heads), vocabulary 1000, untied.
SMALL = shapes.Shape("llama", 64, 128, 2, 4, 2, 16, 1000, False)


def small_setting(cfg, **kw):
    st = replace(footprint.setting(cfg, "H100"), length=100, typical=100, answer_share=0.5, padding_free=False)
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
    p = footprint.predict(cfg, "T4")
    assert not p["fits"] and p["predicted_peak_gb"] > 15.0
    changes = [a["change"] for a in p["advice"]]
    assert changes[0] == "shorter train.max_length" and changes == sorted(changes, key=footprint.ORDER.index)
    assert all(a["predicted_peak_gb"] <= 15.0 for a in p["advice"] if not a["set"].startswith("GPU="))
    first = p["advice"][0]["set"]
    again = footprint.predict(config.load("llama3-sharegpt", ["train.max_length=4096", first]), "T4")
    assert again["fits"] and again["predicted_peak_gb"] == p["advice"][0]["predicted_peak_gb"]
    assert footprint.predict(cfg, "H100")["fits"]


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
                got = footprint.predict(cfg, device, shape)
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
    assert 0.6 < short < long < 1.0  # the process, the stand-in, and activations of 4 x the longest example
    st = replace(footprint.setting(cfg, "cpu"), length=250, typical=40, answer_share=0.5)  # p90
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
