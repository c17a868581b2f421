"""Will it fit: the footprint's prediction on a named device as a verdict, the micro-batch, the cheapest change that
makes it fit, and the merge and export steps' RAM and disk (scripts/plan.py prints and writes them)."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from common.training.footprint import (
    DEVICES,
    HIDDEN,
    Setting,
    memory,
    run_setting,
    seconds_per_step,
    setting,
)
from common.training.shapes import Shape, parameters, shape_of

GiB = 2**30
# The stated order of "cheapest change" (issue 41): the first that fits is the one to try.
ORDER = ("shorter train.max_length", "smaller micro-batch", "gradient checkpointing", "4-bit", "a larger device")
# Host RAM (GB) of the machine a named GPU usually comes with, where one is typical: Colab's T4 runtime reports
# 12.7 GB of system RAM (free tier). Other cards come on machines of any size: no RAM verdict for them.
HOST_RAM_GB = {"T4": 12.7}


def machine_memory_gb() -> float:
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
    return {"device": st.device, "device_memory_gb": round(limit, 1), "predicted_peak_gb": mem["peak"], "fits": fits,
            "micro_batch": micro, "largest_micro_batch": fitting[0] if fitting else 0,
            "seconds_per_step": round(seconds_per_step(cfg, s, st, micro), 2),
            "components": {k: v for k, v in mem.items() if k not in HIDDEN},
            "tokens_per_micro_batch": mem["tokens"], "sequences_per_micro_batch": mem["sequences"],
            "trainable_parameters": mem["trainable_parameters"],
            "settings": {"precision": st.precision, "quantization_bits": st.quant_bits, "frozen_dtype": st.frozen,
                         "optim": st.optim, "gradient_checkpointing": st.checkpointing,
                         "padding_free": st.padding_free, "liger": st.liger, "answer_only_logits": st.answer_only,
                         "longest_example": st.length, "answer_share": round(st.answer_share, 3),
                         "preference_pairs": st.pairs, "reference_forward": st.reference,
                         "lengths_from": st.length_source},
            "shape": s.__dict__, "parameters": parameters(s)["total"],
            "advice": [] if fits else advice(cfg, s, st, limit)}


def planned_micro_batch(cfg: Any, plan: Any, lengths: list[int], eff: int, capacity_gb: float) -> int | None:
    """The largest divisor of `eff` whose predicted peak on the run's own lengths fits `capacity_gb` (every position
    counted as trained: the upper bound), 1 when none does; None when the planner cannot predict this run."""
    try:
        st, s = run_setting(cfg, plan, lengths, 1.0, capacity_gb), shape_of(cfg)
    except Exception:  # noqa: BLE001 (the probe then starts from the top, as without the plan)
        return None
    return next((d for d in divisors(eff) if memory(cfg, s, st, d)["peak"] <= capacity_gb), 1)


def shorter(st: Setting, n: int) -> Setting:
    """`st` with train.max_length = n: every example truncated to n tokens."""
    return replace(st, length=min(st.length, n), typical=min(st.typical, n), top=tuple(min(x, n) for x in st.top))


def advice(cfg: Any, s: Shape, st: Setting, limit: float) -> list[dict]:
    """Each single change that makes the run fit, in ORDER (the first is the cheapest), with its predicted peak."""
    out = []

    def peak(x: Setting, micro: int) -> float:
        return memory(cfg, s, x, micro)["peak"]

    m0 = 1 if not isinstance(cfg.runtime.micro_batch, int) and st.device != "cpu" else st.micro
    n = st.length - st.length % 128 or st.length  # the longest multiple of 128 that fits
    while n > 128 and peak(shorter(st, n), m0) > limit:
        n -= 128
    if n < st.length and peak(shorter(st, n), m0) <= limit:
        out.append({"change": ORDER[0], "set": f"train.max_length={n}", "predicted_peak_gb": peak(shorter(st, n), m0)})
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
            bigger = replace(setting(cfg, name), micro=m0, length=st.length, typical=st.typical, top=st.top,
                             answer_share=st.answer_share)
            if (pk := peak(bigger, m0)) <= mem:
                out.append({"change": ORDER[4], "set": f"GPU={name}", "predicted_peak_gb": pk})
                break
    return out


def later_steps(cfg: Any, total: int, device: str) -> dict:
    """RAM (and GPU memory) and disk of merge and export, each RAM figure with a verdict against the host's RAM
    (HOST_RAM_GB for a named GPU, this machine's for cpu; none where the host is not known). Merge loads the
    full-precision base in fp32 on a CPU (in merge.dtype on a GPU, through RAM) and saves merged/ in merge.dtype;
    export's parity check holds merged/ (in eval's dtype: fp32 on a CPU) and one GGUF (memory-mapped) at a time."""
    gpu = device != "cpu"
    mb = {"float16": 2, "bfloat16": 2, "float32": 4}[cfg.merge.dtype]
    work = mb if gpu else 4
    gguf = {"f16": 2.0, "q8_0": 34 / 32}  # bytes per weight: f16; q8_0 blocks of 32 int8 + one fp16 scale
    files = {q: round(total * gguf.get(q, 2.0) / GiB, 2) for q in cfg.export.quantizations}
    merge = {"ram_gb": round(total * work / GiB, 2), "disk_merged_gb": round(total * mb / GiB, 2)}
    export = {"ram_gb": round(total * ((0 if gpu else work) + max(gguf.get(q, 2.0) for q in files)) / GiB, 2),
              "disk_gguf_gb": files}
    if gpu:
        merge["gpu_gb"] = export["gpu_gb"] = round(total * mb / GiB, 2)
    host = HOST_RAM_GB.get(device) if gpu else round(machine_memory_gb(), 1)
    for step in (merge, export):
        step["host_ram_gb"] = host
        step["ram_fits"] = None if host is None else step["ram_gb"] <= host
    return {"merge": merge, "export": export}
