"""The run plan: one record of how this machine runs a recipe, built before training and completed as it goes.

Device, precision, quantization, the frozen weights' dtype, padding-free rows, the attention path, the loss, the
micro-batch split (common/training/batching.py), the schedule (common/training/schedule.py), and every setting the machine could not
honour with why (4-bit without a working bitsandbytes, fp16 on a CPU, 8-bit optimizers without CUDA). Training
logs it once as a short table and writes it once to run_info.json (`plan`), where the cards read it; the bench
resolves one per row it measures.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from common.model import arch

log = logging.getLogger("ft")


@dataclass
class Plan:
    """How this machine will run the recipe, and what had to be replaced."""

    device: str
    precision: str  # fp32 | bf16 | fp16 (mixed precision over fp32 master weights on CPU)
    quant_bits: int
    optim: str
    notes: list[str] = field(default_factory=list)
    padding_free: bool = False  # training micro-batches flattened to one row (position_ids, no padding)
    liger: bool = False  # Liger's fused linear cross-entropy for the answer-only loss
    varlen: bool = False  # padding-free rows attend through the varlen kernel (common/training/attention.py)
    varlen_why: str = ""  # which kernel, or why not
    frozen: str = "fp32"  # dtype of the frozen, non-quantized weights while training (see frozen_dtype)
    batching: Any = None  # common/training/batching.py Batching: the micro-batch split, once the model is loaded
    schedule: Any = None  # common/training/schedule.py Schedule: steps fitted to the data, best-checkpoint choice
    family: str = ""  # the loaded model's architecture (config.model_type), listed in model.family or not
    reference: str = ""  # preference training: what the policy is compared with (common/training/preference.py)

    def note(self, msg: str) -> None:
        log.warning("replaced: %s", msg)
        self.notes.append(msg)

    def describe(self) -> dict:
        """The plan as run_info.json records it (and the cards and the bench read it)."""
        b, s = self.batching, self.schedule
        return {"family": self.family or None, "device": self.device, "precision": self.precision, "quantization_bits": self.quant_bits,
                "optim": self.optim, "frozen_dtype": self.frozen, "padding_free": self.padding_free,
                "varlen_attention": self.varlen, "varlen_attention_why": self.varlen_why or None,
                "liger": self.liger,
                "batching": b.describe() if b else None,
                "schedule": {"max_steps": s.max_steps, "epochs": s.epochs, "load_best": s.load_best,
                             "notes": s.notes} if s else None,
                "replaced": list(self.notes)}

    def table(self) -> str:
        """The plan as a few aligned lines for the log, once everything is decided."""
        b, s = self.batching, self.schedule
        rows = [("model", self.family or "?"),
                ("device", f"{self.device}, {self.precision}" + (f", {self.quant_bits}-bit" if self.quant_bits
                                                                 else "") + f", frozen weights {self.frozen}"),
                ("optimizer", self.optim),
                ("batches", (b.line() if b else "the recipe's split") + (", padding-free" if self.padding_free
                                                                        else ", padded")),
                ("attention", self.varlen_why if self.varlen else "sdpa"),
                ("loss", f"TRL's on both answers of a pair; reference: {self.reference}" if self.reference
                 else "Liger fused" if self.liger else "answer-only output layer")]
        if s:
            length = f"{s.max_steps} steps" if s.max_steps > 0 else f"{s.epochs:g} epochs"
            rows.append(("schedule", length + (", best checkpoint kept" if s.load_best else "")))
        rows += [("replaced", n) for n in self.notes]
        return "run plan:\n" + "\n".join(f"  {k:<10} {v}" for k, v in rows)


def cpu_bf16_fast() -> bool:
    """bf16 autocast pays on CPUs with AMX tiles. Measured here on an AVX512-BF16 CPU (2 cores), a SmolLM2 LoRA
    step took 4.7 s in bf16 autocast and 2.8 s in fp32 (the casts cost more than the faster matmuls gain), so
    "auto" picks fp32 on such CPUs; `make bench` measures both."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability() == "AMX"
    except (AttributeError, RuntimeError):
        return False


