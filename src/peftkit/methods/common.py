"""Small helpers shared by methods."""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch


def conv1d_cls() -> tuple[type, ...]:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as in x out), if transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)
    except Exception:  # pragma: no cover
        return ()


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapter parameters are kept in float32 when the base is in half precision (stable optimiser state), as
    Hugging Face PEFT does by default; the forward casts them to the input's dtype, never the input upward."""
    if base_weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not base_weight.dtype.is_floating_point:  # quantised storage
        return torch.float32
    return base_weight.dtype


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """Look up a per-module override: keys are regexes matched at the end of the module name (PEFT semantics)."""
    if not patterns:
        return default
    for key, value in patterns.items():
        if module_name == key or re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
