"""Combining LoRA adapters into a new one: ``cat`` (exact), ``linear`` (factor averaging), ``svd``, and the
task-arithmetic merges applied to the factors: ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``."""

from __future__ import annotations

import copy
from typing import Optional

import torch


TASK_ARITHMETIC = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
# the same merges applied to the full deltas (B A scaling) of each adapter, then truncated by SVD like "svd"
TASK_ARITHMETIC_SVD = tuple(f"{k}_svd" for k in TASK_ARITHMETIC)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest."""
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    if k > 0:
        keep[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * keep.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: drop entries at random, keeping each with probability ``density``, and rescale by 1 / density."""
    keep = torch.bernoulli(torch.full_like(t, density))
    return t * keep / density


def _sign_consensus(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each entry's sign agrees with the elected sign (TIES): by total mass or by count of signs."""
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == elected


def _task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor, kind: str, density: float,
                     majority_sign_method: str) -> torch.Tensor:
    """Merge same-shape tensors with per-tensor ``weights`` by one of TASK_ARITHMETIC's methods."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    else:  # dare_*
        tensors = [_random_prune(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    w = weights.to(stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
    if kind in ("magnitude_prune", "dare_linear"):
        return (stacked * w).sum(dim=0)
    agree = _sign_consensus(stacked, majority_sign_method)
    kept = (stacked * w * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1).to(stacked.dtype)


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str, svd_rank: Optional[int], svd_clamp: Optional[float],
                         svd_full_matrices: bool, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> None:
    from peftkit.methods.lora.lora import Embedding, LoraLayer

    if not adapters or len(adapters) != len(weights):
        raise ValueError("add_weighted_adapter needs one weight per adapter.")
    for n in adapters:
        if n not in model.peft_config:
            raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(model.peft_config)}.")
    if adapter_name in model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists.")
    if combination_type not in ("linear", "cat", "svd") + TASK_ARITHMETIC + TASK_ARITHMETIC_SVD:
        raise ValueError(f"combination_type must be one of linear, cat, svd, {', '.join(TASK_ARITHMETIC)} or their "
                         f"'_svd' forms; got {combination_type!r}.")
    if combination_type in TASK_ARITHMETIC + TASK_ARITHMETIC_SVD:
        if density is None or not 0.0 < float(density) <= 1.0:
            raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1] (the fraction of "
                             f"entries kept), got {density!r}.")
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    configs = [model.peft_config[n] for n in adapters]
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter does not support DoRA adapters (their magnitudes do not combine linearly).")
    # the largest rank an adapter has in any layer (rank_pattern can raise it above r), so that "cat" has room
    ranks = [max([c.r, *c.rank_pattern.values()]) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear" or combination_type in TASK_ARITHMETIC:
        if len(set(ranks)) != 1 or any(c.rank_pattern for c in configs):
            raise ValueError(f"combination_type={combination_type!r} needs all adapters to have the same rank; use "
                             "'cat' or 'svd'.")
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
            elif combination_type in TASK_ARITHMETIC:
                # each pair weighted by sqrt(|w s|), the sign on A only (so that B A carries it once), as in PEFT
                scaled = [w * s for _, _, s, w in factors]
                coef_b = torch.tensor([abs(v) ** 0.5 for v in scaled])
                coef_a = torch.tensor([(abs(v) ** 0.5) * (1 if v >= 0 else -1) for v in scaled])
                a_new.copy_(_task_arithmetic([a for a, _, _, _ in factors], coef_a, combination_type, float(density),
                                             majority_sign_method))
                b_new.copy_(_task_arithmetic([b for _, b, _, _ in factors], coef_b, combination_type, float(density),
                                             majority_sign_method))
            elif combination_type == "cat":
                row = 0
                for a, b, s, w in factors:
                    r = a.shape[0]
                    a_new[row:row + r] = a * (w * s)
                    b_new[:, row:row + r] = b
                    row += r
            else:
                deltas = [(b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * s for a, b, s, _ in factors]
                if combination_type == "svd":
                    delta = sum(d * w for d, (_, _, _, w) in zip(deltas, factors))
                else:
                    delta = _task_arithmetic(deltas, torch.tensor([w for _, _, _, w in factors]),
                                             combination_type[: -len("_svd")], float(density), majority_sign_method)
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
