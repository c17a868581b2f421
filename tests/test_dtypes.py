"""The dtype of every trainable weight and of the activations that meet it is decided in one place
(common/training.py), so the mixed-precision paths a GPU takes (fp16 on a T4, bf16 elsewhere, 4-bit with
modules_to_save, with and without the answer-only output layer) train here on the CPU too. Before this was
decided on purpose, bf16 + 4-bit + modules_to_save crashed with 'expected m1 and m2 to have the same dtype'."""
from __future__ import annotations

import math

import pytest
import torch

from common import config, io, modeling, paths, training
from conftest import step

CASES = [  # (precision, quantization bits, answer-only output layer)
    ("bf16", 4, True), ("bf16", 4, False), ("fp16", 4, True), ("fp16", 4, False), ("bf16", 0, True),
    ("fp16", 0, True),
]


@pytest.fixture(scope="module")
def tinyllama_data(tmp_path_factory, model_cache):
    """One prepared tinyllama-tiny split shared by the matrix below."""
    home = tmp_path_factory.mktemp("dtypes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FT_HOME", str(home))
        mp.setenv("FT_CACHE", str(model_cache))
        step("01_prepare", "--recipe", "tinyllama", "--tiny")
        yield home


@pytest.mark.parametrize("precision, bits, answer_only", CASES)
def test_mixed_precision_trains_with_fp32_trainable_weights(tinyllama_data, monkeypatch, tmp_path, precision, bits,
                                                            answer_only):
    monkeypatch.setenv("FT_HOME", str(tinyllama_data))
    cfg = config.load("tinyllama", [f"train.answer_only_logits={str(answer_only).lower()}", "train.max_steps=2",
                                    "train.eval_strategy=no", "train.save_strategy=no"], tiny=True)
    assert cfg.lora.modules_to_save == ["lm_head", "embed_tokens"]  # the recipe's own, the case that crashed
    plan = modeling.Plan("cpu", precision, bits, "adamw_torch")  # what a T4 (fp16) or an L4/A100 (bf16) would plan
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    ds = training.encode_split(cfg, tok, io.read_jsonl(paths.RunPaths(cfg.run).split("train"))[:8], "train")
    trainer = training.make_trainer(cfg, plan, training.load_for_training(cfg, plan, source), tok, ds, ds.select([]),
                                    str(tmp_path))
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n and "lm_head" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    result = trainer.train()
    assert math.isfinite(result.training_loss) and trainer.state.global_step == 2


def test_align_dtypes_casts_only_trainable_weights_and_reports_what_it_cast():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    frozen = torch.nn.Linear(4, 4).to(torch.float16).requires_grad_(False)
    model = torch.nn.Sequential(lin, frozen)
    cast = training.align_dtypes(model, modeling.Plan("cpu", "bf16", 4, "adamw_torch"))
    assert cast == {"bfloat16": 2} and lin.weight.dtype == torch.float32 and frozen.weight.dtype == torch.float16


def test_answer_loss_runs_under_the_plans_autocast():
    """bf16 activations meeting an fp32 output layer: the loss must not depend on who called it."""
    head = torch.nn.Linear(8, 16)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        head(hidden)  # what answer_loss did outside accelerate's autocast
    with training.autocast(modeling.Plan("cpu", "bf16", 0, "adamw_torch")):
        assert head(hidden).dtype == torch.bfloat16
    with training.autocast(modeling.Plan("cpu", "fp32", 0, "adamw_torch")):
        with pytest.raises(RuntimeError, match="dtype"):
            head(hidden)  # fp32 plans add no autocast


def test_the_issue_command_trains_bf16_4bit_with_modules_to_save(ft_home):
    """make train RECIPE=tinyllama TINY=1 ARGS="--set train.precision=bf16 --set train.max_steps=2" crashed."""
    from conftest import make

    make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", "ARGS=--set train.precision=bf16 --set train.max_steps=2")
    info = io.read_json(ft_home / "outputs/tinyllama-tiny/adapter/run_info.json")
    assert info["plan"]["precision"] == "bf16" and info["plan"]["quantization_bits"] == 4 and info["global_step"] == 2
