"""Predicted peak memory and seconds per step of a recipe's training run on a named device, by component.

No weights are loaded and nothing is downloaded: the model's shape comes from the recipe's real configuration
(common/model/model_configs/, tiny.full_config), the tiny stand-in's dimensions, a GGUF file's metadata, a local
config.json, or the hub's config.json when reachable. The micro-batch is the worst one a length-grouped sampler
makes: the n longest examples of the prepared train split together (what batching.py's probe runs), from
prepare_report.json when `make prepare` has run, else n x train.max_length. Every constant is in CONSTANTS with its
source; common/training/fit.py turns the prediction into a verdict and advice; `check` compares a finished run's
measured peak with it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from common.core import paths
from common.training.shapes import (
    Shape,
    all_linears,
    parameters,
    shape_of,
    targeted,
)

log = logging.getLogger("ft")
GiB = 2**30

# name: (memory GiB as torch reports it, dense half-precision TFLOP/s, bf16, CUDA context GiB). Memory: nvidia-smi's
# MiB / 1024 (T4 15360, L4 23034, A10 23028, A100 40960/81920, H100 SXM 81559, H200 143771); TFLOP/s: NVIDIA's
# datasheets (dense, no sparsity). Context: an assumption for torch 2.x with lazy module loading (not yet measured
# here: make gpu-check should record it).
DEVICES = {"T4": (15.0, 65, False, 0.4), "L4": (22.5, 121, True, 0.4), "A10": (22.5, 125, True, 0.4),
           "A100-40": (40.0, 312, True, 0.5), "A100-80": (80.0, 312, True, 0.5), "H100": (79.6, 989, True, 0.5),
           "H200": (140.4, 989, True, 0.5)}
ALIASES = {"A100": "A100-40", "H100-80": "H100", "A10G": "A10"}
CONSTANTS = {
    # Bytes per parameter of a 4-bit weight: 0.5 + one absmax per 64-value block (fp32 = 4/64; double-quantized:
    # uint8 per block + fp32 per 256 blocks); bitsandbytes' Linear4bit, blocksize 64.
    "nf4_bytes": 0.5 + 4 / 64, "nf4_double_quant_bytes": 0.5 + 1 / 64 + 4 / (64 * 256),
    "int8_bytes": 1.0,  # LLM.int8 (+ one fp32 scale per output row, counted apart)
    # Optimizer state bytes per trainable parameter: AdamW m + v in fp32; bitsandbytes' 8-bit AdamW 1 + 1 byte
    # (blockwise, 2048-value blocks); paged variants live in CUDA unified memory, outside torch's reserved figure.
    "optim_bytes": {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_8bit": 2, "adamw_bnb_8bit": 2,
                    "paged_adamw_8bit": 0, "paged_adamw_32bit": 0, "adafactor": 4, "sgd": 0},
    # Activations kept for backward per token and decoder layer, in bytes (see activation_bytes). GPU terms are
    # counted from the ops of a Llama layer under half autocast over 4-bit weights; CPU fp32 terms were measured
    # with torch's saved-tensor hooks on a LoRA Llama (h 256/512, I 704/1408, all-linear, p 0 and 0.05).
    "cpu_per_h": 30.0, "cpu_per_i": 16.0, "cpu_dropout_per_elem": 2.8,
    "logit_bytes": 12,  # per labelled position and vocabulary entry: fp32 logits, log-softmax, its gradient
    # reserved / allocated peak, both measured (not fitted to a prediction) on one H100 setting: llama3-alpaca 8x4
    # padded, 16.9 GB reserved under a 24 GB cap, 13.8 GB allocated (docs/performance.md, 2026-11-23); the other
    # capped rows check it.
    "gpu_allocator": 16.9 / 13.8,
    # preference (dpo/ipo) reference forward under no_grad while the policy's activations are held: one layer's
    # intermediates (3 MLP-wide and 4 fp32 hidden-wide per token); TRL 1.16's fused log-prob head keeps no logits
    "reference_per_h": 16.0, "reference_mlp_widths": 3,
    # CPU: the training process's RSS before the model (Python, torch, transformers, peft, trl, datasets, tokenizer),
    # calibrated on `make train RECIPE=smollm2 TINY=1` (0.70 GB); glibc's arenas over what torch holds, calibrated on
    # the real SmolLM2 bench row (AMD EPYC, 2.16 GB); every other recipe's tiny run checks them.
    "cpu_base_gb": 0.6, "cpu_allocator": 1.35,
    # Time: FLOPs over an achieved share of the device's peak, plus a fixed cost per layer and micro-batch (a QLoRA
    # step launches many small kernels). GPU: both solved from two H100 rows (llama3-alpaca padding-free 32x1 with
    # checkpointing, 16x2 without); CPU: FLOP/s from SmolLM2's make bench row (AMD EPYC, 2 cores, 120 tok/s), the
    # per-layer cost an assumption (this machine's tiny runs were timed under a load average of 16-19).
    "gpu_mfu": 0.16, "gpu_layer_overhead_s": 0.007, "cpu_flops": 70e9, "cpu_layer_overhead_s": 0.004,
}
HIDDEN = ("peak", "allocated", "trainable_parameters", "tokens", "sequences", "bytes")  # memory()'s keys that are not components


@dataclass(frozen=True)
class Setting:
    """Everything the prediction depends on, as the run would resolve it on the device."""

    device: str  # a DEVICES name, "cpu", or "<n>GB"
    memory_gb: float | None
    micro: int
    length: int  # the longest example, in tokens
    typical: int  # a typical example (p90), for padding-free micro-batches
    answer_share: float
    quant_bits: int
    double_quant: bool
    precision: str  # fp32 | bf16 | fp16
    frozen: str  # dtype of frozen non-quantized weights: fp32 | bf16 | fp16
    optim: str
    checkpointing: bool
    padding_free: bool
    liger: bool
    answer_only: bool
    effective: int
    length_source: str
    target_length: int = 0  # seq2seq: the decoder's tokens per example (train.max_target_length)
    top: tuple[int, ...] = ()  # the longest examples (sequences), longest first: the worst micro-batch's makeup
    pairs: bool = False  # preference: a micro-batch of b pairs is 2b sequences (chosen, rejected) with grad
    reference: bool = False  # dpo/ipo without train.precompute_ref: a no-grad reference forward of the 2b sequences


def device_info(name: str) -> tuple[str, float | None, float, bool, float]:
    """(name, memory GiB, TFLOP/s, bf16, context GiB); "cpu" -> memory None; "24" or "24GB" -> a card of that size."""
    key = ALIASES.get(name.upper(), name.upper())
    if name.lower() == "cpu":
        return "cpu", None, 0.0, False, 0.0
    if key in DEVICES:
        mem, tf, bf16, ctx = DEVICES[key]
        return key, mem, tf, bf16, ctx
    try:
        gb = float(name.upper().removesuffix("GB").removesuffix("G"))
    except ValueError:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}, cpu, or a size in GB "
                         f"(e.g. 24)") from None
    return f"{gb:g}GB", gb, 125.0, True, 0.5


def lengths(cfg: Any) -> tuple[int, int, float, str, tuple[int, ...]]:
    """(longest, p90, trained-token share, where from, the longest examples longest first): the prepared split's
    figures (prepare_report.json's `longest` list, else estimated from its percentiles), else train.max_length."""
    ml = cfg.train.max_length
    report = paths.RunPaths(cfg.run).prepare_report
    try:
        d = json.loads(report.read_text())
        tl = d["token_lengths"]["train"]
        top = tuple(min(ml, x) for x in tl["longest"]) if "longest" in tl else estimate_top(tl, d["splits"]["train"],
                                                                                              ml)
        return min(ml, tl["max"]), min(ml, tl["p90"]), float(d.get("trained_token_share") or 1.0), str(report), top
    except (OSError, ValueError, KeyError, TypeError):
        return ml, ml, 1.0, "train.max_length (no prepared data: every example that long, every position trained)", ()


def estimate_top(tl: dict, n: int, cap: int, k: int = 512) -> tuple[int, ...]:
    """The k longest of n lengths, longest first, from the percentiles alone: linear from the longest down to p99
    over the top 1%, then p90 (prepare_report.json's `longest` list, where present, is exact)."""
    r99 = max(1, n - 1 - int(n * 0.99))
    return tuple(min(cap, round(tl["max"] + (tl["p99"] - tl["max"]) * r / r99) if r <= r99 else tl["p90"])
                 for r in range(min(n, k)))


def setting(cfg: Any, device: str) -> Setting:
    """The run's settings as plan.resolve would make them on `device` (a named GPU or this CPU)."""
    name, mem, _, bf16, _ = device_info(device)
    gpu = name != "cpu"
    precision = cfg.train.precision  # as plan.resolve, for a CPU without AMX tiles (auto and fp16 -> fp32 there)
    if precision == "auto":
        precision = ("bf16" if bf16 else "fp16") if gpu else "fp32"
    if gpu and precision == "bf16" and not bf16 or not gpu and precision == "fp16":
        precision = "fp16" if gpu else "fp32"
    if cfg.model.family == "t5" and precision == "fp16":
        precision = "bf16" if bf16 or not gpu else "fp32"
    bits = cfg.quantization.bits
    frozen = "fp32" if precision == "fp32" else (
        ("fp32" if cfg.quantization.upcast_frozen else precision) if bits else precision if gpu else "fp32")
    optim = cfg.train.optim if gpu or not any(k in cfg.train.optim for k in ("8bit", "paged", "bnb")) else "adamw_torch"
    effective = cfg.train.batch_size * cfg.train.grad_accum
    mb = cfg.runtime.micro_batch
    micro = mb if isinstance(mb, int) else (effective if gpu else cfg.train.batch_size)
    longest, p90, share, source, top = lengths(cfg)
    causal = cfg.model.arch == "causal"
    method = getattr(cfg.train, "method", None)  # the preference task's key: TRL pads and computes its own loss
    pf = causal and not method and (cfg.runtime.padding_free is True or (cfg.runtime.padding_free == "auto" and gpu))
    answer_only = bool(cfg.runtime.answer_only_logits and causal and not method)
    return Setting(name, mem, micro, longest, p90, share if answer_only else 1.0, bits, cfg.quantization.double_quant,
                   precision, frozen, optim, cfg.train.gradient_checkpointing, pf,
                   bool(cfg.runtime.liger and causal and gpu and not method), answer_only, effective, source,
                   cfg.train.max_target_length if cfg.model.arch == "seq2seq" else 0, top, bool(method),
                   method in ("dpo", "ipo") and not getattr(cfg.train, "precompute_ref", False))


def activation_bytes(s: Shape, st: Setting, dropout: float, targets: list[tuple[str, int, int]]) -> float:
    """Bytes kept for backward per token and decoder layer (no checkpointing)."""
    n_blocks = s.layers + s.decoder_layers  # T5: encoder and decoder blocks
    lora_in = sum(i for _, i, _ in targets) / max(n_blocks, 1) if targets else 0
    eager = s.heads * st.length * 9 if s.model_type == "t5" else 0  # T5 attends eagerly: scores, softmax, mask
    if st.precision == "fp32":
        c = CONSTANTS
        return c["cpu_per_h"] * s.hidden + c["cpu_per_i"] * s.inter + (c["cpu_dropout_per_elem"] * lora_in if
                                                                        dropout else 0) + eager
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    kv_eff = q  # a mask (padded rows, or SDPA's block-diagonal padding-free mask): K/V repeated per query head
    half, mask = 2, 1 if dropout else 0
    wide = 4 if st.frozen == "fp32" and st.quant_bits else half  # 4-bit layers return their input dtype (fp32 if upcast)
    return (2 * 4 * s.hidden  # the two RMSNorms keep their fp32 input
            + lora_in * (half + mask)  # each LoRA's half-precision input copy (+ its dropout mask)
            + half * (2 * q + 2 * kv_eff)  # SDPA: q, k, v, output
            + (4 * (q + kv) if s.qk_norm else 0) + 3 * wide * s.inter + eager)  # MLP: gate, act(gate), up


def tokens(st: Setting, micro: int) -> tuple[int, int]:
    """(tokens, real tokens) of the worst micro-batch: a length-grouped sampler puts the longest examples of an
    effective batch together, so the n longest of the split (2n sequences for n preference pairs), padded to the
    longest or end to end (padding-free)."""
    seqs = micro * (2 if st.pairs else 1)
    top = st.top or (st.length,)
    real = sum(top[:seqs]) + max(0, seqs - len(top)) * st.typical
    return (real if st.padding_free else seqs * st.length), real


def memory(cfg: Any, s: Shape, st: Setting, micro: int | None = None) -> dict:
    """Predicted peak by component (GiB): GPU memory reserved plus the CUDA context, or a CPU run's peak RSS."""
    micro = micro or st.micro
    p = parameters(s)
    gpu = st.device != "cpu"
    fb = 2 if st.frozen in ("bf16", "fp16") else 4
    tg = targeted(s, cfg.lora.target_modules)
    lora = sum(cfg.lora.r * (i + o) for _, i, o in tg)
    saved = {"lm_head": p["head"] or p["embed"], "embed_tokens": p["embed"]}
    full = sum(saved.get(m, 0) for m in cfg.lora.modules_to_save or [])  # trainable copies (the originals stay)
    trainable = lora + full
    quant = st.quant_bits
    qb = CONSTANTS["nf4_double_quant_bytes"] if st.double_quant else CONSTANTS["nf4_bytes"]
    lin_out = sum(o for _, _, o in all_linears(s))
    qb = qb if quant == 4 else CONSTANTS["int8_bytes"]
    weights = (p["linear"] * qb + (4 * lin_out if quant == 8 else 0) if quant else p["linear"] * fb) + fb * (
        p["embed"] + p["head"] + p["other"])
    ob = CONSTANTS["optim_bytes"].get(st.optim, 8)
    n_tok, real = tokens(st, micro)
    act_layer = activation_bytes(s, st, cfg.lora.dropout, tg)
    n_blocks = s.layers + s.decoder_layers
    n_dec = micro * st.target_length
    rb = 4 if st.frozen == "fp32" else 2
    if st.target_length:  # seq2seq: encoder blocks over the source, decoder blocks and the head over the target
        n_tok = s.layers * n_tok + s.decoder_layers * n_dec  # layer-tokens
        acts = n_tok * (rb * s.hidden + act_layer) if st.checkpointing else n_tok * act_layer
        layer = 0.0
    else:  # checkpointing: one residual per layer kept, one layer's activations at a time in backward
        layer = n_tok * act_layer * (1 if st.checkpointing else n_blocks)
        acts = layer + (n_tok * n_blocks * rb * s.hidden if st.checkpointing else 0)
    acts += n_tok * 12 * s.hidden  # embedding output, final norm, the head's input
    answer = real * st.answer_share if st.answer_only else (n_dec if st.target_length else n_tok)
    logits = (min(answer, 2048) * 4 if st.liger else answer * CONSTANTS["logit_bytes"]) * s.vocab
    compute_half = st.precision != "fp32"
    temps = (2 * max(i * o for _, i, o in all_linears(s)) * (2 if compute_half else 4) if quant else 0) + (
        s.vocab * s.hidden * 2 if compute_half and st.frozen == "fp32" else 0) + (  # dequantized weight; head cast
        4 * trainable if ob == 8 else 0)  # torch's foreach AdamW step: a sqrt(v) buffer as large as the states' half
    wide = 4 if st.frozen == "fp32" and quant else 2 if compute_half else 4
    reference = n_tok * (CONSTANTS["reference_per_h"] * s.hidden + CONSTANTS["reference_mlp_widths"] * wide
                         * s.inter) if st.reference else 0
    parts = {"weights": weights, "lora": 4 * trainable, "gradients": 4 * trainable, "optimizer": ob * trainable,
             "activations": acts, "logits": logits, "reference": reference, "temporaries": temps,
             # checkpointing: the output layer's backward has freed the logits before the first layer is recomputed,
             # so only the larger of the two is alive at once
             "overlap": -min(layer, logits) if st.checkpointing and layer else 0}
    gb = {k: v / GiB for k, v in parts.items()}
    dynamic = sum(gb.values())
    if gpu:
        _, _, _, _, ctx = device_info(st.device)
        gb["allocator"] = dynamic * (CONSTANTS["gpu_allocator"] - 1)
        gb["cuda_context"] = ctx
    else:
        gb["allocator"] = dynamic * (CONSTANTS["cpu_allocator"] - 1)
        gb["process"] = CONSTANTS["cpu_base_gb"]
    out = {k: round(v, 3) for k, v in gb.items()}
    out["peak"] = round(sum(gb.values()), 2)
    out["allocated"] = round(dynamic, 2)  # what torch's max_memory_allocated would say on a GPU
    return {**out, "trainable_parameters": trainable, "tokens": n_tok, "sequences": micro * (1 + st.pairs),
            "bytes": parts}


def seconds_per_step(cfg: Any, s: Shape, st: Setting, micro: int) -> float:
    """FLOPs of one optimizer step over the device's achieved throughput (plus a CPU's per-layer overhead)."""
    p = parameters(s)
    tg = targeted(s, cfg.lora.target_modules)
    lora = sum(cfg.lora.r * (i + o) for _, i, o in tg)
    frozen_lin = p["linear"]
    per_token = 2 * frozen_lin * (3 if st.checkpointing else 2) + 6 * lora
    per_token += 4 * s.layers * st.typical * s.heads * s.head_dim * 2  # attention scores and values, fwd + bwd
    per_token += 4 * s.vocab * s.hidden * (st.answer_share if st.answer_only else 1)  # the output layer
    per_token += 2 * (frozen_lin + s.vocab * s.hidden) if st.reference else 0  # the reference's forward
    step_tokens = st.effective * st.typical * (2 if st.pairs else 1)  # an average step: padding not counted
    if st.device == "cpu":
        return step_tokens * per_token / CONSTANTS["cpu_flops"] + (st.effective // micro) * (
            s.layers + s.decoder_layers) * CONSTANTS["cpu_layer_overhead_s"]
    _, _, tf, _, _ = device_info(st.device)
    return step_tokens * per_token / (tf * 1e12 * CONSTANTS["gpu_mfu"]) + (st.effective // micro) * (
        s.layers + s.decoder_layers) * CONSTANTS["gpu_layer_overhead_s"]


def run_setting(cfg: Any, plan: Any, lengths: list[int], answer_share: float, memory_gb: float | None) -> Setting:
    """The Setting of a run as its plan resolved it (device, precision, quantization, micro-batch), on its encoded
    train split's lengths (preference: both sequences of every pair)."""
    st = setting(cfg, f"{memory_gb or 80:g}GB" if plan.device == "cuda" else "cpu")
    ordered = sorted(lengths) or [cfg.train.max_length]
    b = plan.batching
    return replace(st, length=ordered[-1], typical=ordered[int(0.9 * (len(ordered) - 1))], answer_share=answer_share,
                   precision=plan.precision, quant_bits=plan.quant_bits, frozen=plan.frozen, optim=plan.optim,
                   padding_free=plan.padding_free and not st.pairs, liger=plan.liger and not st.pairs,
                   micro=b.micro_batch if b else st.micro, top=tuple(ordered[::-1][:4 * st.effective]))


def predict_run(cfg: Any, plan: Any, lengths: list[int], answer_share: float, memory_gb: float | None = None) -> float | None:
    """The predicted peak (GB) of a run on its own lengths and plan (run_setting): what `check` compares the measured
    peak with."""
    try:
        return memory(cfg, shape_of(cfg), run_setting(cfg, plan, lengths, answer_share, memory_gb))["peak"]
    except Exception as e:  # noqa: BLE001 (the planner never stops a run: it goes on unchecked, and says so)
        log.info("no footprint prediction for this run (%s: %s)", type(e).__name__, e)
        return None


def check(info: dict, predicted_gb: float | None) -> dict:
    """A finished run's measured peak against its prediction: GPU max reserved + the context (what an
    out-of-memory error depends on), else the peak RSS; a warning when measured > 1.25x predicted."""
    hw = info.get("hardware") or {}
    gpu = hw.get("device") == "cuda"
    measured = (info.get("peak_gpu_reserved_mb") or info.get("peak_gpu_mb") or 0) / 1024 + (
        DEVICES["H100"][3] if gpu else 0) if gpu else (info.get("peak_rss_mb") or 0) / 1024
    out = {"predicted_peak_gb": predicted_gb, "measured_peak_gb": round(measured, 2),
           "measured_over_predicted": round(measured / predicted_gb, 3) if predicted_gb and measured else None}
    if out["measured_over_predicted"] and out["measured_over_predicted"] > 1.25:
        log.warning("peak memory %.2f GB is %.2fx the plan's prediction (%.2f GB): the planner under-predicts this "
                    "run (common/training/footprint.py)", measured, out["measured_over_predicted"], predicted_gb)
    return out


def peak_summary(info: dict) -> dict | None:
    """run_info.json's measured peak against make plan's prediction, as the eval report and report.html show it
    (None for a run recorded without a prediction)."""
    pred, meas = info.get("predicted_peak_gb"), info.get("measured_peak_gb")
    if not pred or not meas:
        return None
    ratio = round(meas / pred, 2)
    what = "GPU reserved + context" if (info.get("hardware") or {}).get("device") == "cuda" else "peak RSS"
    return {"predicted_peak_gb": pred, "measured_peak_gb": meas, "measured_over_predicted": ratio,
            "line": f"peak memory {meas:.2f} GB measured ({what}), {pred:.2f} GB predicted (make plan): {ratio:.2f}x"
                    + (" - over 1.25x, the planner under-predicted this run" if ratio > 1.25 else "")}
