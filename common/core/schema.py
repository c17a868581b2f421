"""The recipe schema: every key a recipe may use, by section, with its type, default and choices.

A task adds its own keys (common/tasks/<task>.py: settings). `train` and the sections before it define the result;
`runtime` is how a machine executes and reports a run (changing it keeps the training); the later sections
configure the steps after training. What --tiny changes is here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import tasks

GGUF_QUANTS = ("f16", "q8_0")  # what common/shipping/export.py writes (export.quantizations)
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")  # runtime.report_to


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
    # the run's folder name (outputs/<run>/, data/processed/<run>/); null = the recipe's name (-tiny in tiny mode).
    # make sweep gives each combination its own (common/core/sweep.py)
    "run_name": F(str),
    "model": {
        "name_or_path": F(str, required=True),  # hub id, local folder, or a Python package holding a GGUF file
        "gguf_file": F(str),  # file name inside name_or_path; converted once to a plain HF folder
        "arch": F(str, "causal", ("causal", "seq2seq")),
        "family": F(str, "llama", ("llama", "mistral", "qwen2", "qwen3", "phi3", "t5")),  # the architecture --tiny builds
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
        "template": F(str, "native"),  # native = the tokenizer's own chat template; see common/data/templates.py
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
        # share of the train split that is general text (data/general/replay.txt, never the forgetting check's
        # passages), added to the task's examples as chat answers (common/data/splits.py); val and test unchanged
        "replay": F(float, 0.0),
        # records the sample left out, added to the val split only (train and test stay the same examples): a
        # larger val for choosing between runs (sweep.val_size sets it for make sweep)
        "val_extra": F(int, 0),
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
        "fast_dropout": F(bool, True),  # CPU: LoRA dropout masks from 4x fewer random draws (common/training/builder.py)
    },
    # How this machine executes and reports a run, apart from what defines the result (train:): changing one of
    # these keeps the checkpoints and the trained adapter (they are in no Make stamp and not in the checkpoint key).
    # A GPU-only path is off by default until a GPU run of this repo's bench or tests showed it correct and faster.
    "runtime": {
        # how the effective batch (train.batch_size x train.grad_accum) is split into forward passes: auto = on a GPU
        # the largest divisor that fits in memory (probed on the longest training batch), on a CPU the recipe's
        # batch_size; or a number that divides the effective batch
        "micro_batch": F((str, int), "auto"),
        # auto's probe starts at make plan's micro-batch for the run's own lengths and goes up or down from there (the
        # probe still decides); opt-in until a GPU run shows the plan's start right
        "probe_from_plan": F(bool, False),
        "gpu_memory_gb": F((int, float)),  # cap on this process's GPU memory (e.g. 16: a T4's size on a larger GPU)
        "padding_free": F((str, bool), "auto"),  # one row per micro-batch, no padding (auto: on a GPU)
        # padding-free rows through PyTorch's varlen flash kernel instead of SDPA over a block-diagonal mask (GPU
        # only; off until a GPU run measures it, docs/gpu.md)
        "varlen_attention": F(bool, False),
        "liger": F(bool, False),  # Liger's fused output layer + cross-entropy (CUDA, liger-kernel installed)
        "threads": F(int),  # CPU threads for torch; null = all cores
        "answer_only_logits": F(bool, True),  # output layer + loss only where labels are (common/training/loss.py)
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
    "export": {  # make export: GGUF files + Ollama Modelfile (common/shipping/export.py)
        "name": F(str),  # file name stem; null = the run name
        "quantizations": F(list, ["f16", "q8_0"]),
        "check_prompts": F(int, 8),  # val prompts the parity gate answers with merged/ and each GGUF
        "f16_min_answer_match": F(float, 1.0),  # f16 holds merged/'s fp16 weights: answers equal (near-ties aside)
        "f16_min_token_agreement": F(float, 0.999),
        # 8-bit rounding flips near-ties in long greedy answers: a SmolLM2 trained 8 steps kept 3 of 8 answers whole
        # (the fully trained default 7 of 8) at next-token agreement >= 0.95, which keeps a corrupted weight out.
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
    # make sweep: every combination of these settings trained as its own run, compared by paired verdicts
    # (common/core/sweep.py); GRID= on make's command line replaces the grid. In no stamp: it names runs, it is none.
    "sweep": {
        "grid": F(dict, {}),  # {setting: [values]}, e.g. {train.learning_rate: [2.0e-4, 1.0e-3], lora.r: [8, 16]}
        "max_runs": F(int, 8),  # a grid of more runs needs FORCE=1
        # val examples the sweep chooses its best run on (it sets data.val_extra to add them); null = data.val_size
        "val_size": F(int),
    },
    "tiny": {
        "template": F(str),  # chat template the real model ships with, given to the tiny stand-in
        # the stand-in's tokenizer: SmolLM2's, or a real tokenizer of the recipe's family (llama.cpp's vocabulary
        # files: Llama-3's 128k byte-level BPE, Llama-2/TinyLlama/Mistral's 32k SentencePiece), common/model/standins.py
        "tokenizer": F(str, "smollm2", ("smollm2", "llama-bpe", "llama-spm", "qwen2", "phi-3")),  # + Qwen2/2.5/3, Phi-3
        "data_path": F(str),  # data for tiny mode when the recipe's own file is not shipped
        "shape": F(str, "tiny", ("tiny", "full")),  # full: random-init at the real model's shape (SHAPE=full)
        "full_config": F(str),  # common/model/model_configs/<name>.json: the real model's configuration
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
    "sweep.val_size": 32,
}