@cache
def bnb_usable() -> tuple[bool, str]:
    """Whether bitsandbytes can quantize here (CUDA, or its CPU backend); probed on a tiny layer."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(dev)
        layer(torch.randn(2, 64, device=dev))
        return True, f"bitsandbytes {bnb.__version__} works on {dev}"
    except Exception as e:  # any failure means: not usable here
        return False, f"bitsandbytes failed on this machine ({type(e).__name__}: {str(e)[:120]})"


def resolve(cfg: Any) -> Plan:
    """What this machine will do with the recipe's settings (the batching and schedule are added when known)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    want = cfg.train.precision
    if want == "auto":
        want = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev == "cuda" else (
            "bf16" if cpu_bf16_fast() else "fp32")
    p = Plan(dev, want, cfg.quantization.bits, cfg.train.optim)
    if not arch.get(cfg).fp16_safe and want == "fp16":
        p.precision = "bf16" if (dev == "cpu" or torch.cuda.is_bf16_supported()) else "fp32"
        p.note(f"fp16 -> {p.precision}: {cfg.model.family} overflows in fp16 (loss 0/NaN)")
    elif dev == "cpu" and want == "fp16":
        p.precision = "bf16" if cpu_bf16_fast() else "fp32"
        p.note(f"fp16 -> {p.precision}: no fp16 mixed precision on CPU")
    elif dev == "cuda" and want == "bf16" and not torch.cuda.is_bf16_supported():
        p.precision = "fp16"
        p.note("bf16 -> fp16: this GPU has no bf16")
    if p.quant_bits:
        ok, why = bnb_usable()
        if not ok:
            p.note(f"{p.quant_bits}-bit quantization -> full precision: {why}")
            p.quant_bits = 0
    if dev == "cpu" and ("8bit" in p.optim or "paged" in p.optim or "bnb" in p.optim):
        p.note(f"optim {p.optim} -> adamw_torch: 8-bit/paged optimizers need CUDA")
        p.optim = "adamw_torch"
    r, causal = cfg.runtime, cfg.model.arch == "causal"
    # padding-free pays on a GPU (H100, Llama-3-8B QLoRA: 3,117 tok/s against 1,455 padded; make bench row
    # ours-padded); on a CPU the recipes' length-grouped micro-batches carry ~0% padding, so auto keeps them there
    pairs = getattr(cfg.train, "method", None) is not None  # preference training: TRL pads, its own loss
    p.padding_free = causal and not pairs and (r.padding_free is True or (r.padding_free == "auto" and dev == "cuda"))
    for key in ("padding_free", "liger"):
        if pairs and getattr(r, key) is True:
            p.note(f"runtime.{key} -> off: preference training pads its pairs and computes its own loss (TRL)")
    if r.varlen_attention:  # opt-in (docs/gpu.md): only where rows are padding-free
        from common.training import attention

        if not p.padding_free:
            p.varlen_why = "off: the micro-batches are padded here (runtime.padding_free resolves to false)"
            p.note(f"runtime.varlen_attention -> {p.varlen_why}")
        else:
            p.varlen, why = attention.usable(dev)
            p.varlen_why = why if p.varlen else f"off: {why}"
            if not p.varlen:
                p.note(f"runtime.varlen_attention -> SDPA over the block-diagonal mask: {why}")
    p.frozen = frozen_dtype(p, cfg.quantization.upcast_frozen)
    if r.liger and causal and not pairs:
        why = ("liger-kernel is not installed (pip install liger-kernel)" if not importlib.util.find_spec("liger_kernel")
               else "it needs CUDA (Triton kernels)" if dev != "cuda" else None)
        p.liger = why is None
        if why:
            p.note(f"runtime.liger -> off: {why}")
    return p


def frozen_dtype(p: Plan, upcast_frozen: bool) -> str:
    """The dtype the frozen, non-quantized weights train in: fp32 in fp32 runs; a quantized model's norms,
    embeddings and lm_head in fp32 unless quantization.upcast_frozen is false (then, on any device, the mixed
    precision's dtype); an unquantized model's in fp32 on a CPU and in the mixed precision's dtype on a GPU
    (half the memory)."""
    if p.precision == "fp32":
        return "fp32"
    if p.quant_bits:
        return "fp32" if upcast_frozen else p.precision
    return "fp32" if p.device == "cpu" else p.precision
