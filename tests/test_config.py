"""Recipes load and validate; overrides work; mistakes fail with the valid keys listed."""
from __future__ import annotations

import json

import pytest

from common.core import config, paths, stamps
from common.data import templates
from common.model import standins
from common.training import schedule

RECIPES = paths.recipe_names()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_validates(name, ft_home):
    cfg = config.load(name)
    assert cfg.name == name and cfg.run == name
    assert cfg.model.name_or_path
    assert cfg.prompt.template in templates.names()
    tiny = config.load(name, tiny=True)
    assert tiny.run == f"{name}-tiny" and tiny.train.max_steps == config.TINY_OVERRIDES["train.max_steps"]
    # tiny mode shrinks sizes only: the prompt, template, masking, LoRA and quantization stay the recipe's
    for section in ("prompt", "lora", "quantization", "task"):
        assert tiny[section] == cfg[section]
    assert tiny.train.loss_on == cfg.train.loss_on and tiny.train.learning_rate == cfg.train.learning_rate


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_header_shows_the_command(name):
    head = (paths.RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[:6]
    assert any(f"RECIPE={name}" in line or (name == "smollm2" and "make all" in line) for line in head)


def test_set_overrides_with_yaml_typed_values(ft_home):
    cfg = config.load("smollm2", ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "data.sample=null"])
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.sample is None


def test_unknown_key_lists_valid_keys(ft_home):
    with pytest.raises(config.ConfigError) as e:
        config.load("smollm2", ["train.learnig_rate=1e-4"])
    msg = str(e.value)
    assert "train.learnig_rate" in msg and "learning_rate" in msg and "max_steps" in msg


