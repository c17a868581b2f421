"""Every recipe, fast (its full pipeline runs for one recipe per architecture family in test_pipeline.py): its data
prepares, its prompts encode with its own stand-in tokenizer and chat template (labels only on the answer, the
answer ends on the end-of-turn token, one BOS, the generation prompt is exactly the training prompt), and its
model trains one step in this process, on its quantization path."""
from __future__ import annotations

import importlib
import json
import math

import pytest

from common.core import config, io, paths
from common.data import prompts
from common.model import arch, modeling
from common.training import builder
from common.training import plan as run_plan

pytestmark = pytest.mark.e2e  # trains a model (make test-fast leaves it out)


@pytest.mark.parametrize("recipe", paths.recipe_names())
def test_recipe_prepares_encodes_and_trains_one_step(recipe, ft_home, tmp_path):
    prepare = importlib.import_module("scripts.01_prepare")
    assert prepare.main(["--recipe", recipe, "--tiny"]) == 0
    cfg = config.load(recipe, ["train.max_steps=1", "train.eval_strategy=no", "train.save_strategy=no",
                               "train.load_best_model_at_end=false", "train.max_length=1024"], tiny=True)
    if cfg.data.export_formatted:  # the formatted training set the reference notebook wrote
        assert json.loads((paths.RunPaths(cfg.run).data / cfg.data.export_formatted).read_text())
    rows = io.read_jsonl(paths.RunPaths(cfg.run).split("train"))[:6]
    source = modeling.model_source(cfg)
    tok = modeling.load_tokenizer(cfg, source)
    a = arch.get(cfg)
    whole = 0
    for ex in rows:
        ids, labels = a.encode_train(cfg, tok, ex)
        answer = [i for i, x in enumerate(labels) if x != -100]
        assert answer and len(ids) <= cfg.train.max_length
        if len(ids) == cfg.train.max_length or a.prompt_truncated(cfg, tok, ex):
            continue  # cut by train.max_length: no end-of-turn to find (prepare counts these)
        whole += 1
        if cfg.model.arch == "causal":
            prompt = a.encode_prompt(cfg, tok, ex)
            assert len(ids) == len(labels) and ids[: len(prompt)] == prompt, "generation prompt != training prompt"
            if prompts.adds_bos(tok):
                assert ids[0] == tok.bos_token_id != ids[1], "BOS missing or doubled"
            if cfg.train.loss_on == "completion":
                assert answer == list(range(len(prompt), len(ids))), "a prompt token is trained"
        last = labels[answer[-1]]
        assert last == tok.eos_token_id or tok.decode([last]).strip() in ("<|im_end|>", "<|eot_id|>", "</s>"), \
            f"the answer does not end on the end-of-turn token: {tok.decode(labels[answer[-1] - 3:])!r}"
    assert whole, "every example was cut by train.max_length"
    plan = run_plan.resolve(cfg)
    ds = builder.encode_split(cfg, tok, rows, "train")
    trainer = builder.make_trainer(cfg, plan, builder.load_for_training(cfg, plan, source), tok, ds, ds.select([]),
                                    str(tmp_path))
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss) and result.training_loss > 0
    assert plan.quant_bits == (cfg.quantization.bits if modeling.cuda() or run_plan.bnb_usable()[0] else 0)
