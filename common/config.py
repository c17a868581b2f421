"""Recipe loading: one YAML per recipe, validated against SCHEMA, with `--set key=value` overrides.

Every key a recipe may use is declared in SCHEMA with its type and default; an unknown or misspelt key, in the
YAML or in --set, fails with the valid keys listed. DATA_PATH (shell or .env) replaces data.path. Secrets such
as HF_TOKEN are read from the environment by the code that needs them and never enter the config, so they
cannot leak into saved configs, reports or model cards.

`python -m common.config --recipe NAME [--tiny] [--set k=v ...] --stamps` validates the recipe and writes one
small JSON per pipeline step into the run's .stamps/ folder, rewriting a file only when its content changed,
so Make re-runs exactly the steps whose settings changed.
"""
from __future__ import annotations

import copy
import json
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common import paths, tasks


class ConfigError(ValueError):
    """A recipe or override problem the user can fix; printed as one line."""


@dataclass(frozen=True)
class F:
    """A schema field: accepted type(s), default, optional choices."""

    type: type | tuple
    default: Any = None
    choices: tuple | None = None
    required: bool = False


# The settings every recipe shares. A task adds its own keys (common/tasks/<task>.py: settings), accepted only
# in recipes of that task, and gives the prompt defaults.
SCHEMA: dict[str, Any] = {
    "task": F(str, "product_description", tasks.names()),
    "description": F(str, ""),
    "model": {
        "name_or_path": F(str, required=True),  # hub id, local folder, or a Python package holding a GGUF file
        "gguf_file": F(str),  # file name inside name_or_path; converted once to a plain HF folder
        "arch": F(str, "causal", ("causal", "seq2seq")),
        "family": F(str, "llama", ("llama", "mistral", "t5")),  # the architecture --tiny builds
        "full_precision_name_or_path": F(str),  # merge base when name_or_path is already 4-bit
        "revision": F(str),
        "trust_remote_code": F(bool, False),
        "attn_implementation": F(str, "sdpa"),
    },
    "quantization": {
        "bits": F(int, 0, (0, 4, 8)),  # 0 = load in full precision
        "quant_type": F(str, "nf4", ("nf4", "fp4")),
        "double_quant": F(bool, True),
        "compute_dtype": F(str, "float16", ("float16", "bfloat16", "float32")),
        "prequantized": F(bool, False),  # the checkpoint carries its own quantization config: none is passed
        # the non-quantized frozen weights (norms, embeddings, lm_head) of a quantized model in fp32, as peft's
        # prepare_model_for_kbit_training casts them (the reference setups): the residual stream and the MLP's
        # activations then run in fp32 between the 4-bit matmuls. false: kept in the mixed precision's dtype, as
        # LLaMA-Factory (upcast_layernorm: false), Unsloth and torchtune keep them: 16-18% less activation memory per
        # token (one real-width Mistral-7B layer); make bench on a GPU has a row for the other choice
        "upcast_frozen": F(bool, True),
    },
    "prompt": {
        "template": F(str, "native"),  # native = the tokenizer's own chat template; see common/templates.py
        "system": F(str),  # system message; null = none
        "user": F(str),  # user turn, formatted with the record's fields (null = the task's default)
        "target": F(str),  # assistant answer (null = the task's default)
        "conversation_extension": F(int, 1),  # >1: chain this many records into one multi-turn conversation
    },
    "data": {
        "path": F(str, required=True),  # raw file; DATA_PATH in the environment or .env replaces it
        "sample": F((int, float)),  # keep this many (int) or this share (float) of cleaned records; null = all
        "train_size": F((int, float), 0.8),  # int = count, float = fraction
        "val_size": F((int, float), 0.1),
        "test_size": F((int, float), 0.1),
        "seed": F(int, 42),
        "export_formatted": F(str),  # also write the formatted training set under this file name
    },
    "lora": {
        "r": F(int, 16),
        "alpha": F(int, 32),
        "dropout": F(float, 0.05),
        "target_modules": F((str, list), "all-linear"),
        "bias": F(str, "none", ("none", "all", "lora_only")),
        "modules_to_save": F(list),
        "use_rslora": F(bool, False),
    },
    "train": {
        "max_steps": F(int, -1),  # -1 = use epochs
        "epochs": F((int, float), 1),
        "max_epochs": F((int, float), 3),  # cap on passes over the train split (a small data set); null = none
        "learning_rate": F(float, 2e-4),
        "lr_scheduler": F(str, "cosine"),
        "warmup_ratio": F(float, 0.0),
        "warmup_steps": F(int, 0),
        "batch_size": F(int, 8),
        "grad_accum": F(int, 1),
        # batch_size x grad_accum is the effective batch (what the optimisation depends on); how it is split into
        # forward passes is runtime.micro_batch
        "max_length": F(int, 512),  # prompt + answer tokens (causal) or source tokens (seq2seq)
        "max_target_length": F(int, 256),  # seq2seq only
        "precision": F(str, "auto", ("auto", "fp32", "bf16", "fp16")),
        "optim": F(str, "adamw_torch"),
        "weight_decay": F(float, 0.0),
        "max_grad_norm": F(float, 1.0),
        "eval_strategy": F(str, "steps", ("no", "steps", "epoch")),
        "eval_steps": F(int),
        "save_strategy": F(str, "steps", ("no", "steps", "epoch")),
        "save_steps": F(int, 500),
        "load_best_model_at_end": F(bool),  # null = yes when there is a val split and checkpoints line up
        "seed": F(int, 42),
        "gradient_checkpointing": F(bool, False),
        "group_by_length": F(bool, True),  # batch similar lengths together: less padding, same examples
        "loss_on": F(str, "completion", ("completion", "assistant_turns")),
        "fast_dropout": F(bool, True),  # CPU: LoRA dropout masks from 4x fewer random draws (common/training.py)
    },
    # How this machine executes and reports a run, apart from what defines the result (train:): changing one of
    # these keeps the checkpoints and the trained adapter (they are in no Make stamp and not in the checkpoint key).
    # A GPU-only path is off by default until a GPU run of this repo's bench or tests showed it correct and faster.
    "runtime": {
        # how the effective batch (train.batch_size x train.grad_accum) is split into forward passes: auto = on a GPU
        # the largest divisor that fits in memory (probed on the longest training batch), on a CPU the recipe's
        # batch_size; or a number that divides the effective batch
        "micro_batch": F((str, int), "auto"),
        "gpu_memory_gb": F((int, float)),  # cap on this process's GPU memory (e.g. 16: a T4's size on a larger GPU)
        "padding_free": F((str, bool), "auto"),  # one row per micro-batch, no padding (auto: on a GPU)
        # padding-free rows through PyTorch's varlen flash kernel instead of SDPA over a block-diagonal mask (GPU
        # only; off until a GPU run measures it, docs/gpu.md)
        "varlen_attention": F(bool, False),
        "liger": F(bool, False),  # Liger's fused output layer + cross-entropy (CUDA, liger-kernel installed)
        "compile": F(bool, False),  # torch.compile each decoder block in place
        "threads": F(int),  # CPU threads for torch; null = all cores
        "answer_only_logits": F(bool, True),  # output layer + loss only where labels are (common/training.py)
        "logging_steps": F(int, 10),
        "save_total_limit": F(int, 2),  # checkpoints kept on disk
        "eval_bleu": F(bool, False),  # seq2seq: sacreBLEU on val at each evaluation (generates; slower)
        "report_to": F((str, list), "none"),  # none, or any of tensorboard, wandb, trackio, mlflow (when installed)
    },
    "eval": {
        "split": F(str, "test", ("test", "val")),
        "num_examples": F(int),  # null = the whole split
        # prompts generated at once; auto (GPU only, opt-in until a GPU run measures it): what the KV cache allows
        "batch_size": F((int, str), 8),
        "max_new_tokens": F(int, 128),
        "use": F(str, "merged", ("merged", "adapter")),
        "bootstrap": F(int, 1000),
        "baseline_samples": F(int, 0),  # write baseline_samples.jsonl (base answers on val) before training
    },
    "merge": {
        "dtype": F(str, "float16", ("float16", "bfloat16", "float32")),
        "check_prompts": F(int, 4),  # val examples the parity gate compares (merged vs adapter)
        # The gate fails the merge when the merged model does not answer like the adapter model: next-token
        # agreement on whole val examples (teacher-forced; fp16 rounding measured >= 0.99) and the share of
        # identical greedy answers (one near-tie flips a whole answer, hence lower).
        "min_token_agreement": F(float, 0.98),
        "min_answer_match": F(float, 0.5),
    },
    "export": {  # make export: GGUF files + Ollama Modelfile (common/export.py)
        "name": F(str),  # file name stem; null = the run name
        "quantizations": F(list, ["f16", "q8_0"]),
        "check_prompts": F(int, 8),  # val prompts the parity gate answers with merged/ and each GGUF
        "f16_min_answer_match": F(float, 1.0),  # f16 holds merged/'s fp16 weights exactly: answers must be equal
        "f16_min_token_agreement": F(float, 0.999),
        # 8-bit rounding flips near-ties in long greedy answers: a SmolLM2 trained 8 steps kept 3 of 8 answers whole
        # (the fully trained default 7 of 8) at next-token agreement >= 0.95; a corrupted weight keeps none.
        "q8_0_min_answer_match": F(float, 0.25),
        "q8_0_min_token_agreement": F(float, 0.95),
        "pre_tokenizer": F(str),  # llama.cpp's pre-tokenizer name; null = read off tokenizer.json
    },
    "card": {  # model cards (merged/README.md, adapter/README.md) and make push
        "base_model": F(str),  # hub id the card names as base_model; null = model.name_or_path
        "license": F(str),  # the base model's license id on the hub, e.g. apache-2.0, llama3
        "tags": F(list, []),
        "repo_id": F(str),  # make push: user/name on the hub
        "push": F(str, "adapter", ("adapter", "merged")),
        "private": F(bool, True),
    },
    "bench": {  # make bench SHAPE=full on a GPU checks these (issue targets, measured on an H100 80GB); null = none
        "gpu_tokens_per_s": F((int, float)),  # non-padding training tokens/s of ours
        "memory_cap_gb": F((int, float)),  # the ours-cap row: runtime.gpu_memory_gb standing in for a smaller GPU
        "capped_peak_gb": F((int, float)),  # ... and the most GPU memory (reserved) it may then take
    },
    "tiny": {
        "template": F(str),  # chat template the real model ships with, given to the tiny stand-in
        # the stand-in's tokenizer: SmolLM2's, or a real tokenizer of the recipe's family (llama.cpp's vocabulary
        # files: Llama-3's 128k byte-level BPE, Llama-2/TinyLlama/Mistral's 32k SentencePiece), common/standins.py
        "tokenizer": F(str, "smollm2", ("smollm2", "llama-bpe", "llama-spm")),
        "data_path": F(str),  # data for tiny mode when the recipe's own file is not shipped
        "shape": F(str, "tiny", ("tiny", "full")),  # full: random-init at the real model's shape (SHAPE=full)
        "full_config": F(str),  # common/model_configs/<name>.json: the real model's configuration
    },
}
# With tiny.shape=full the stand-in has the real model's size, so the recipe's own batch and lengths are kept
# (speed and memory are measured as the recipe would run); only the data and the step counts shrink.
FULL_SHAPE_KEEPS = ("train.batch_size", "train.grad_accum", "train.max_length", "train.max_target_length",
                    "eval.max_new_tokens")