def test_unknown_key_in_yaml_names_the_file(ft_home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((paths.RECIPES_DIR / "smollm2.yaml").read_text() + "\nlora:\n  rank: 8\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml: unknown key 'lora.rank'"):
        config.load(str(bad))


def test_wrong_type_in_yaml_names_the_file_and_key(ft_home, tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((paths.RECIPES_DIR / "smollm2.yaml").read_text().replace("max_steps: 60", "max_steps: sixty"))
    with pytest.raises(config.ConfigError, match=r"typo.yaml: train.max_steps must be int, got str 'sixty'"):
        config.load(str(bad))


def test_bare_no_in_yaml_means_the_text_no(ft_home, tmp_path):
    f = tmp_path / "no.yaml"
    f.write_text((paths.RECIPES_DIR / "smollm2.yaml").read_text().replace("  eval_steps:", "  eval_strategy: no\n  eval_steps:"))
    assert config.load(str(f)).train.eval_strategy == "no"
    assert config.load("smollm2", ["train.save_strategy=no"]).train.save_strategy == "no"
    with pytest.raises(config.ConfigError, match="quote it"):
        config.load("smollm2", ["prompt.system=no"])  # free text: a bare no is ambiguous, say so


@pytest.mark.parametrize("item, fragment", [
    ("train.max_steps=ten", "train.max_steps must be int"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("lora.dropout=true", "lora.dropout must be float"),
    ("train=3", "is a section"),
    ("max_steps", "expected key=value"),
    ("runtime.varlen_attention=auto", "runtime.varlen_attention must be bool, got str 'auto'"),
    ("train.packing=true", "unknown key 'train.packing'"),  # removed: the micro-batch probe never sized packed rows
    ("model.unsloth=true", "unknown key 'model.unsloth'"),  # removed: Unsloth's releases need older pins than ours
    ("train.micro_batch=2", "'train.micro_batch' is now runtime.micro_batch"),
])
def test_bad_values_fail_clearly(ft_home, item, fragment):
    with pytest.raises(config.ConfigError, match=fragment):
        config.load("smollm2", [item])


def test_unknown_recipe_lists_recipes(ft_home):
    with pytest.raises(config.ConfigError, match="available: .*smollm2"):
        config.load("nope")


def test_data_path_from_environment(ft_home, monkeypatch):
    monkeypatch.setenv("DATA_PATH", "/data/trn.json")
    assert config.load("smollm2").data.path == "/data/trn.json"
    # an explicit --set still wins
    assert config.load("smollm2", ["data.path=x.json"]).data.path == "x.json"


def test_artifact_root_moves_with_ft_home(ft_home):
    rp = paths.RunPaths("smollm2")
    assert rp.out == ft_home / "outputs" / "smollm2"
    assert rp.split("train") == ft_home / "data" / "processed" / "smollm2" / "train.jsonl"


def test_stamps_change_only_for_the_affected_step(ft_home):
    d = stamps.write(config.load("smollm2"))
    before = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    text = {f.name: f.read_text() for f in d.iterdir()}
    stamps.write(config.load("smollm2", ["eval.max_new_tokens=9"]))
    changed = {f.name for f in d.iterdir() if f.read_text() != text[f.name]}
    assert changed == {"eval.json"}
    unchanged = {f.name for f in d.iterdir() if f.stat().st_mtime_ns == before[f.name]}
    assert unchanged == set(before) - {"eval.json"}
    assert json.loads((d / "eval.json").read_text())["eval"]["max_new_tokens"] == 9


def test_secrets_never_enter_the_config(ft_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    dumped = json.dumps(config.load("smollm2").to_dict())
    assert "hf_secretvalue123" not in dumped


@pytest.mark.parametrize("recipe, sets, fragment", [
    ("mistral-xauusd", ["train.eval_strategy=no"], "train.load_best_model_at_end=true needs evaluations, but "
                                                    "train.eval_strategy=no"),
    ("mistral-xauusd", ["train.save_strategy=steps"], "train.save_strategy (steps) equal to train.eval_strategy (epoch)"),
    ("smollm2", ["train.load_best_model_at_end=true", "train.save_steps=30"],
     "train.save_steps (30) to be a multiple of train.eval_steps (20)"),
    ("flan-t5", ["train.loss_on=assistant_turns"], "train.loss_on=assistant_turns needs model.arch=causal"),
    ("flan-t5", ["prompt.system=Be brief."], "prompt.system needs model.arch=causal"),
    ("smollm2", ["model.arch=seq2seq"], "model.family=llama does not go with model.arch=seq2seq"),
    ("smollm2", ["train.warmup_steps=5"], "train.warmup_steps (5) and train.warmup_ratio (0.05) are both set"),
    ("llama3-alpaca", ["model.full_precision_name_or_path=null"], "quantization.prequantized=true needs "
                                                                   "model.full_precision_name_or_path"),
    ("smollm2", ["quantization.prequantized=true"], "quantization.prequantized=true needs quantization.bits"),
    ("smollm2", ["tiny.shape=full"], "tiny.shape=full needs tiny.full_config"),
    ("smollm2", ["train.max_steps=0", "train.epochs=0"], "nothing to train"),
    ("tinyllama", ["runtime.micro_batch=3"], "runtime.micro_batch must be auto or a number dividing the effective batch "
                                           "train.batch_size x train.grad_accum = 16, got 3"),
    ("tinyllama", ["runtime.micro_batch=big"], "runtime.micro_batch must be auto or a number"),
    ("smollm2", ["runtime.liger=true", "runtime.answer_only_logits=false"], "runtime.liger=true needs runtime.answer_only_logits"),
    ("flan-t5", ["runtime.padding_free=true"], "runtime.padding_free=true needs model.arch=causal"),
    ("smollm2", ["runtime.padding_free=sometimes"], "runtime.padding_free must be auto, true or false"),
    ("smollm2", ["runtime.gpu_memory_gb=0"], "runtime.gpu_memory_gb must be > 0"),
    ("flan-t5", ["runtime.varlen_attention=true"], "runtime.varlen_attention=true needs model.arch=causal"),
    ("smollm2", ["runtime.varlen_attention=true", "runtime.padding_free=false"],
     "runtime.varlen_attention=true needs padding-free rows"),
    ("smollm2", ["runtime.varlen_attention=true", "model.attn_implementation=eager"],
     "runtime.varlen_attention=true replaces sdpa attention, but model.attn_implementation=eager"),
])
def test_conflicting_settings_fail_with_one_line_naming_the_keys(ft_home, recipe, sets, fragment):
    with pytest.raises(config.ConfigError) as e:
        config.load(recipe, sets)
    assert fragment in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(f"{recipe}.yaml: ")


@pytest.mark.e2e
def test_conflicts_stop_make_before_any_step(ft_home):
    from conftest import make, ran_steps

    p = make(ft_home, "all", "RECIPE=mistral-xauusd", "TINY=1", "ARGS=--set train.eval_strategy=no", check=False)
    assert p.returncode != 0 and "train.load_best_model_at_end=true needs evaluations" in p.stderr
    assert ran_steps(p) == [] and "Traceback" not in p.stderr


def test_task_settings_belong_to_their_task(ft_home):
    with pytest.raises(config.ConfigError, match="'data.min_title_chars' is a setting of task product_description; "
                                                 "this recipe's task is xauusd_forecast"):
        config.load("smollm2-xauusd", ["data.min_title_chars=3"])
    for key in ("data.format=csv", "data.max_content_chars=10", "eval.fixed_prompts=[a]"):
        with pytest.raises(config.ConfigError, match="is a setting of task (chat and )?(preference and )?product_description;"):
            config.load("mistral-xauusd", [key])
    with pytest.raises(config.ConfigError, match="is a setting of task xauusd_forecast"):
        config.load("smollm2", ["data.dedupe_headlines=true"])
    assert config.load("smollm2").data.dedupe_titles is True and config.load("smollm2-xauusd").data.dedupe_headlines is False


def test_prompt_fields_are_checked_against_the_task(ft_home):
    with pytest.raises(config.ConfigError, match=r"prompt.user uses \{titel\}, which product_description records do "
                                                 r"not have; fields: title, content, uid"):
        config.load("smollm2", ["prompt.user=Describe {titel}"])
    with pytest.raises(config.ConfigError, match=r"prompt.user uses \{title\}, which xauusd_forecast records"):
        config.load("smollm2-xauusd", ["prompt.user=Forecast {title}"])


def sched(recipe: str, n_train: int, has_val: bool = True, *sets: str):
    return schedule.schedule(config.load(recipe, list(sets)), n_train, has_val)


def test_epoch_cap_scales_steps_to_the_data_without_rounding_down_to_an_evaluation(ft_home):
    s = sched("smollm2", 480)  # 60 steps x 8 = one pass: unchanged
    assert (s.max_steps, s.notes, s.load_best) == (60, [], True)
    # 60 x 8 would be 3.7 passes over 129; a pass is 17 steps (16 of 8 and a short one of 1, as the trainer's
    # epochs end): 3 passes = 51 steps (not 49 = 2.88 passes, nor 40, an eval step)
    s = sched("smollm2", 129)
    assert s.max_steps == 51 and "train.max_steps 60 -> 51" in s.notes[0] and "3.7 passes" in s.notes[0]
    s = sched("smollm2", 129, True, "train.max_epochs=null")
    assert s.max_steps == 60 and s.notes == []
    s = sched("mistral-xauusd", 100, True, "train.epochs=5")
    assert s.epochs == 3 and "train.epochs 5 -> 3" in s.notes[0] and s.load_best


def test_best_checkpoint_is_kept_by_default_where_it_can_be(ft_home):
    assert sched("smollm2", 480, has_val=False).load_best is False  # no val split: nothing to pick by
    assert sched("smollm2", 480, True, "train.eval_strategy=no").load_best is False
    s = sched("smollm2", 480, True, "train.save_steps=30")  # checkpoints off the eval grid: said, not an error
    assert s.load_best is False and "best-checkpoint selection off" in s.notes[0]
    assert sched("smollm2", 480, True, "train.load_best_model_at_end=false").load_best is False


@pytest.mark.parametrize("name, params", [
    ("tinyllama-1.1b", 1_100_048_384), ("mistral-7b-instruct-v0.2", 7_241_732_096), ("llama-3-8b", 8_030_261_248),
    ("flan-t5-base", 222_903_552),  # 247.6M with lm_head counted apart; transformers 5 always ties T5's lm_head
])
def test_real_shape_configs_have_the_real_parameter_counts(name, params):
    """The kept configurations build the real models' shapes (on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = standins.stand_in_config("llama", 100, {"pad": 0, "eos": 1, "bos": 2}, name)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    grown = standins.stand_in_config("llama", 49_152, {"pad": 0, "eos": 1, "bos": 2}, name)
    assert grown.vocab_size == max(49_152, cfg.vocab_size)  # SmolLM2's tokenizer must fit; Llama-3's 128k stays


def test_full_shape_keeps_the_recipes_batch_and_gets_its_own_run(ft_home):
    cfg = config.load("mistral-xauusd", ["tiny.shape=full"], tiny=True)
    assert cfg.run == "mistral-xauusd-full" and cfg.tiny.full_config == "mistral-7b-instruct-v0.2"
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_length) == (2, 8, 512)
    assert cfg.train.max_steps == config.TINY_OVERRIDES["train.max_steps"]
    assert paths.RunPaths(cfg.run).out == ft_home / "outputs/mistral-xauusd-full"
