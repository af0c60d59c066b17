"""LoRA math as plain functions: initialisation, forward products, DoRA, mixed-adapter batches.

Everything computes in the input's dtype: the (small) adapter weights are cast to it, never the (large) input
upward. Shapes: x (..., in), A (r, in), B (out, r), base weight W (out, in).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_factors(a: torch.Tensor, b: torch.Tensor, init, r: int) -> None:
    """In-place init of A and B. ``True``: Kaiming-uniform A, zero B; ``"gaussian"``: normal(0, 1/r) A, zero B;
    ``False``: both random (the adapter is not an identity at start)."""
    with torch.no_grad():
        if init is False:
            nn.init.kaiming_uniform_(a.view(a.shape[0], -1), a=math.sqrt(5))
            nn.init.kaiming_uniform_(b.view(b.shape[0], -1), a=math.sqrt(5))
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a.view(a.shape[0], -1), a=math.sqrt(5))
        nn.init.zeros_(b)


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int]):
    """PiSSA: A, B from the top-r singular triplets of W (scaled so that scaling * B @ A is their part of W), and
    the residual W - scaling * B @ A that stays in the base layer."""
    w = weight.detach().float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    s = s / scaling
    a = torch.diag(s.sqrt()) @ vh
    b = u @ torch.diag(s.sqrt())
    residual = w - scaling * (b @ a)
    return a, b, residual.to(weight.dtype)


def dora_weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms ||W + s B A||_2 (one per output) without materialising B @ A:
    ||w_i||^2 + 2 s <W A^T, B>_i + s^2 <B (A A^T), B>_i."""
    w = weight.float()
    a32, b32 = a.float(), b.float()
    sq = (w * w).sum(dim=1)
    cross = ((w @ a32.t()) * b32).sum(dim=1)
    lora_sq = ((b32 @ (a32 @ a32.t())) * b32).sum(dim=1)
    return (sq + 2 * scaling * cross + scaling * scaling * lora_sq).clamp_min(0).sqrt().to(weight.dtype)


def lora_linear_add(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * x A^T B^T."""
    dtype = x.dtype
    return result + (F.linear(F.linear(x, a.to(dtype)), b.to(dtype)) * scaling).to(result.dtype)


def dora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    base_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA on top of the base output: result + (m/||W+sBA|| - 1) * x W^T + m/||W+sBA|| * s * x A^T B^T.

    The norm is treated as a constant (detached), as the DoRA paper recommends. ``base_out`` is x W^T for the
    dropped-out input when dropout is active; otherwise it is recovered from ``result``.
    """
    dtype = x.dtype
    with torch.no_grad():
        norm = dora_weight_norm(weight, a, b, scaling)
    factor = (magnitude / norm.to(magnitude.dtype)).to(dtype)
    if base_out is None:
        base_out = result if bias is None else result - bias.to(result.dtype)
    lora = F.linear(F.linear(x, a.to(dtype)), b.to(dtype)) * scaling
    return result + (factor - 1) * base_out + factor * lora


def fused_lora_linear(x: torch.Tensor, base: nn.Module, fan_in_fan_out: bool, factors: Sequence[tuple]) -> torch.Tensor:
    """Base linear plus every (A, B, scaling) in ``factors``, in x's dtype."""
    weight = base.weight.t() if fan_in_fan_out else base.weight
    result = F.linear(x, weight, base.bias)
    for a, b, s in factors:
        result = lora_linear_add(result, x, a, b, s)
    return result


def stacked_factors(layer, names: Sequence[str]):
    """Rank-padded stacks of the adapters' factors, with one all-zero entry at the end for rows without adapter:
    A (n+1, r_max, in) and B (n+1, out, r_max) with the scaling folded into B. Cached while weights don't change
    and no gradient is needed."""
    a_list = [layer.lora_A[n].weight for n in names]
    b_list = [layer.lora_B[n].weight for n in names]
    key = (tuple(names), tuple(t._version for t in a_list + b_list), tuple(layer.scaling[n] for n in names))
    cache = getattr(layer, "_stack_cache", None)
    use_cache = not torch.is_grad_enabled() or not any(t.requires_grad for t in a_list + b_list)
    if use_cache and cache is not None and cache[0] == key:
        return cache[1]
    r_max = max(a.shape[0] for a in a_list)
    in_f, out_f = a_list[0].shape[1], b_list[0].shape[0]
    ref = a_list[0]
    a_stack = [F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in a_list]
    b_stack = [F.pad(b * layer.scaling[n], (0, r_max - b.shape[1])) for n, b in zip(names, b_list)]
    a_stack.append(ref.new_zeros(r_max, in_f))
    b_stack.append(ref.new_zeros(out_f, r_max))
    stack = (torch.stack(a_stack), torch.stack(b_stack))
    if use_cache:
        layer._stack_cache = (key, stack)
    return stack


def mixed_lora_add(result: torch.Tensor, x: torch.Tensor, stack, index: torch.Tensor) -> torch.Tensor:
    """result[i] + x[i] A_{index[i]}^T B_{index[i]}^T for every row i, with two batched products."""
    a_stack, b_stack = stack
    dtype = x.dtype
    a_rows = a_stack.to(dtype).index_select(0, index)  # (batch, r, in)
    b_rows = b_stack.to(dtype).index_select(0, index)  # (batch, out, r)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])
    r3 = result.unsqueeze(1) if squeeze else result.reshape(result.shape[0], -1, result.shape[-1])
    hidden = torch.bmm(x3, a_rows.transpose(1, 2))
    out = torch.baddbmm(r3, hidden, b_rows.transpose(1, 2).to(r3.dtype))
    return out.squeeze(1) if squeeze else out.reshape(result.shape)