# What --tiny changes: only the model, data and step counts shrink.
TINY_OVERRIDES = {
    "data.sample": 160,
    "data.train_size": 96,
    "data.val_size": 16,
    "data.test_size": 16,
    "train.max_steps": 4,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.grad_accum": 1,
    "runtime.logging_steps": 1,
    "train.eval_steps": 2,
    "train.save_steps": 2,
    "train.warmup_steps": 0,
    "train.max_length": 256,
    "train.max_target_length": 64,
    "eval.max_new_tokens": 12,
    "eval.num_examples": 8,
    "eval.bootstrap": 200,
    "merge.check_prompts": 2,
}


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
    return next((t for t in tasks.names() if key in tasks.get(t).settings.get(section, {})), None)


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
            if owner and owner != task:
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
    cfg["run"] = paths.run_name(f.stem, tiny, cfg["tiny"]["shape"])
    cfg["tiny_mode"] = tiny
    cfg["recipe_file"] = str(f)
    try:
        check_prompt_fields(cfg, t)
        check_conflicts(cfg)
    except ConfigError as e:
        raise ConfigError(f"{f.name}: {e}") from None
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


GGUF_QUANTS = ("f16", "q8_0")  # what common/export.py writes
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, list) else [x]


def check_conflicts(cfg: dict) -> None:
    """Settings that cannot work together, caught before any model loads: one line naming the keys."""
    t, r, m, q, p = cfg["train"], cfg["runtime"], cfg["model"], cfg["quantization"], cfg["prompt"]
    seq2seq = m["arch"] == "seq2seq"
    rules = [
        (t["load_best_model_at_end"] and t["eval_strategy"] == "no",
         "train.load_best_model_at_end=true needs evaluations, but train.eval_strategy=no; change one of them"),
        (t["load_best_model_at_end"] and t["eval_strategy"] != "no" and t["save_strategy"] != t["eval_strategy"],
         f"train.load_best_model_at_end=true needs train.save_strategy ({t['save_strategy']}) equal to "
         f"train.eval_strategy ({t['eval_strategy']})"),
        (t["load_best_model_at_end"] and t["eval_strategy"] == "steps" == t["save_strategy"] and t["eval_steps"]
         and t["save_steps"] % t["eval_steps"] != 0,
         f"train.load_best_model_at_end=true needs train.save_steps ({t['save_steps']}) to be a multiple of "
         f"train.eval_steps ({t['eval_steps']})"),
        (t["batch_size"] < 1 or t["grad_accum"] < 1, "train.batch_size and train.grad_accum must be >= 1"),
        (t["max_steps"] <= 0 and t["epochs"] <= 0, "train.max_steps and train.epochs are both <= 0: nothing to train"),
        (t["warmup_steps"] > 0 and t["warmup_ratio"] > 0,
         f"train.warmup_steps ({t['warmup_steps']}) and train.warmup_ratio ({t['warmup_ratio']}) are both set; keep one"),
        (t["max_epochs"] is not None and t["max_epochs"] <= 0, "train.max_epochs must be > 0 (or null for no cap)"),
        # runtime: how the run executes
        (r["micro_batch"] != "auto" and not (isinstance(r["micro_batch"], int) and r["micro_batch"] > 0
                                            and t["batch_size"] * t["grad_accum"] % r["micro_batch"] == 0),
         f"runtime.micro_batch must be auto or a number dividing the effective batch train.batch_size x "
         f"train.grad_accum = {t['batch_size'] * t['grad_accum']}, got {r['micro_batch']!r}"),
        (r["gpu_memory_gb"] is not None and r["gpu_memory_gb"] <= 0, "runtime.gpu_memory_gb must be > 0 (or null)"),
        (r["padding_free"] not in ("auto", True, False),
         f"runtime.padding_free must be auto, true or false, got {r['padding_free']!r}"),
        (seq2seq and r["padding_free"] is True, "runtime.padding_free=true needs model.arch=causal"),
        (seq2seq and r["varlen_attention"], "runtime.varlen_attention=true needs model.arch=causal"),
        (r["varlen_attention"] and r["padding_free"] is False,
         "runtime.varlen_attention=true needs padding-free rows: set runtime.padding_free to auto or true"),
        (r["varlen_attention"] and m["attn_implementation"] != "sdpa",
         f"runtime.varlen_attention=true replaces sdpa attention, but model.attn_implementation="
         f"{m['attn_implementation']}; set one of them differently"),
        (seq2seq and r["liger"], "runtime.liger=true needs model.arch=causal"),
        (r["liger"] and not r["answer_only_logits"],
         "runtime.liger=true needs runtime.answer_only_logits=true (Liger fuses our answer-only output layer)"),
        (bool(set(_as_list(r["report_to"])) - set(TRACKERS)),
         f"runtime.report_to must be none or a list of {', '.join(TRACKERS[1:])}, got {r['report_to']!r}"),
        (cfg["eval"]["batch_size"] != "auto" and not (isinstance(cfg["eval"]["batch_size"], int)
                                                     and cfg["eval"]["batch_size"] > 0),
         f"eval.batch_size must be auto or a number >= 1, got {cfg['eval']['batch_size']!r}"),
        # architecture and prompt
        (seq2seq and t["loss_on"] != "completion",
         f"train.loss_on={t['loss_on']} needs model.arch=causal (a seq2seq answer is one target)"),
        (seq2seq and p["conversation_extension"] != 1, "prompt.conversation_extension > 1 needs model.arch=causal"),
        (seq2seq and bool(p["system"]), "prompt.system needs model.arch=causal (a seq2seq prompt has no system turn)"),
        (p["conversation_extension"] < 1, "prompt.conversation_extension must be >= 1"),
        ((m["family"] == "t5") != seq2seq,
         f"model.family={m['family']} does not go with model.arch={m['arch']} (t5 is seq2seq; llama, mistral causal)"),
        (q["prequantized"] and not q["bits"], "quantization.prequantized=true needs quantization.bits 4 or 8"),
        (q["prequantized"] and not m["full_precision_name_or_path"],
         "quantization.prequantized=true needs model.full_precision_name_or_path (never merge into a 4-bit model)"),
        (cfg["tiny"]["shape"] == "full" and not cfg["tiny"]["full_config"],
         "tiny.shape=full needs tiny.full_config (a file in common/model_configs/)"),
        (bool(set(_as_list(cfg["export"]["quantizations"])) - set(GGUF_QUANTS)) or not cfg["export"]["quantizations"],
         f"export.quantizations must be a non-empty list of {', '.join(GGUF_QUANTS)}, got "
         f"{cfg['export']['quantizations']!r}"),
        *((not 0 <= sec[k] <= 1, f"{name}.{k} must be between 0 and 1, got {sec[k]}")
          for name in ("merge", "export") for sec in [cfg[name]] for k in sec if "min_" in k),
        (cfg["card"]["repo_id"] is not None and cfg["card"]["repo_id"].count("/") != 1,
         f"card.repo_id must look like user/name, got {cfg['card']['repo_id']!r}"),
    ]
    for bad, msg in rules:
        if bad:
            raise ConfigError(msg)


