"""Combining LoRA adapters into a new one: ``cat`` (exact), ``linear`` (factor averaging) and ``svd``."""

from __future__ import annotations

import copy
from typing import Optional

import torch


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str, svd_rank: Optional[int], svd_clamp: Optional[float],
                         svd_full_matrices: bool) -> None:
    from peftkit.methods.lora.lora import Embedding, LoraLayer

    if not adapters or len(adapters) != len(weights):
        raise ValueError("add_weighted_adapter needs one weight per adapter.")
    for n in adapters:
        if n not in model.peft_config:
            raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(model.peft_config)}.")
    if adapter_name in model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists.")
    if combination_type not in ("linear", "cat", "svd"):
        raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}.")
    configs = [model.peft_config[n] for n in adapters]
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter does not support DoRA adapters (their magnitudes do not combine linearly).")
    # the largest rank an adapter has in any layer (rank_pattern can raise it above r), so that "cat" has room
    ranks = [max([c.r, *c.rank_pattern.values()]) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1 or any(c.rank_pattern for c in configs):
            raise ValueError("combination_type='linear' needs all adapters to have the same rank; use 'cat' or 'svd'.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    regexes = [c.target_modules for c in configs if isinstance(c.target_modules, str)]
    if regexes and len(regexes) != len(configs):
        raise ValueError("add_weighted_adapter cannot combine adapters whose target_modules mix a regex string and a "
                         "list of names; give all of them the same form.")
    targets: set[str] = set()
    for c in configs:
        if not isinstance(c.target_modules, str):
            targets.update(c.target_modules)
    new_config = copy.deepcopy(configs[0])
    new_config.r = new_rank
    new_config.lora_alpha = new_rank
    new_config.use_rslora = False
    new_config.rank_pattern, new_config.alpha_pattern = {}, {}
    # a regex string matches full module names: join them as PEFT does
    new_config.target_modules = "|".join(f"({r})" for r in regexes) if regexes else sorted(targets)
    new_config.init_lora_weights = True
    model.inject_adapter(adapter_name, new_config)

    with torch.no_grad():
        for _, layer in model.adapter_layers():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.adapter_configs:
                continue
            present = [(n, w) for n, w in zip(adapters, weights) if n in layer.adapter_configs]
            is_emb = isinstance(layer, Embedding)
            if is_emb:
                a_new, b_new = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
                factors = [(layer.lora_embedding_A[n], layer.lora_embedding_B[n], layer.scaling[n], w) for n, w in present]
            else:
                a_new, b_new = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                factors = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n], w) for n, w in present]
            a_new.zero_(); b_new.zero_()
            if not factors:
                continue
            shape_a, shape_b = a_new.shape, b_new.shape
            if combination_type == "linear":
                for a, b, s, w in factors:
                    c = (abs(w * s)) ** 0.5
                    a_new.add_(a * c * (1 if w * s >= 0 else -1))
                    b_new.add_(b * c)
            elif combination_type == "cat":
                row = 0
                for a, b, s, w in factors:
                    r = a.shape[0]
                    a_new[row:row + r] = a * (w * s)
                    b_new[:, row:row + r] = b
                    row += r
            else:
                delta = sum((b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * (w * s) for a, b, s, w in factors)
                u, sv, vh = torch.linalg.svd(delta.float(), full_matrices=svd_full_matrices)
                k = min(new_rank, sv.numel())  # a layer narrower than svd_rank keeps all its singular values
                u, sv, vh = u[:, :k], sv[:k], vh[:k, :]
                u = u @ torch.diag(sv)
                if svd_clamp is not None:
                    dist = torch.cat([u.flatten(), vh.flatten()])
                    hi = torch.quantile(dist, svd_clamp)
                    u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
                k = u.shape[1]
                a_new.view(shape_a[0], -1)[:k] = vh.to(a_new.dtype)
                b_new.view(shape_b[0], -1)[:, :k] = u.to(b_new.dtype)
