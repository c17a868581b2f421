"""Settings that cannot work together, grouped by concern: each rule is (broken, one line naming the keys).

config.load raises the first broken rule's line before any model loads. A group reads only its own sections (and
what its rules relate them to).
"""
from __future__ import annotations

from typing import Any

from common.core import paths
from common.core.schema import GGUF_QUANTS, TRACKERS

Rules = list[tuple[Any, str]]


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, list) else [x]


def training(cfg: dict) -> Rules:
    """What defines the result: the optimisation, its schedule and best-checkpoint selection."""
    t = cfg["train"]
    return [
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
    ]


def runtime(cfg: dict) -> Rules:
    """How a run executes: micro-batches, memory, padding-free rows and their kernels, trackers."""
    t, r, m = cfg["train"], cfg["runtime"], cfg["model"]
    seq2seq = m["arch"] == "seq2seq"
    return [
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
    ]


def architecture(cfg: dict) -> Rules:
    """What a causal or seq2seq model, its prompt and its quantization allow."""
    t, m, q, p = cfg["train"], cfg["model"], cfg["quantization"], cfg["prompt"]
    seq2seq = m["arch"] == "seq2seq"
    return [
        (seq2seq and t["loss_on"] != "completion",
         f"train.loss_on={t['loss_on']} needs model.arch=causal (a seq2seq answer is one target)"),
        (seq2seq and p["conversation_extension"] != 1, "prompt.conversation_extension > 1 needs model.arch=causal"),
        (seq2seq and bool(p["system"]), "prompt.system needs model.arch=causal (a seq2seq prompt has no system turn)"),
        (p["conversation_extension"] < 1, "prompt.conversation_extension must be >= 1"),
        (cfg["task"] == "chat" and seq2seq, "task chat needs model.arch=causal (a conversation is a chat template's)"),
        (cfg["task"] == "chat" and (p["conversation_extension"] != 1 or bool(p["user"]) or bool(p["target"])),
         "task chat takes its turns from the data: remove prompt.user, prompt.target and prompt.conversation_extension"),
        ((m["family"] == "t5") != seq2seq,
         f"model.family={m['family']} does not go with model.arch={m['arch']} (t5 is seq2seq; llama, mistral causal)"),
        (q["prequantized"] and not q["bits"], "quantization.prequantized=true needs quantization.bits 4 or 8"),
        (q["prequantized"] and not m["full_precision_name_or_path"],
         "quantization.prequantized=true needs model.full_precision_name_or_path (never merge into a 4-bit model)"),
        (cfg["tiny"]["shape"] == "full" and not cfg["tiny"]["full_config"],
         "tiny.shape=full needs tiny.full_config (a file in common/model/model_configs/)"),
    ]


def later_steps(cfg: dict) -> Rules:
    """Evaluation, merge and export gates, export formats, the hub card."""
    return [
        (cfg["eval"]["batch_size"] != "auto" and not (isinstance(cfg["eval"]["batch_size"], int)
                                                     and cfg["eval"]["batch_size"] > 0),
         f"eval.batch_size must be auto or a number >= 1, got {cfg['eval']['batch_size']!r}"),
        (bool(set(_as_list(cfg["export"]["quantizations"])) - set(GGUF_QUANTS)) or not cfg["export"]["quantizations"],
         f"export.quantizations must be a non-empty list of {', '.join(GGUF_QUANTS)}, got "
         f"{cfg['export']['quantizations']!r}"),
        *((not 0 <= sec[k] <= 1, f"{name}.{k} must be between 0 and 1, got {sec[k]}")
          for name in ("merge", "export") for sec in [cfg[name]] for k in sec if "min_" in k),
        (cfg["card"]["repo_id"] is not None and cfg["card"]["repo_id"].count("/") != 1,
         f"card.repo_id must look like user/name, got {cfg['card']['repo_id']!r}"),
    ]


def naming(cfg: dict) -> Rules:
    """The run's folder name and the sweep's size limit."""
    name = cfg["run_name"]
    return [
        (name is not None and not paths.valid_run_name(name),
         f"run_name must be letters, digits, '.', '_' or '-' (starting with a letter or digit) and not one of "
         f"{', '.join(paths.RESERVED)}, got {name!r}"),
        (cfg["sweep"]["max_runs"] < 1, f"sweep.max_runs must be >= 1, got {cfg['sweep']['max_runs']}"),
        (cfg["sweep"]["val_size"] is not None and cfg["sweep"]["val_size"] < 1,
         f"sweep.val_size must be >= 1 (or null), got {cfg['sweep']['val_size']}"),
    ]


def splits(cfg: dict) -> Rules:
    """What prepare adds to the splits: replayed general text and extra val records."""
    d = cfg["data"]
    return [
        (not 0 <= d["replay"] < 1,
         f"data.replay is a share of the train split: 0 <= data.replay < 1, got {d['replay']}"),
        (d["val_extra"] < 0, f"data.val_extra must be >= 0, got {d['val_extra']}"),
    ]


GROUPS = (training, runtime, architecture, later_steps, naming, splits)


def broken(cfg: dict) -> list[str]:
    """The lines of every broken rule, in group order (empty when the settings work together)."""
    return [msg for group in GROUPS for bad, msg in group(cfg) if bad]