def _wrap(d: Any) -> Any:
    if isinstance(d, dict):
        return Config({k: _wrap(v) for k, v in d.items()})
    return d


# Which settings each step depends on (Make re-runs a step when its stamp changes).
STEP_KEYS = {
    "prepare": ["task", "data", "prompt", "model.name_or_path", "model.gguf_file", "model.family", "model.arch",
                "tiny", "train.max_length", "train.max_target_length"],
    "train": ["model", "quantization", "lora", "train", "eval.baseline_samples", "tiny"],
    "merge": ["merge", "model.full_precision_name_or_path"],
    "eval": ["eval", "card.base_model", "card.license", "card.tags"],
    "export": ["export", "card.license"],
}


def step_settings(cfg: Config, step: str) -> dict:
    out = {}
    for key in STEP_KEYS[step]:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def write_stamps(cfg: Config) -> Path:
    d = paths.RunPaths(cfg.run).stamps
    d.mkdir(parents=True, exist_ok=True)
    for step in STEP_KEYS:
        f = d / f"{step}.json"
        text = json.dumps(step_settings(cfg, step), indent=1, sort_keys=True, default=str)
        if not f.exists() or f.read_text() != text:
            f.write_text(text)
    return d


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Validate a recipe; print it or write Make stamps.")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--stamps", action="store_true", help="write the per-step stamps Make depends on")
    args, _ = ap.parse_known_args(argv)
    try:
        cfg = load(args.recipe, args.sets, args.tiny)
        if args.stamps:
            write_stamps(cfg)
        else:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
