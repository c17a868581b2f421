"""Padding-free attention on PyTorch's own variable-length flash kernel (runtime.varlen_attention; no flash-attn).

A padding-free micro-batch (runtime.padding_free) is one row: the examples end to end, position
ids restarting at each, and TRL's collator gives their boundaries (cu_seq_lens_q/k, max_length_q/k) on the host.
With attn_implementation=sdpa transformers turns that row into a block-diagonal T x T mask; SDPA cannot run its
flash kernel with a mask (nor its grouped-KV path: K/V are repeated per query head), so it runs the memory-efficient
kernel over all T^2 query/key pairs, of which only sum(L_i^2) are needed. For a micro-batch of n examples of
similar length that is about n times the attention work: Llama-3-8B at 32 Alpaca examples (~9,600 tokens) does 32x.
flash-attn (what transformers' own padding-free path wants) is not installed on the GPU machines we have; PyTorch
>= 2.10 ships the same kernel's variable-length form, `torch.nn.attention.varlen.varlen_attn`.

`enable(model)` switches the model to the attention implementation NAME, registered here with transformers'
AttentionInterface: a row that carries boundaries goes to the varlen kernel (causal, grouped KV heads, Mistral's
sliding window); everything else (padded rows, generation, an unsupported dtype) goes to transformers' SDPA
function with transformers' SDPA mask, exactly as attn_implementation=sdpa. The boundaries come from the collator,
so no host-GPU sync is added.

`call_kernel` adapts to the kernel's signature (torch 2.10: is_causal, no enable_gqa; 2.11+: window_size and
enable_gqa). `reference_kernel` has the same signature and computes the same thing one example at a time with
SDPA: the CPU's stand-in (tests, or runtime.varlen_attention=true on a CPU) and the GPU's self-check (`usable`).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

log = logging.getLogger("ft")

NAME = "sdpa_varlen"
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def torch_kernel() -> Callable | None:
    """PyTorch's varlen flash attention, or None when this torch has none (< 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def reference_kernel(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any, max_q: int, max_k: int, *,
                     scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                     enable_gqa: bool = False) -> Any:
    """What varlen_attn computes ((T, H, D) tensors, window (-1, 0) = causal, (W, 0) = causal over the last W+1
    keys), one example at a time with SDPA; exact, and slow on many short examples."""
    import torch
    import torch.nn.functional as F

    bounds = cu_seq_q.tolist()
    if cu_seq_k is not None and cu_seq_k.tolist() != bounds:
        raise ValueError("reference_kernel: queries and keys must have the same boundaries")
    left, right = window_size
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[s:e].transpose(0, 1) for x in (query, key, value))  # (H, L, D)
        n = e - s
        i = torch.arange(n, device=query.device)
        allowed = torch.ones(n, n, dtype=torch.bool, device=query.device)
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)
        out.append(o.transpose(0, 1))
    return torch.cat(out, 0)


def parameters(kernel: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


def call_kernel(kernel: Callable, q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float | None,
                sliding_window: int | None, params: frozenset[str] | None = None) -> Any:
    """Causal attention of (T, H, D) tensors over the examples cu delimits, through `kernel`'s own signature
    (`params`: its parameter names, Kernel.params).
    Raises NotImplementedError where that kernel cannot do it (a sliding window on torch 2.10's signature)."""
    params = parameters(kernel) if params is None else params
    window = sliding_window if sliding_window and max_len > sliding_window else None  # shorter: plain causal
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (window - 1 if window else -1, 0)  # a tuple: (-1, 0) is how varlen_attn spells causal
    elif window:
        raise NotImplementedError("this torch's varlen_attn has no window_size (sliding window)")
    else:
        kw["is_causal"] = True
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-9 * scale:  # the default needs no parameter
        if "scale" not in params:
            raise NotImplementedError("this torch's varlen_attn has no scale")
        kw["scale"] = scale
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # no grouped-KV support: repeat each KV head for its query heads, as SDPA does with a mask
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, cu, cu, max_len, max_len, **kw)


