"""LoRA+ (Hayou et al., 2024): the B factors learn ``loraplus_lr_ratio`` times faster than the A factors.

:func:`create_loraplus_optimizer` builds any torch optimizer with four parameter groups, as Hugging Face PEFT does:
A factors (and other matrices) at ``lr``; LoRA embedding factors at ``loraplus_lr_embedding``; B factors and
vectors at ``lr * loraplus_lr_ratio``, with weight decay except for biases and norm parameters.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.optim import Optimizer

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that take no weight decay: biases and the parameters of normalisation layers."""
    try:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

        norms = tuple(ALL_LAYERNORM_LAYERS) + _NORMS
    except Exception:  # pragma: no cover - transformers is a dependency
        norms = _NORMS
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, norms) or "bias" in p_name:
                out.add(full)
    return out


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> Optimizer:
    """An ``optimizer_cls`` over the trainable parameters of ``model`` with LoRA+ learning rates.

    Extra keywords: ``loraplus_weight_decay`` (default 0.0), ``loraplus_lr_embedding`` (default 1e-6); the rest go
    to ``optimizer_cls``.
    """
    from peftkit.methods.lora.lora import Embedding

    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio!r}.")
    no_decay = _no_decay_names(model)
    embedding_params = {id(p) for m in model.modules() if isinstance(m, Embedding)
                        for slot in ("lora_embedding_A", "lora_embedding_B") for p in getattr(m, slot).parameters()}
    groups: dict[str, list] = {"a": [], "embedding": [], "b": [], "b_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["b_no_decay" if name in no_decay else "b"].append(p)
        else:
            groups["a"].append(p)
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    param_groups = [
        {"params": groups["a"], "weight_decay": decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": decay, "lr": lr_embedding},
        {"params": groups["b"], "weight_decay": decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["b_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)
