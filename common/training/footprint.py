"""Predicted peak memory and seconds per step of a recipe's training run on a named device, by component.

No weights are loaded and nothing is downloaded: the model's shape comes from the recipe's real configuration
(common/model/model_configs/, tiny.full_config), the tiny stand-in's dimensions, a GGUF file's metadata, a local
config.json, or the hub's config.json when reachable. The sequence length is the prepared train split's longest
example when `make prepare` has run (prepare_report.json), else train.max_length (the worst case). Every constant is
in CONSTANTS with its source; `check` compares a finished run's measured peak with the prediction.
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
    # reserved / allocated peak: calibrated on one H100 row (llama3-alpaca 8x4 under a 24 GB cap: 16.9 GB reserved,
    # 13.8 allocated without the cap), checked on the others (docs/performance.md).
    "gpu_allocator": 1.15,
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
HIDDEN = ("peak", "allocated", "trainable_parameters", "tokens", "bytes")  # memory()'s keys that are not components
ORDER = ("shorter train.max_length", "smaller micro-batch", "gradient checkpointing", "4-bit", "a larger device")


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


def lengths(cfg: Any) -> tuple[int, int, float, str]:
    """(longest, p90, trained-token share, where from): the prepared split's figures, else train.max_length."""
    ml = cfg.train.max_length
    report = paths.RunPaths(cfg.run).prepare_report
    try:
        d = json.loads(report.read_text())
        tl = d["token_lengths"]["train"]
        return min(ml, tl["max"]), min(ml, tl["p90"]), float(d.get("trained_token_share") or 1.0), str(report)
    except (OSError, ValueError, KeyError, TypeError):
        return ml, ml, 1.0, "train.max_length (no prepared data: every example that long, every position trained)"


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
    longest, p90, share, source = lengths(cfg)
    causal = cfg.model.arch == "causal"
    pf = causal and (cfg.runtime.padding_free is True or (cfg.runtime.padding_free == "auto" and gpu))
    return Setting(name, mem, micro, longest, p90, share if cfg.runtime.answer_only_logits else 1.0, bits,
                   cfg.quantization.double_quant, precision, frozen, optim, cfg.train.gradient_checkpointing, pf,
                   bool(cfg.runtime.liger and causal and gpu), cfg.runtime.answer_only_logits and causal,
                   effective, source, cfg.train.max_target_length if cfg.model.arch == "seq2seq" else 0)


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


def tokens(st: Setting, micro: int) -> int:
    """Tokens of the largest micro-batch: padded rows to the longest example, or padding-free rows end to end."""
    return st.length + (micro - 1) * st.typical if st.padding_free else micro * st.length


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
    n_tok = tokens(st, micro)
    act_layer = activation_bytes(s, st, cfg.lora.dropout, tg)
    n_blocks = s.layers + s.decoder_layers
    if st.target_length:  # seq2seq: encoder blocks over the source, decoder blocks and the head over the target
        n_dec = micro * st.target_length
        n_blocks, n_tok = 1, s.layers * n_tok + s.decoder_layers * n_dec  # layer-tokens
    rb = 4 if st.frozen == "fp32" else 2
    acts = n_tok * (n_blocks * rb * s.hidden + act_layer) if st.checkpointing else n_tok * n_blocks * act_layer
    acts += n_tok * 12 * s.hidden  # embedding output, final norm, the head's input
    real = st.length + (micro - 1) * st.typical  # padding carries no label
    answer = real * st.answer_share if st.answer_only else (n_dec if st.target_length else n_tok)
    logits = (min(answer, 2048) * 4 if st.liger else answer * CONSTANTS["logit_bytes"]) * s.vocab
    compute_half = st.precision != "fp32"
    temps = (2 * max(i * o for _, i, o in all_linears(s)) * (2 if compute_half else 4) if quant else 0) + (
        s.vocab * s.hidden * 2 if compute_half and st.frozen == "fp32" else 0) + (  # dequantized weight; head cast
        4 * trainable if ob == 8 else 0)  # torch's foreach AdamW step: a sqrt(v) buffer as large as the states' half
    parts = {"weights": weights, "lora": 4 * trainable, "gradients": 4 * trainable, "optimizer": ob * trainable,
             "activations": acts, "logits": logits, "temporaries": temps}
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
    return {**out, "trainable_parameters": trainable, "tokens": n_tok, "bytes": parts}


def seconds_per_step(cfg: Any, s: Shape, st: Setting, micro: int) -> float:
    """FLOPs of one optimizer step over the device's achieved throughput (plus a CPU's per-layer overhead)."""
    p = parameters(s)
    tg = targeted(s, cfg.lora.target_modules)
    lora = sum(cfg.lora.r * (i + o) for _, i, o in tg)
    frozen_lin = p["linear"]
    per_token = 2 * frozen_lin * (3 if st.checkpointing else 2) + 6 * lora
    per_token += 4 * s.layers * st.typical * s.heads * s.head_dim * 2  # attention scores and values, fwd + bwd
    per_token += 4 * s.vocab * s.hidden * (st.answer_share if st.answer_only else 1)  # the output layer
    step_tokens = st.effective * st.typical  # an average step: padding not counted
    if st.device == "cpu":
        return step_tokens * per_token / CONSTANTS["cpu_flops"] + (st.effective // micro) * (
            s.layers + s.decoder_layers) * CONSTANTS["cpu_layer_overhead_s"]
    _, _, tf, _, _ = device_info(st.device)
    return step_tokens * per_token / (tf * 1e12 * CONSTANTS["gpu_mfu"]) + (st.effective // micro) * (
        s.layers + s.decoder_layers) * CONSTANTS["gpu_layer_overhead_s"]


