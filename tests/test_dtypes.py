"""The dtype of every trainable weight and of the activations that meet it is decided in one place
(common/training/builder.py), so the mixed-precision paths a GPU takes (fp16 on a T4, bf16 elsewhere, 4-bit with
modules_to_save, with and without the answer-only output layer) train here on the CPU too. Before this was
decided on purpose, bf16 + 4-bit + modules_to_save crashed with 'expected m1 and m2 to have the same dtype'."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import step

from common.core import config, io, paths
from common.model import modeling
from common.training import builder, loss
from common.training import plan as run_plan

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


def _trainer(cfg, plan, rows: int, out):
    """Our trainer (model loaded for training) on the first `rows` prepared training examples."""
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    ds = builder.encode_split(cfg, tok, io.read_jsonl(paths.RunPaths(cfg.run).split("train"))[:rows], "train")
    return builder.make_trainer(cfg, plan, builder.load_for_training(cfg, plan, source), tok, ds, ds.select([]),
                                 str(out))


@pytest.mark.e2e
@pytest.mark.parametrize("precision, bits, answer_only", CASES)
def test_mixed_precision_trains_with_fp32_trainable_weights(tinyllama_data, monkeypatch, tmp_path, precision, bits,
                                                            answer_only):
    monkeypatch.setenv("FT_HOME", str(tinyllama_data))
    cfg = config.load("tinyllama", [f"runtime.answer_only_logits={str(answer_only).lower()}", "train.max_steps=2",
                                    "train.eval_strategy=no", "train.save_strategy=no"], tiny=True)
    assert cfg.lora.modules_to_save == ["lm_head", "embed_tokens"]  # the recipe's own, the case that crashed
    plan = run_plan.Plan("cpu", precision, bits, "adamw_torch")  # what a T4 (fp16) or an L4/A100 (bf16) would plan
    trainer = _trainer(cfg, plan, 8, tmp_path)
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n and "lm_head" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}
    result = trainer.train()
    assert math.isfinite(result.training_loss) and trainer.state.global_step == 2


def test_align_dtypes_casts_only_trainable_weights_and_reports_what_it_cast():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    frozen = torch.nn.Linear(4, 4).to(torch.float16).requires_grad_(False)
    model = torch.nn.Sequential(lin, frozen)
    cast = loss.align_dtypes(model, run_plan.Plan("cpu", "bf16", 4, "adamw_torch"))
    assert cast == {"bfloat16": 2} and lin.weight.dtype == torch.float32 and frozen.weight.dtype == torch.float16


def test_answer_loss_runs_under_the_plans_autocast():
    """bf16 activations meeting an fp32 output layer: the loss must not depend on who called it."""
    head = torch.nn.Linear(8, 16)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        head(hidden)  # what answer_loss did outside accelerate's autocast
    with loss.autocast(run_plan.Plan("cpu", "bf16", 0, "adamw_torch")):
        assert head(hidden).dtype == torch.bfloat16
    with loss.autocast(run_plan.Plan("cpu", "fp32", 0, "adamw_torch")):
        with pytest.raises(RuntimeError, match="dtype"):
            head(hidden)  # fp32 plans add no autocast


@pytest.mark.e2e
def test_the_issue_command_trains_bf16_4bit_with_modules_to_save(ft_home):
    """make train RECIPE=tinyllama TINY=1 ARGS="--set train.precision=bf16 --set train.max_steps=2" crashed."""
    from conftest import make

    make(ft_home, "train", "RECIPE=tinyllama", "TINY=1", "ARGS=--set train.precision=bf16 --set train.max_steps=2")
    info = io.read_json(ft_home / "outputs/tinyllama-tiny/adapter/run_info.json")
    assert info["plan"]["precision"] == "bf16" and info["plan"]["quantization_bits"] == 4 and info["global_step"] == 2


def test_frozen_dtype_follows_the_precision_and_quantization_upcast_frozen():
    """Where the frozen, non-quantized weights train in which dtype (by value, every branch)."""
    def frozen(device, precision, bits, upcast=True):
        return run_plan.frozen_dtype(run_plan.Plan(device, precision, bits, "adamw_torch"), upcast)

    assert frozen("cuda", "bf16", 4) == "fp32"  # peft's preparation (the reference setups)
    assert frozen("cuda", "bf16", 4, upcast=False) == "bf16" and frozen("cuda", "fp16", 8, upcast=False) == "fp16"
    assert frozen("cpu", "bf16", 4, upcast=False) == "bf16"  # asked for explicitly: honoured on a CPU too
    assert frozen("cuda", "bf16", 0) == "bf16" and frozen("cpu", "bf16", 0) == "fp32"  # unquantized: as before
    assert frozen("cuda", "fp32", 4, upcast=False) == "fp32"  # nothing below fp32 in an fp32 run
    cfg = config.load("tinyllama", ["train.precision=bf16", "quantization.upcast_frozen=false"], tiny=True)
    p = run_plan.resolve(cfg)  # the real plan on this machine (bitsandbytes' CPU backend keeps the 4 bits)
    assert (p.quant_bits, p.precision, p.frozen) == (4, "bf16", "bf16")
    assert run_plan.resolve(config.load("tinyllama", ["train.precision=bf16"], tiny=True)).frozen == "fp32"


def _saved_bytes(fn) -> int:
    """(fn()'s result, the bytes autograd keeps for the backward pass while it runs, each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.e2e
def test_quantized_model_without_the_fp32_upcast_keeps_its_frozen_weights_and_activations_in_bf16(tinyllama_data,
                                                                                                monkeypatch, tmp_path):
    """quantization.upcast_frozen=false: norms, embeddings and lm_head stay bf16 next to the 4-bit weights, the
    residual stream runs in bf16 (less memory kept for the backward pass), the loss and LoRA gradients agree with
    the upcast model's to bf16 rounding, and the recipe's own modules_to_save case trains."""
    monkeypatch.setenv("FT_HOME", str(tinyllama_data))
    base = ["train.precision=bf16", "train.max_steps=2", "train.eval_strategy=no", "train.save_strategy=no",
            "lora.dropout=0.0"]
    runs = {}
    for upcast in (True, False):
        cfg = config.load("tinyllama", [*base, "lora.modules_to_save=[]", f"quantization.upcast_frozen={str(upcast).lower()}"],
                          tiny=True)
        plan = run_plan.resolve(cfg)
        torch.manual_seed(0)
        trainer = _trainer(cfg, plan, 4, tmp_path / str(upcast))
        model = trainer.model
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype != torch.uint8}
        assert frozen and set(frozen.values()) == {torch.float32 if upcast else torch.bfloat16}, frozen
        assert any(p.dtype == torch.uint8 for p in model.parameters())  # the 4-bit weights, untouched
        batch = trainer.data_collator(list(trainer.train_dataset))
        with loss.autocast(plan):
            total, n = loss.answer_loss(model, batch)
            out, kept = _saved_bytes(lambda: model.get_base_model().model(input_ids=batch["input_ids"],
                                                                          attention_mask=batch["attention_mask"]))
            hidden = out.last_hidden_state
        (total / n).backward()
        grads = torch.cat([p.grad.flatten() for n_, p in sorted(model.named_parameters()) if "lora_B" in n_])
        runs[upcast] = dict(loss=(total / n).item(), kept=kept, hidden=hidden.dtype, grads=grads)
    assert runs[True]["hidden"] == torch.float32 and runs[False]["hidden"] == torch.bfloat16
    assert runs[False]["kept"] < 0.9 * runs[True]["kept"], (runs[False]["kept"], runs[True]["kept"])  # 0.82 here
    assert abs(runs[False]["loss"] - runs[True]["loss"]) < 0.02 * abs(runs[True]["loss"])
    cos = torch.nn.functional.cosine_similarity(runs[False]["grads"], runs[True]["grads"], dim=0)
    assert cos > 0.99 and runs[False]["grads"].abs().sum() > 0, cos
    # the recipe's own modules_to_save (trainable fp32 copies of lm_head/embed_tokens) next to bf16 frozen weights
    cfg = config.load("tinyllama", [*base, "quantization.upcast_frozen=false"], tiny=True)
    trainer = _trainer(cfg, run_plan.resolve(cfg), 8, tmp_path / "mts")
    result = trainer.train()
    assert math.isfinite(result.training_loss) and trainer.state.global_step == 2


@pytest.mark.e2e
def test_trainer_counts_flops_as_hf_does_with_the_parameters_counted_once(tinyllama_data, monkeypatch, tmp_path):
    """Our trainer's floating_point_ops gives HF's value, walking the model's parameters once, not per micro-batch."""
    from transformers import Trainer

    monkeypatch.setenv("FT_HOME", str(tinyllama_data))
    cfg = config.load("tinyllama", ["train.max_steps=1", "train.eval_strategy=no", "train.save_strategy=no"], tiny=True)
    trainer = _trainer(cfg, run_plan.resolve(cfg), 4, tmp_path)
    batches = [{"input_ids": torch.ones(b, n, dtype=torch.long)} for b, n in ((2, 7), (3, 11), (1, 5))]
    want = [Trainer.floating_point_ops(trainer, b) for b in batches]
    calls = []
    real = trainer.model.num_parameters
    monkeypatch.setattr(trainer.model, "num_parameters", lambda **kw: calls.append(kw) or real(**kw), raising=False)
    assert [trainer.floating_point_ops(b) for b in batches] == want and want[1] == 6 * 33 * real(exclude_embeddings=True)
    assert calls == [{"exclude_embeddings": True}]
