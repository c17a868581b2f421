"""Recipes load and validate; overrides work; mistakes fail with the valid keys listed."""
from __future__ import annotations

import json

import pytest

from common import config, paths, templates

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
    d = config.write_stamps(config.load("smollm2"))
    before = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    text = {f.name: f.read_text() for f in d.iterdir()}
    config.write_stamps(config.load("smollm2", ["eval.max_new_tokens=9"]))
    changed = {f.name for f in d.iterdir() if f.read_text() != text[f.name]}
    assert changed == {"eval.json"}
    unchanged = {f.name for f in d.iterdir() if f.stat().st_mtime_ns == before[f.name]}
    assert unchanged == set(before) - {"eval.json"}
    assert json.loads((d / "eval.json").read_text())["eval"]["max_new_tokens"] == 9


def test_secrets_never_enter_the_config(ft_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    dumped = json.dumps(config.load("smollm2").to_dict())
    assert "hf_secretvalue123" not in dumped
