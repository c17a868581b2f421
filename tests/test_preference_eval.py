"""Preference eval (issue 40): preference accuracy of the starting and the tuned model on held-out pairs, by value
from hand-made log-probabilities; each answer's log-probability equal to a direct forward pass on a tiny model; the
`longer` baseline; the training log's DPO shape sentence; report.md, report.html and the card; and one tiny
`make all` of the preference recipe."""
from __future__ import annotations

import csv
import json

import pytest

from common.core import config, io, paths
from common.data import prompts
from common.evaluation import compare, forgetting, preference
from common.shipping import cards, report
from common.tasks import chat

U, A = "user", "assistant"


def t(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def pair_row(i: int, chosen: str, rejected: str) -> dict:
    """A processed preference row as the task writes it (DESIGN: completion = chosen)."""
    return {"id": str(i), "prompt": [t(U, f"question {i}")], "chosen": [t(A, chosen)], "rejected": [t(A, rejected)],
            "completion": [t(A, chosen)]}


def hand_pairs(n: int) -> preference.Pairs:
    """n pairs whose chosen answer scores 2 tokens and rejected 4 (labels after a 1-token prompt)."""
    ig = prompts.IGNORE
    chosen, rejected = ([0, 1, 2], [ig, 1, 2]), ([0, 1, 2, 3, 4], [ig, 1, 2, 3, 4])
    return preference.Pairs(list(range(n)), [chosen, rejected] * n, 0)


def test_preference_accuracy_and_reward_margin_by_value():
    n = 40
    rows = [pair_row(i, "a longer chosen answer", "short") if i % 4 else pair_row(i, "short", "a longer one")
            for i in range(n)]
    # mean loss per token. start: pairs 0,2,4.. prefer chosen in total (-2.0 vs -2.4), odd ones prefer rejected
    # (-3.0 vs -2.0); tuned: every pair prefers chosen in total (-1.0 vs -4.0). Per token: start even pairs -1.0 vs
    # -0.6 (rejected), odd -1.5 vs -0.5 (rejected); tuned -0.5 vs -1.0 (chosen).
    start = [x for i in range(n) for x in ((1.0, 0.6) if i % 2 == 0 else (1.5, 0.5))]
    tuned = [0.5, 1.0] * n
    p, per = preference.evaluate(rows, hand_pairs(n), start, tuned, 0.1, 1000)
    assert p["n"] == n and p["start"] == 0.5 and p["tuned"] == 1.0 and p["mean"] == pytest.approx(0.5)
    assert p["per_token"]["start"] == 0.0 and p["per_token"]["tuned"] == 1.0
    assert p["verdict"] == "better" and p["ci_low"] > 0 and p["pairs_differing"] == 20
    assert p["examples_to_resolve"] == 30  # never fewer than a verdict needs
    assert p["longer"] == 0.75  # three pairs in four have the longer chosen answer
    # margin: 0.1 * ((tuned - start) chosen - (tuned - start) rejected); even: 0.1*((-1+2) - (-4+2.4)) = 0.26,
    # odd: 0.1*((-1+3) - (-4+2)) = 0.4
    assert p["mean_reward_margin"] == pytest.approx(0.33) and p["reward_accuracy"] == 1.0 and p["beta"] == 0.1
    assert per[1]["start_chosen_logp"] == -3.0 and per[1]["tuned_rejected_logp"] == -4.0
    assert per[1]["reward_margin"] == pytest.approx(0.4) and per[1]["start_prefers_chosen"] == 0
    few, _ = preference.evaluate(rows[:8], hand_pairs(8), start[:16], tuned[:16], None, 1000)
    assert few["verdict"] == "too few examples to tell" and few["mean_reward_margin"] is None


def test_the_longer_baseline_picks_the_longer_answer_and_halves_a_tie():
    rows = [pair_row(0, "long answer", "short"), pair_row(1, "no", "yes!"), pair_row(2, "same", "size")]
    assert preference.longer(rows) == [1.0, 0.0, 0.5]


def test_each_answers_log_probability_equals_a_direct_forward_pass(ft_home):
    import torch
    from transformers import AutoModelForCausalLM

    from common.model import modeling

    cfg = config.load("smollm2", tiny=True)
    source = modeling.model_source(cfg)
    tok, model = modeling.load_tokenizer(cfg, source), AutoModelForCausalLM.from_pretrained(source).eval()
    rows = [{"id": "0", "prompt": [t("system", "Be brief."), t(U, "Name a colour.")], "chosen": [t(A, "Blue.")],
             "rejected": [t(A, "I would rather not say which colour I like best.")]},
            {"id": "1", "prompt": [t(U, "hi")], "chosen": [t(A, "Hello! How can I help you today?")],
             "rejected": [t(A, "go away")]}]
    pairs = preference.encode(cfg, tok, rows)
    got = preference.log_probs(forgetting.losses(model, tok, pairs.sequences), pairs.sequences)  # batched, padded
    for r, (c, j) in zip(rows, zip(got[0::2], got[1::2])):
        for side, (total, per_token) in (("chosen", c), ("rejected", j)):
            prefix = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(r["prompt"] + r[side], tokenize=False)
            answer = full[len(prefix):full.index(tok.eos_token, len(prefix)) + len(tok.eos_token)]
            p_ids = tok(prefix, add_special_tokens=False).input_ids
            a_ids = tok(answer, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([p_ids + a_ids])).logits[0].float()
            lp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1).gather(1, torch.tensor(a_ids)[:, None]).sum().item()
            assert total == pytest.approx(lp, abs=1e-3) and per_token == pytest.approx(lp / len(a_ids), abs=1e-4)
    assert pairs.kept == [0, 1] and pairs.dropped == 0
    assert preference.encode(config.load("smollm2", ["train.max_length=8"], tiny=True), tok, rows).dropped == 2


