"""GPU tests (`make test-gpu`): every recipe end to end through the Makefile in tiny mode on CUDA, and a bench
smoke at a real model's shape. Skipped where there is no CUDA (CI and the CPU machines)."""
from __future__ import annotations

import json

import pytest
import torch

from common import paths
from conftest import make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("recipe", paths.recipe_names())
def test_recipe_end_to_end_tiny_on_cuda(recipe, ft_home):
    make(ft_home, "all", f"RECIPE={recipe}", "TINY=1")
    out = ft_home / "outputs" / f"{recipe}-tiny"
    info = json.loads((out / "adapter/run_info.json").read_text())
    assert info["plan"]["device"] == "cuda" and info["global_step"] == 4
    assert json.loads((out / "merge_report.json").read_text())["max_abs_logit_diff"] < 0.1
    assert json.loads((out / "eval/metrics.json").read_text())["n_examples"] == 8
    merge = json.loads((out / "merge_report.json").read_text())  # the parity gate on CUDA (bf16 reload)
    assert merge["token_agreement"] >= 0.98 and merge["answer_match"] >= 0.5, merge
    from common import config

    if config.load(recipe).model.arch == "causal":  # export reloads each GGUF on CUDA; f16 = merged/'s weights
        make(ft_home, "export", f"RECIPE={recipe}", "TINY=1")
        files = json.loads((out / "export/export_report.json").read_text())["files"]
        assert files["f16"]["answer_match"] == 1.0 and files["f16"]["prompt_tokens_match"] == 1.0, files


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tinyllama_4bit_modules_to_save_on_cuda(precision, ft_home):
    """The T4 setup (fp16) and bf16, 4-bit with lm_head/embed_tokens trained, both loss paths."""
    for answer_only in ("true", "false"):
        make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", f"ARGS=--set train.precision={precision} "
             f"--set train.answer_only_logits={answer_only} --set train.max_steps=2")
        info = json.loads((ft_home / "outputs/tinyllama-tiny/adapter/run_info.json").read_text())
        assert info["plan"]["precision"] == precision and info["plan"]["quantization_bits"] == 4


def test_bench_smoke_at_the_real_tinyllama_shape(ft_home):
    make(ft_home, "bench", "RECIPE=tinyllama", "SHAPE=full", "BENCH=--steps 2 --warmup 1 --only ours,generation "
         "--gen-samples 4")
    res = json.loads((ft_home / "outputs/bench/tinyllama-full.json").read_text())
    ours = res["training"]["ours"]
    assert ours["frozen_linear_params"] > 900e6 and ours["peak_vram_mb"] > 500 and ours["tokens_per_s"] > 0
    assert "peak VRAM GB" in (ft_home / "outputs/bench/tinyllama-full.md").read_text()