@dataclass
class Kernel:
    """The varlen kernel this process uses (set by enable()): torch's on CUDA, the reference on a CPU."""

    fn: Callable
    params: frozenset[str]  # its parameter names, read once (inside a compiled block inspect would break the graph)
    half_only: bool  # torch's flash kernel takes fp16/bf16 only


_ACTIVE: list[Kernel] = []


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None, **kwargs: Any) -> tuple:
    """transformers' attention-function signature ((B, H, T, D) in, (B, T, H, D) out). A one-row batch with
    boundaries (the collator's cu_seq_lens_q) runs the varlen kernel, its mask (the same block-diagonal causal
    mask) unused; anything else runs transformers' SDPA function with its mask, as does a row the kernel cannot
    take (fp32 outside autocast for a half-only kernel; a sliding window torch 2.10's signature lacks)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and query.shape[0] == 1 and not dropout and _ACTIVE:
        kernel = _ACTIVE[0]
        where = query.device.type  # the autocast dtype, as SDPA's inputs would be cast to
        dtype = torch.get_autocast_dtype(where) if torch.is_autocast_enabled(where) else query.dtype
        if not kernel.half_only or dtype in (torch.float16, torch.bfloat16):
            # (T, H, D); already contiguous from the projections' layout, so .contiguous() is a no-op safeguard
            q, k, v = (x[0].transpose(0, 1).to(dtype).contiguous() for x in (query, key, value))
            try:
                out = call_kernel(kernel.fn, q, k, v, cu.to(device=q.device, dtype=torch.int32),
                                  int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())),
                                  scaling, sliding_window, kernel.params)
                return out.unsqueeze(0), None
            except NotImplementedError:
                pass
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model: Any, device: str) -> None:
    """Switch a (not yet PEFT-wrapped) transformers model to NAME, with torch's kernel on CUDA, the reference on a CPU."""
    register()
    fn = torch_kernel() if device == "cuda" else reference_kernel
    _ACTIVE[:] = [Kernel(fn, parameters(fn), half_only=device == "cuda")]
    model.set_attn_implementation(NAME)


@cache
def usable(device: str) -> tuple[bool, str]:
    """Whether the varlen path can run here: on CUDA, torch's kernel exists and passes self_check; on a CPU the
    reference is used."""
    import torch

    if device != "cuda":
        return True, "the per-example SDPA reference (a CPU has no flash kernel)"
    kernel = torch_kernel()
    if kernel is None:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    ok, why = self_check(kernel, "cuda", torch.bfloat16)
    return ok, f"torch {torch.__version__} varlen_attn ({why})" if ok else why


def self_check(kernel: Callable, device: str, dtype: Any) -> tuple[bool, str]:
    """On a small grouped-KV case with three examples, the kernel's output and gradients must match the reference's
    (relative error <= 0.05); any exception fails it."""
    import torch

    try:
        g = torch.Generator(device=device).manual_seed(0)
        cu = torch.tensor([0, 5, 37, 64], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(64, h, 64, device=device, generator=g, dtype=dtype).requires_grad_()
                   for h in (8, 2, 2))
        grads = []
        for fn in (kernel, reference_kernel):
            out = call_kernel(fn, q, k, v, cu, 32, 0.125, None)
            dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            grads.append([out.detach().float(), dq.float(), dk.float(), dv.float()])
        worst = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) for a, b in zip(*grads))
        if worst > 0.05:
            return False, f"the varlen kernel disagrees with SDPA on a self-check (relative error {worst:.3f})"
        return True, f"self-check: relative error {worst:.4f}"
    except Exception as e:  # any failure of the kernel here means: keep SDPA
        return False, f"the varlen kernel failed its self-check ({type(e).__name__}: {str(e)[:160]})"
