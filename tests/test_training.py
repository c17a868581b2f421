"""The training speed-ups change speed, not the maths: answer-only loss == the model's loss; CheapDropout drops
at rate p with the usual scaling; `make bench` measures and writes what it says."""
from __future__ import annotations

import json

import pytest
import torch

from common import config, modeling, training
from conftest import step


def tiny_lora(ft_home, *sets: str):
    cfg = config.load("smollm2", list(sets), tiny=True)
    plan = modeling.plan(cfg)
    return cfg, plan, training.load_for_training(cfg, plan, modeling.model_source(cfg))


def batch_with_masked_prompts(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100  # prompt
    labels[2, 12:] = -100  # right padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_answer_only_loss_and_gradients_equal_the_models_own(ft_home):
    cfg, plan, model = tiny_lora(ft_home, "lora.dropout=0.0")
    model.eval()  # no dropout: both passes see the same network
    batch = batch_with_masked_prompts(model.config.vocab_size)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total, n = training.answer_loss(model, batch)
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())
    loss = total / n
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-6, rtol=1e-4), name


def test_cheap_dropout_drops_at_rate_p_and_scales_like_torch():
    torch.manual_seed(0)
    d = training.cheap_dropout_class()(0.05)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002, dropped  # 1e6 draws: 4 sigma is ~0.001
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.95))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.95)  # gradient flows exactly where the value was kept
    d.eval()
    assert d(x) is x
    rows = d.train()(torch.ones(4, 64, 64)).eq(0).float().mean(dim=(1, 2))
    assert rows.std() < 0.02  # no lane or row pattern: every slice drops about p


def test_lora_layers_get_cheap_dropout_on_cpu_and_not_when_switched_off(ft_home):
    _, _, model = tiny_lora(ft_home)
    cls = training.cheap_dropout_class().__name__
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(type(d).__name__ == cls and d.p == 0.05 for d in drops)
    _, _, plain = tiny_lora(ft_home, "train.fast_dropout=false")
    assert all(type(d) is torch.nn.Dropout for m in plain.modules()
               if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) for d in m.lora_dropout.values())


def test_bench_measures_every_variant_and_writes_its_tables(ft_home):
    step("01_prepare", "--recipe", "smollm2", "--tiny")
    p = step("bench", "--recipe", "smollm2", "--tiny", "--steps", "2", "--warmup", "1", "--gen-samples", "4",
             "--rounds", "2", "--only", "ours,ours-full-logits,trl-defaults-fp32,reference,generation")
    res = json.loads((ft_home / "outputs/bench/smollm2-tiny.json").read_text())
    md = (ft_home / "outputs/bench/smollm2-tiny.md").read_text()
    tr = res["training"]
    assert set(tr) == {"ours", "ours-full-logits", "trl-defaults-fp32", "reference"}
    cfg = config.load("smollm2", tiny=True)
    for name, r in tr.items():
        assert r["steps_timed"] == 2 and r["s_per_step"] > 0 and 0 < r["mfu"] < 1, (name, r)
        assert len(r["step_seconds"]) == 2 and r["s_per_step"] == pytest.approx(sum(r["step_seconds"]) / 2, abs=2e-3)
        assert len(r["s_per_step_by_round"]) == 2 and r["s_per_step"] == min(r["s_per_step_by_round"])
        assert r["tokens_per_s"] == pytest.approx(r["non_padding_tokens"] / r["seconds"], rel=2e-2)  # seconds rounded
        assert r["peak_rss_mb"] > 100 and f"| {name}: " in md
    ref = tr["reference"]  # every example padded to 512 tokens: the padded count is exact
    assert ref["padded_tokens"] == 2 * cfg.train.batch_size * cfg.train.grad_accum * 512
    assert ref["padding_share"] > 0.5 and ref["labelled_tokens"] == ref["non_padding_tokens"]
    ours = tr["ours"]  # answer-only loss: fewer labelled than real tokens; length grouping: little padding
    assert ours["labelled_tokens"] < ours["non_padding_tokens"] and ours["padding_share"] < 0.2
    assert ours["non_padding_tokens"] == tr["ours-full-logits"]["non_padding_tokens"]  # same batches
    g = res["generation"]
    assert g["samples"] == 4 and g["identical_outputs"] == 4 and g["speedup"] > 0
    assert res["matmul_peak_gflops"]["fp32"] > 1 and res["machine"]["cores"] >= 1
    assert "ours vs reference" in p.stdout and "generation samples/s" in p.stdout


def test_a_failed_bench_variant_shows_its_exception_not_a_progress_bar(ft_home):
    step("01_prepare", "--recipe", "smollm2", "--tiny")
    p = step("bench", "--recipe", "smollm2", "--tiny", "--steps", "1", "--warmup", "0", "--only", "ours",
             "--set", "model.attn_implementation=no_such_kernel", check=False)
    assert p.returncode == 2 and "variant(s) failed: ours" in p.stderr
    md = (ft_home / "outputs/bench/smollm2-tiny.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ours | failed: "))
    assert "no_such_kernel" in row and "it/s" not in row, row


def test_tensorboard_tracking_logs_the_losses_under_the_run(ft_home):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    step("01_prepare", "--recipe", "smollm2", "--tiny")
    step("02_sft_qlora", "--recipe", "smollm2", "--tiny", "--set", "train.report_to=tensorboard")
    out = ft_home / "outputs/smollm2-tiny"
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no event file under outputs/<run>/tensorboard"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    rows = {int(r["step"]): float(r["loss"]) for r in csv.DictReader((out / "train_log.csv").open()) if r["loss"]}
    assert logged and set(logged) == set(rows)
    assert all(abs(logged[s] - rows[s]) < 1e-4 for s in rows)  # the same losses the CSV and loss.png show
    assert {e.step for e in acc.Scalars("eval/loss")}  # evaluations are logged too


def test_a_tracker_that_is_not_installed_is_replaced_with_a_note(ft_home):
    from common import config, modeling

    cfg = config.load("smollm2", ["train.report_to=[tensorboard, mlflow]"], tiny=True)
    plan = modeling.plan(cfg)
    got = training.trackers(cfg, plan, ft_home / "tb")
    assert got == ["tensorboard"] and any("report_to mlflow -> none" in n for n in plan.notes)
    with pytest.raises(config.ConfigError, match="train.report_to must be none or a list of"):
        config.load("smollm2", ["train.report_to=neptune"])
