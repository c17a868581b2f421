"""Recipe loading: one YAML per recipe, layered with `--set key=value` overrides and validated against the schema.

Every key a recipe may use is declared in common/core/schema.py with its type and default; an unknown or misspelt key,
in the YAML or in --set, fails with the valid keys listed; settings that cannot work together fail with one line
(common/core/rules.py). DATA_PATH (shell or .env) replaces data.path. Secrets such as HF_TOKEN are read from the
environment by the code that needs them and never enter the config, so they cannot leak into saved files.

    python -m common.core.config --recipe NAME [--tiny] [--set k=v ...]     # prints the resolved recipe, or one error
"""
from __future__ import annotations

import copy
import json
import os
import re
import string
import sys
from pathlib import Path
from typing import Any

import yaml

from common import tasks
from common.core import paths, rules
from common.core.schema import FULL_SHAPE_KEEPS, SCHEMA, TINY_OVERRIDES, F  # noqa: F401 (F: tasks declare settings)


class ConfigError(ValueError):
    """A recipe or override problem the user can fix; printed as one line."""


class Config(dict):
    """A nested dict with attribute access: cfg.train.learning_rate."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self))


def _defaults(schema: dict) -> dict:
    return {k: (_defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)) for k, v in schema.items()}


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check(value: Any, field: F, where: str) -> Any:
    if value is None:
        if field.required:
            raise ConfigError(f"{where} is required")
        return None
    types = field.type if isinstance(field.type, tuple) else (field.type,)
    if types == (str,) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # --set data.path=2024 means the text "2024"
    if types == (str,) and isinstance(value, bool) and field.choices:
        value = "yes" if value else "no"  # YAML reads a bare no/off as false: eval_strategy: no means "no"
    if float in types and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text; 1.0e-3 and 1e-3 mean the same number here
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if int not in types else value
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        hint = " (quote it: YAML reads yes/no/on/off as true/false)" if isinstance(value, bool) else ""
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}{hint}")
    if field.choices and value not in field.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, field.choices))}, got {value!r}")
    return value


def _merge(base: dict, over: dict, schema: dict, where: str) -> None:
    for key, value in over.items():
        path = f"{where}{key}"
        if key not in schema:
            raise ConfigError(f"unknown key '{path}'; valid keys here: {', '.join(schema)}")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; set its keys, e.g. {path}.{next(iter(schema[key]))}")
            _merge(base[key], value, schema[key], path + ".")
        else:
            base[key] = _check(value, schema[key], path)  # checked here, so the error names the YAML or --set


def _validate(cfg: dict, schema: dict, where: str = "") -> None:
    for key, field in schema.items():
        if isinstance(field, dict):
            _validate(cfg[key], field, f"{where}{key}.")
        else:
            cfg[key] = _check(cfg[key], field, f"{where}{key}")


def parse_set(item: str) -> dict:
    """'train.max_steps=20' -> {'train': {'max_steps': 20}} (the value is read as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    out = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def resolve_recipe_file(recipe: str) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p.resolve()
    f = paths.RECIPES_DIR / f"{recipe}.yaml"
    if not f.is_file():
        raise ConfigError(f"unknown recipe '{recipe}'; available: {', '.join(paths.recipe_names())}")
    return f


def schema_for(task: str) -> dict:
    """SCHEMA plus the task's own settings."""
    out = copy.deepcopy(SCHEMA)
    for section, keys in tasks.get(task).settings.items():
        out[section].update(keys)
    return out


def _owner(section: str, key: str) -> str | None:
    """The task(s) that declare section.key ("chat and product_description" when several do), or None."""
    owners = [t for t in tasks.names() if key in tasks.get(t).settings.get(section, {})]
    return " and ".join(owners) or None


def _merge_checked(cfg: dict, over: dict, schema: dict, task: str, where: str = "") -> None:
    try:
        _merge(cfg, over, schema, where)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("unknown key '"):
            section, _, key = msg.split("'")[1].partition(".")
            if section == "train" and key in SCHEMA["runtime"]:
                raise ConfigError(f"'train.{key}' is now runtime.{key} (how a run executes, apart from what defines "
                                  f"the result); move it to the runtime: section") from None
            owner = _owner(section, key) if key else None
            if owner and task not in owner.split(" and "):
                raise ConfigError(f"'{section}.{key}' is a setting of task {owner}; this recipe's task is {task}"
                                  f" (remove it)") from None
        raise


def load(recipe: str, sets: list[str] | None = None, tiny: bool = False) -> Config:
    """Defaults <- recipe YAML <- SM_CHANNEL_TRAINING <- DATA_PATH <- --tiny <- --set, validated."""
    paths.load_dotenv_once()
    f = resolve_recipe_file(recipe)
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{f}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{f}: a recipe must be a mapping of sections (model:, data:, train: ...)")
    overrides = [(item, parse_set(item)) for item in sets or []]
    task = next((o["task"] for _, o in reversed(overrides) if "task" in o), raw.get("task", SCHEMA["task"].default))
    try:
        task = _check(task, SCHEMA["task"], "task")
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None
    schema = schema_for(task)
    cfg = _defaults(schema)
    try:
        _merge_checked(cfg, raw, schema, task)
    except ConfigError as e:
        raise ConfigError(f"{f}: {e}") from None
    if os.environ.get("SM_CHANNEL_TRAINING") and cfg["data"]["path"]:  # SageMaker training channel
        cfg["data"]["path"] = str(Path(os.environ["SM_CHANNEL_TRAINING"]) / Path(cfg["data"]["path"]).name)
    if os.environ.get("DATA_PATH"):
        cfg["data"]["path"] = os.environ["DATA_PATH"]
    if tiny:
        shape = next((o["tiny"]["shape"] for _, o in reversed(overrides) if "shape" in o.get("tiny", {})),
                     cfg["tiny"]["shape"])
        for k, v in TINY_OVERRIDES.items():
            if not (shape == "full" and k in FULL_SHAPE_KEEPS):
                _merge(cfg, parse_set(f"{k}={json.dumps(v)}"), schema, "")
        if cfg["tiny"]["data_path"]:
            cfg["data"]["path"] = cfg["tiny"]["data_path"]
    for item, over in overrides:
        try:
            _merge_checked(cfg, over, schema, task)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
    _validate(cfg, schema)
    t = tasks.get(task)
    for key in ("user", "target"):
        if cfg["prompt"][key] is None:
            cfg["prompt"][key] = t.prompt_defaults[key]
    cfg["name"] = f.stem
    cfg["run"] = cfg["run_name"] or paths.run_name(f.stem, tiny, cfg["tiny"]["shape"])
    cfg["tiny_mode"] = tiny
    cfg["recipe_file"] = str(f)
    try:
        check_prompt_fields(cfg, t)
    except ConfigError as e:
        raise ConfigError(f"{f.name}: {e}") from None
    if problems := rules.broken(cfg):
        raise ConfigError(f"{f.name}: {problems[0]}")
    return _wrap(cfg)


def check_prompt_fields(cfg: dict, task: Any) -> None:
    """Every {field} in prompt.user / prompt.target must be a field of the task's records."""
    for key in ("user", "target"):
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(cfg["prompt"][key]) if n is not None]
        except ValueError as e:
            raise ConfigError(f"prompt.{key} is not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
        for n in names:
            field = n.split(".")[0].split("[")[0]
            if field not in task.fields:
                raise ConfigError(f"prompt.{key} uses {{{n}}}, which {task.name} records do not have; fields: "
                                  f"{', '.join(task.fields)}")


def _wrap(d: Any) -> Any:
    if isinstance(d, dict):
        return Config({k: _wrap(v) for k, v in d.items()})
    return d


def recipe_parser(description: str) -> Any:
    """An argument parser with the recipe options every command line here takes: --recipe, --set, --tiny."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    ap.add_argument("--tiny", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args, _ = recipe_parser("Validate a recipe and print it resolved.").parse_known_args(argv)
    try:
        cfg = load(args.recipe, args.sets, args.tiny)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