def write_log(path, chosen: list[float], margins: list[float]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"])
        for i, (c, g) in enumerate(zip(chosen, margins)):
            w.writerow([i + 1, 0.69, c, c - g, g, 0.5 + i / 10])


def test_the_training_log_sentence_says_when_chosen_rewards_fall_while_margins_rise(tmp_path):
    f = tmp_path / "train_log.csv"
    write_log(f, [-0.01, -0.05, -0.2, -0.4], [0.01, 0.05, 0.2, 0.5])
    curves = preference.reward_curves(f)
    assert set(curves) == set(preference.REWARD_COLUMNS) and curves["rewards/chosen"][0] == (1, -0.01)
    assert preference.usual_shape(curves) == preference.USUAL_SHAPE
    write_log(f, [0.01, 0.05, 0.2, 0.4], [0.01, 0.05, 0.2, 0.5])  # chosen rewards rose: no sentence
    assert preference.usual_shape(preference.reward_curves(f)) is None
    write_log(f, [-0.01, -0.05, -0.2, -0.4], [0.5, 0.2, 0.1, 0.0])  # margins fell
    assert preference.usual_shape(preference.reward_curves(f)) is None
    f.write_text("step,loss\n1,0.7\n")  # an SFT log: no rewards columns
    assert preference.reward_curves(f) == {} and preference.usual_shape({}) is None


def test_report_md_report_html_and_the_card_show_preference_accuracy(ft_home):
    cfg = config.load("chat")
    rp = paths.RunPaths(cfg.run)
    n = 40
    rows = [pair_row(i, f"answer {i}", "no") for i in range(n)]
    tuned_texts = [f"answer {i}" for i in range(n)]
    base = compare.Answers(["no"] * n, [True] * n, [2.0] * 4)
    tuned = compare.Answers(tuned_texts, [True] * n, [2.0] * 4)
    m, side = compare.compare(cfg, chat.TASK, rows, base, tuned, rows[:1])
    start = [x for i in range(n) for x in ((1.0, 0.6) if i % 2 == 0 else (1.5, 0.5))]
    p, per = preference.evaluate(rows, hand_pairs(n), start, [0.5, 1.0] * n, 0.1, 1000)
    rp.out.mkdir(parents=True)
    write_log(rp.out / "train_log.csv", [-0.01, -0.05, -0.2, -0.4], [0.01, 0.05, 0.2, 0.5])
    p["training_log"] = preference.usual_shape(preference.reward_curves(rp.out / "train_log.csv"))
    m["preference_accuracy"] = p
    compare.write(cfg, rp, m, side, [], {}, files={"preference_pairs.csv": compare.to_csv(per)})
    md = (rp.eval / "report.md").read_text()
    assert ("On 40 held-out `test` pairs the tuned model gives the chosen answer a higher log-probability than the "
            "rejected one in 100.0% of pairs; the model it started from did in 50.0%") in md
    assert "the tuned model is **better than the starting model (the base model)**" in md
    assert "mean reward margin (DPO's implicit reward, beta 0.1" in md and preference.USUAL_SHAPE in md
    assert len(list(csv.DictReader((rp.eval / "preference_pairs.csv").open()))) == n
    assert json.loads((rp.eval / "metrics.json").read_text())["preference_accuracy"]["tuned"] == 1.0

    text, page, _ = report.build(paths.home() / "outputs")
    (row,) = csv.DictReader(text.splitlines())
    assert (row["preference_start"], row["preference_tuned"], row["preference_verdict"]) == ("0.5", "1.0", "better")
    key = f'data-run="{cfg.run}" data-key="preference_accuracy.'
    assert f'{key}start">0.5000<' in page and f'{key}tuned">1.0000<' in page and f'{key}verdict">better<' in page
    assert f'data-key="rewards.shape">{preference.USUAL_SHAPE}.<' in page.replace("&#x27;", "'")
    assert all(f'data-series="{c}"' in page for c in preference.REWARD_COLUMNS)

    rp.adapter.mkdir()
    info = {"preference": {"method": "dpo", "beta": 0.1, "reference": "base model (adapter disabled)",
                           "starting_model": cfg.model.name_or_path, "pairs": 200}}
    io.atomic_write_json(rp.adapter / "run_info.json", info)
    card = cards.render(cfg, rp, "adapter", metrics=m)
    assert ("Preference-tuned with DPO (beta 0.1) on 200 preference pairs, starting from the base model "
            "`HuggingFaceTB/SmolLM2-135M-Instruct`; reference: base model (adapter disabled).") in card
    assert '"dpo"' in card.split("---")[1]  # a hub tag
    simpo = {"method": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "reference": "none", "starting_model": "my/sft"}
    assert cards.preference_line(simpo, cfg) == ("Preference-tuned with SimPO (beta 2.0, gamma 0.5, reference-free), "
                                                 "starting from `my/sft`.")
    assert "Preference accuracy (40 held-out pairs" in card and "starting model 50.0%, tuned 100.0%" in card


@pytest.mark.e2e
def test_make_all_dpo_reports_preference_accuracy(tiny_run):
    run = tiny_run("smollm2-dpo", export=False)
    m = json.loads((run.out / "eval/metrics.json").read_text())
    p = m["preference_accuracy"]
    assert {"start", "tuned", "longer", "per_token", "mean", "ci_low", "ci_high", "verdict", "n",
            "mean_reward_margin", "examples_to_resolve"} <= set(p)
    assert p["n"] + p["dropped"] == m["n_examples"] > 0 and p["beta"] == 0.1
    assert "rougeL" in m["tuned"] and "forgetting" in m
    assert "## Preference accuracy" in (run.out / "eval/report.md").read_text()
    assert "Preference-tuned with" in (run.out / "adapter/README.md").read_text()