def machine_memory_gb() -> float:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def predict(cfg: Any, device: str, shape: Shape | None = None, st: Setting | None = None) -> dict:
    """The prediction for the recipe on `device`: components, peak, fits, micro-batch, seconds/step, advice."""
    s = shape or shape_of(cfg)
    st = st or setting(cfg, device)
    limit = st.memory_gb if st.memory_gb is not None else machine_memory_gb()
    auto = not isinstance(cfg.runtime.micro_batch, int) and st.device != "cpu"
    fitting = [d for d in divisors(st.effective) if memory(cfg, s, st, d)["peak"] <= limit]
    micro = (fitting[0] if fitting else 1) if auto else st.micro
    mem = memory(cfg, s, st, micro)
    fits = mem["peak"] <= limit
    out = {"device": st.device, "device_memory_gb": round(limit, 1), "predicted_peak_gb": mem["peak"], "fits": fits,
           "micro_batch": micro, "largest_micro_batch": fitting[0] if fitting else 0,
           "seconds_per_step": round(seconds_per_step(cfg, s, st, micro), 2),
           "components": {k: v for k, v in mem.items() if k not in HIDDEN},
           "tokens_per_micro_batch": mem["tokens"], "trainable_parameters": mem["trainable_parameters"],
           "settings": {"precision": st.precision, "quantization_bits": st.quant_bits, "frozen_dtype": st.frozen,
                        "optim": st.optim, "gradient_checkpointing": st.checkpointing,
                        "padding_free": st.padding_free, "liger": st.liger, "answer_only_logits": st.answer_only,
                        "longest_example": st.length, "answer_share": round(st.answer_share, 3),
                        "lengths_from": st.length_source},
           "shape": s.__dict__, "parameters": parameters(s)["total"],
           "advice": [] if fits else advice(cfg, s, st, limit)}
    return out


def advice(cfg: Any, s: Shape, st: Setting, limit: float) -> list[dict]:
    """Each single change that makes the run fit, in ORDER (the first is the cheapest), with its predicted peak."""
    out = []

    def peak(x: Setting, micro: int) -> float:
        return memory(cfg, s, x, micro)["peak"]

    m0 = 1 if not isinstance(cfg.runtime.micro_batch, int) and st.device != "cpu" else st.micro
    n = st.length - st.length % 128 or st.length  # the longest multiple of 128 that fits
    while n > 128 and peak(replace(st, length=n, typical=min(st.typical, n)), m0) > limit:
        n -= 128
    if n < st.length and peak(replace(st, length=n, typical=min(st.typical, n)), m0) <= limit:
        out.append({"change": ORDER[0], "set": f"train.max_length={n}",
                    "predicted_peak_gb": peak(replace(st, length=n, typical=min(st.typical, n)), m0)})
    smaller = [d for d in divisors(st.effective) if d < m0 and peak(st, d) <= limit]
    if smaller:
        out.append({"change": ORDER[1], "set": f"runtime.micro_batch={smaller[0]}",
                    "predicted_peak_gb": peak(st, smaller[0])})
    if not st.checkpointing and peak(replace(st, checkpointing=True), m0) <= limit:
        out.append({"change": ORDER[2], "set": "train.gradient_checkpointing=true",
                    "predicted_peak_gb": peak(replace(st, checkpointing=True), m0)})
    if st.quant_bits != 4 and st.device != "cpu" and peak(replace(st, quant_bits=4), m0) <= limit:
        out.append({"change": ORDER[3], "set": "quantization.bits=4",
                    "predicted_peak_gb": peak(replace(st, quant_bits=4), m0)})
    for name, (mem, *_rest) in sorted(DEVICES.items(), key=lambda kv: kv[1][0]):
        if st.device != "cpu" and mem > limit:
            bigger = setting(cfg, name)
            bigger = replace(bigger, micro=m0, length=st.length, typical=st.typical, answer_share=st.answer_share)
            if (pk := peak(bigger, m0)) <= mem:
                out.append({"change": ORDER[4], "set": f"GPU={name}", "predicted_peak_gb": pk})
                break
    return out


def predict_run(cfg: Any, plan: Any, lengths: list[int], answer_share: float, memory_gb: float | None = None) -> float | None:
    """The predicted peak (GB) of a run as its plan resolved it (device, precision, quantization, micro-batch) on its
    encoded train split's lengths: what `check` compares the measured peak with."""
    try:
        st = setting(cfg, f"{memory_gb or 80:g}GB" if plan.device == "cuda" else "cpu")
        ordered = sorted(lengths) or [cfg.train.max_length]
        b = plan.batching
        st = replace(st, length=ordered[-1], typical=ordered[int(0.9 * (len(ordered) - 1))], answer_share=answer_share,
                     precision=plan.precision, quant_bits=plan.quant_bits, frozen=plan.frozen, optim=plan.optim,
                     padding_free=plan.padding_free, liger=plan.liger, micro=b.micro_batch if b else st.micro)
        return memory(cfg, shape_of(cfg), st)["peak"]
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
