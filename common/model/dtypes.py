"""Torch dtypes and the device, by the names recipes and run plans use (fp32, bf16, fp16, float16, ...)."""
from __future__ import annotations

from typing import Any


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]
