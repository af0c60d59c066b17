"""``LoraConfig.layer_replication`` (as PEFT): before the adapters are added, the decoder's layer list is rebuilt
from ranges of the original layers, e.g. ``[[0, 4], [2, 5]]`` turns layers 0..4 into 0,1,2,3,2,3,4. The copies
share the base weights (no memory for them), and each copy gets its own LoRA adapters, so a deeper model is
fine-tuned at the cost of the adapters only. Merging is refused afterwards (the shared weight would receive the
adapters of every copy)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch.nn as nn


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, the ModuleList) of the decoder layers: ``[.model]*.layers``, BERT's ``encoder.layer`` or
    Falcon/GPT-2's ``h``."""
    owner = model
    while hasattr(owner, "model") and isinstance(owner.model, nn.Module):
        owner = owner.model
    if isinstance(getattr(owner, "bert", None), nn.Module):
        owner = owner.bert
    for holder, attr in ((owner, "layers"), (getattr(owner, "encoder", None), "layer"), (owner, "h")):
        layers = getattr(holder, attr, None) if holder is not None else None
        if isinstance(layers, nn.ModuleList):
            return holder, attr, layers
    raise ValueError(
        f"LoraConfig.layer_replication: no layer list found in {type(model).__name__} (looked for [.model]*.layers, "
        "encoder.layer and h, as PEFT does); this model's layers cannot be replicated."
    )


def _share_clone(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's (the same tensors)."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> tuple[nn.Module, str, nn.ModuleList]:
    """Rebuild the layer list per ``layer_map`` (list of [start, end) ranges). Returns (owner, attribute, the old
    list) so that a failed injection can put the original back."""
    holder, attr, layers = _layer_list(model)
    n = len(layers)
    for item in layer_map:
        if len(item) != 2 or not (0 <= int(item[0]) < int(item[1]) <= n):
            raise ValueError(f"LoraConfig.layer_replication: {list(item)!r} is not a range [start, end) with "
                             f"0 <= start < end <= {n} (the model has {n} layers).")
    new_layers = []
    for start, end in layer_map:
        for i in range(int(start), int(end)):
            clone = _share_clone(layers[i])
            for sub in clone.modules():  # transformers' caches index layers by layer_idx
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new_layers)
            new_layers.append(clone)
    setattr(holder, attr, nn.ModuleList(new_layers))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)
    return holder, attr, layers


def undo_replication(model: nn.Module, saved: tuple[nn.Module, str, nn.ModuleList]) -> None:
    holder, attr, layers = saved
    setattr(holder, attr, layers)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(layers)
