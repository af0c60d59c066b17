"""LoRA math as plain functions: initialisation, forward products, DoRA, mixed-adapter batches.

Everything computes in the input's dtype: the (small) adapter weights are cast to it, never the (large) input
upward. Shapes: x (..., in), A (r, in), B (out, r), base weight W (out, in).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.kernels import kernels_enabled


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


def olora_factors(weight: torch.Tensor, r: int, scaling: float):
    """OLoRA (Buyukakyuz, 2024): from the QR decomposition W = Q R, B = the first r columns of Q (orthonormal),
    A = the first r rows of R; the residual W - scaling * B @ A stays in the base layer, so the model is unchanged."""
    w = weight.detach().float()
    q, rr = torch.linalg.qr(w)  # reduced: q (out, k), rr (k, in), k = min(out, in)
    b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    residual = w - scaling * (b @ a)
    return a, b, residual.to(weight.dtype)


def orthogonal_factors(in_features: int, out_features: int, r: int, dtype: torch.dtype, device) -> tuple:
    """Both factors random and non-zero yet B @ A = 0 (identity at start): take a random orthogonal r x r matrix,
    build A from half of its rows and B from the other half, so A's row space is orthogonal to B's column mixing."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    first, second = q[0::2], q[1::2]  # (r/2, r) each; first @ second.T = 0
    a = (torch.randn(in_features, r // 2) @ first).t()  # (r, in)
    b = torch.randn(out_features, r // 2) @ second  # (out, r)
    return a.contiguous().to(device=device, dtype=dtype), b.contiguous().to(device=device, dtype=dtype)


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


def stacked_factors(layer, names: Sequence[str], dtype: Optional[torch.dtype] = None):
    """Rank-padded stacks of the adapters' factors, with one all-zero entry at the end for rows without adapter:
    A (n+1, r_max, in) and B (n+1, out, r_max) with the scaling folded into B, in ``dtype`` (default: the
    adapters'). Cached (per dtype) while the weights don't change and no gradient is needed, so serving pays for
    the stacking once, not per call."""
    a_list = [layer.lora_A[n].weight for n in names]
    b_list = [layer.lora_B[n].weight for n in names]
    dtype = dtype or a_list[0].dtype
    key = (tuple(names), dtype, tuple((t.data_ptr(), t._version) for t in a_list + b_list),
           tuple(layer.scaling[n] for n in names))
    cache = getattr(layer, "_stack_cache", None)
    use_cache = not torch.is_grad_enabled() or not any(t.requires_grad for t in a_list + b_list)
    if use_cache and cache is not None and cache[0] == key:
        return cache[1]
    r_max = max(a.shape[0] for a in a_list)
    in_f, out_f = a_list[0].shape[1], b_list[0].shape[0]
    ref = a_list[0]
    a_stack = [F.pad(a.to(dtype), (0, 0, 0, r_max - a.shape[0])) for a in a_list]
    b_stack = [F.pad((b * layer.scaling[n]).to(dtype), (0, r_max - b.shape[1])) for n, b in zip(names, b_list)]
    a_stack.append(ref.new_zeros(r_max, in_f, dtype=dtype))
    b_stack.append(ref.new_zeros(out_f, r_max, dtype=dtype))
    stack = (torch.stack(a_stack), torch.stack(b_stack))
    if use_cache:
        layer._stack_cache = (key, stack)
    return stack


def mixed_lora_add(result: torch.Tensor, x: torch.Tensor, stack, index: torch.Tensor) -> torch.Tensor:
    """result[i] + x[i] A_{index[i]}^T B_{index[i]}^T for every row i: gather each row's factors from the stacks
    (BGMV/SGMV idea) and apply two batched products, the second accumulated into ``result`` in place when
    possible. x: (batch, ..., in), result: (batch, ..., out)."""
    a_stack, b_stack = stack
    dtype = x.dtype
    a_rows = a_stack.to(dtype).index_select(0, index)  # (batch, r, in)
    b_rows = b_stack.to(dtype).index_select(0, index)  # (batch, out, r)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x.reshape(x.shape[0], -1, x.shape[-1])
    hidden = torch.bmm(x3, a_rows.transpose(1, 2))  # (batch, tokens, r)
    if result.is_contiguous() and result.dtype == dtype and not (torch.is_grad_enabled() and result.requires_grad
                                                                 and result.grad_fn is None):
        r3 = result.view(result.shape[0], -1, result.shape[-1])
        r3.baddbmm_(hidden, b_rows.transpose(1, 2))
        return result
    r3 = result.unsqueeze(1) if squeeze else result.reshape(result.shape[0], -1, result.shape[-1])
    out = torch.baddbmm(r3, hidden, b_rows.transpose(1, 2).to(r3.dtype))
    return out.squeeze(1) if squeeze else out.reshape(result.shape)


# ------------------------------------------------------------------------------------------ fused training path
# One autograd node per adapted linear layer. Why: the straightforward composition (base linear, dropout, A, B,
# scale, add) records six nodes, saves the input once per adapter branch (upcast to float32 when the adapter
# weights are float32) and the rank-r activations in float32; this node computes in the input's dtype, saves the
# input once plus the rank-r products, and adds the LoRA product into the base output in place.
#
# Two ways to compute the same function (see ``choose_merged``; factored unless PEFTKIT_LORA_PATH says otherwise):
#   factored: y = x W^T + b, then y += s (x A^T) B^T         extra traffic ~ tokens * (in + 2 out)
#   merged:   y = x (W + s B A)^T + b with W + sBA built transiently (out x in, one layer at a time)
#             extra traffic ~ 3 * in * out; cheaper once the batch has more tokens than the layer has features.
# Backward mirrors it: dx = g W + s (g B) A (rank-first) or dx = g (W + sBA); dA = s (gB)^T x_d, dB = s g^T h.

# "factored" (default), "merged" or "auto" (the byte-count rule below). Factored is the default because it is the
# one measured faster here: on CPU (fp32, benchmarks/speed.py) auto/merged gave 1.31x the frozen-base step against
# 1.19x for factored; the byte-count argument for merged on large GPU batches is not yet measured on a device.
_PATH_ENV = "PEFTKIT_LORA_PATH"


def _default_factored(merged: Optional[bool]) -> bool:
    """True when the factored strategy is settled without looking at shapes: asked for (``merged=False``), or
    left to the default with PEFTKIT_LORA_PATH unset or "factored"."""
    return merged is False or os.environ.get(_PATH_ENV, "factored") == "factored"


def choose_merged(tokens: int, in_f: int, out_f: int, backward: bool = True) -> bool:
    """Whether building W + sBA for this call moves fewer bytes than the factored products.

    Extra bytes (in elements, terms common to both left out). Training: factored reads x for h, reads and writes
    y (forward), reads and writes dx (backward): tokens * (3 in + 2 out); merged builds W + sBA twice and still
    reads x for h: 4 in out. Inference: factored tokens * (in + 2 out); merged 2 in out.
    """
    mode = os.environ.get(_PATH_ENV, "factored")
    if mode == "merged":
        return True
    if mode == "factored":
        return False
    if mode == "triton":  # the Triton node serves one adapter without dropout; anything else stays factored
        return False
    if mode != "auto":
        raise ValueError(f"{_PATH_ENV}={mode!r}: use 'factored', 'merged', 'auto' or 'triton'.")
    if backward:
        return tokens * (3 * in_f + 2 * out_f) > 4 * in_f * out_f
    return tokens * (in_f + 2 * out_f) > 2 * in_f * out_f


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A keep-mask (bool, x's shape) for inverted dropout with drop probability ``p``; 1 byte per element, which
    is what the fused node saves instead of the dropped-out input."""
    return torch.empty_like(x, dtype=torch.float32 if x.dtype == torch.float64 else x.dtype).bernoulli_(1.0 - p).bool()


def _oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.t() if fan_in_fan_out else weight


def _merged_weight(w: torch.Tensor, factors: Sequence[tuple], dtype: torch.dtype) -> torch.Tensor:
    """W + sum_i s_i B_i A_i as a fresh (out, in) tensor in ``dtype``."""
    out = None
    for a, b, s in factors:
        if out is None:
            out = torch.addmm(w.to(dtype), b.to(dtype), a.to(dtype), alpha=s)
        else:
            out.addmm_(b.to(dtype), a.to(dtype), alpha=s)
    return out


class _LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + sum_i s_i (d_i(x) A_i^T) B_i^T for a frozen W. Inputs after ``masks``: A_1, B_1, A_2, ...
    ``masks[i]`` is adapter i's dropout keep-mask (or None), ``keep[i]`` its keep probability."""

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, scalings, masks, keep, merged, *params):  # type: ignore[override]
        # merged is False, or "grad" (merged, the rank-r products kept for backward) or "nograd" (merged, no
        # backward will run: the products are skipped)
        dtype = x.dtype
        w = _oriented(weight, fan_in_fan_out)
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f)
        factors = [(params[2 * i], params[2 * i + 1], s) for i, s in enumerate(scalings)]
        hs = []
        for (a, _, _), mask, k in zip(factors, masks, keep):
            if merged == "nograd":
                break
            xd = x2 if mask is None else x2 * mask.reshape(-1, in_f) * (1.0 / k)
            hs.append(xd @ a.to(dtype).t())  # (tokens, r)
        # y is created in x's full shape and updated through a 2-D view, so the returned tensor is not a view
        # (views returned from a custom Function cannot be modified in place downstream)
        if merged:
            y = F.linear(x, _merged_weight(w, factors, dtype), bias)
        else:
            y = F.linear(x, w, bias)
            y2 = y.view(-1, out_f)
            for h, (_, b, s) in zip(hs, factors):
                y2.addmm_(h, b.to(dtype).t(), alpha=s)
        ctx.save_for_backward(x, weight, *hs, *params)
        ctx.masks, ctx.keep, ctx.scalings = masks, keep, scalings
        ctx.fan_in_fan_out, ctx.merged, ctx.has_bias = fan_in_fan_out, merged, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        n = len(ctx.scalings)
        saved = ctx.saved_tensors
        x, weight, hs, params = saved[0], saved[1], saved[2:2 + n], saved[2 + n:]
        dtype = x.dtype
        w = _oriented(weight, ctx.fan_in_fan_out)
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f)
        g = grad.to(dtype).reshape(-1, out_f)
        factors = [(params[2 * i].to(dtype), params[2 * i + 1].to(dtype), s) for i, s in enumerate(ctx.scalings)]
        need_x = ctx.needs_input_grad[0]
        need_params = ctx.needs_input_grad[8:]
        gbs = [g @ b if (need_x or need_params[2 * i]) else None for i, (_, b, _) in enumerate(factors)]
        dx = None
        if need_x:
            if ctx.merged:
                dx = g @ _merged_weight(w, factors, dtype)
            else:
                dx = g @ w
                for gb, (a, _, s), mask, k in zip(gbs, factors, ctx.masks, ctx.keep):
                    if mask is None:
                        dx.addmm_(gb, a, alpha=s)
                    else:
                        dx.add_((gb @ a) * mask.reshape(-1, in_f), alpha=s / k)
            dx = dx.view(x.shape)
        grads = []
        for i, ((a, b, s), h, gb, mask, k) in enumerate(zip(factors, hs, gbs, ctx.masks, ctx.keep)):
            da = db = None
            if need_params[2 * i]:
                xd = x2 if mask is None else x2 * mask.reshape(-1, in_f) * (1.0 / k)
                da = (gb.t() @ xd).mul_(s).to(params[2 * i].dtype)
            if need_params[2 * i + 1]:
                db = (g.t() @ h).mul_(s).to(params[2 * i + 1].dtype)
            grads += [da, db]
        dbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (dx, None, dbias, None, None, None, None, None, *grads)


class _LoraOneFn(torch.autograd.Function):
    """The common case of :class:`_LoraLinearFn` with the Python trimmed: one adapter, no dropout, factored.
    y = x W^T + b + s (x A^T) B^T. Every tensor op here is one the math needs (casts only when the adapter's
    dtype differs from the input's): at the small shapes of a CPU run or a short sequence, the per-call
    dispatch of a dozen no-op ``.to``/``reshape`` calls is a measurable part of the step."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, fan_in_fan_out):  # type: ignore[override]
        w = weight.t() if fan_in_fan_out else weight
        out_f, in_f = w.shape
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
        h = torch.mm(x2, a.t())  # (tokens, r)
        y = F.linear(x, w, bias)
        (y if y.dim() == 2 else y.view(-1, out_f)).addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, h, a, b)
        ctx.scaling, ctx.fan_in_fan_out = scaling, fan_in_fan_out
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        w = weight.t() if ctx.fan_in_fan_out else weight
        out_f, in_f = w.shape
        if grad.dtype != x.dtype:
            grad = grad.to(x.dtype)
        g = grad if grad.dim() == 2 else grad.reshape(-1, out_f)
        dx = da = db = dbias = None
        if need_x or need_a:
            gb = torch.mm(g, b)  # (tokens, r), rank-first: never g @ (B A)
            if s != 1.0:
                gb.mul_(s)
            if need_x:
                dx = torch.mm(g, w)
                dx.addmm_(gb, a)
                if x.dim() != 2:
                    dx = dx.view(x.shape)
            if need_a:
                da = torch.mm(gb.t(), x if x.dim() == 2 else x.reshape(-1, in_f))
        if need_b:
            # (h^T g)^T: with the token axis contracted, this operand order is the faster one for BLAS (measured:
            # 72 vs 104 us at 512 tokens, 256 outputs, r=16, one CPU thread)
            db = torch.mm(h.t(), g).t()
            if s != 1.0:
                db.mul_(s)
        if need_bias:
            dbias = g.sum(0)
        return dx, None, dbias, da, db, None, None


def triton_linear_enabled(x: torch.Tensor) -> bool:
    """Whether the one-adapter node runs its forward as the Triton kernel: asked for (PEFTKIT_LORA_PATH=triton)
    and a kernel can run on ``x``'s device (see :func:`peftkit.kernels.kernels_enabled`)."""
    return os.environ.get(_PATH_ENV) == "triton" and kernels_enabled(x.device)


class _TritonLoraOneFn(_LoraOneFn):
    """:class:`_LoraOneFn` with its forward as one Triton kernel (the rank-r update added in the base product's
    epilogue, :mod:`peftkit.kernels.lora_fused`); same saved tensors, same backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, fan_in_fan_out):  # type: ignore[override]
        from peftkit.kernels.lora_fused import lora_linear_forward

        w = weight.t() if fan_in_fan_out else weight
        out_f, in_f = w.shape
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
        h = torch.mm(x2, a.t())  # (tokens, r), kept for backward
        y = lora_linear_forward(x2, w, bias, h, b, scaling)
        ctx.save_for_backward(x, weight, h, a, b)
        ctx.scaling, ctx.fan_in_fan_out = scaling, fan_in_fan_out
        return y.view(*x.shape[:-1], out_f)


def compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if fn is None:  # torch < 2.3
        fn = getattr(torch._dynamo, "is_compiling", lambda: False)
    return bool(fn())


def fused_linear_decline(base: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Why the fused linear nodes here cannot run ``base`` (the module an adapter layer wraps) on ``x``; None
    if they can. They assume a frozen weight, an input already in the weight's dtype and no autocast (whose
    casting rules they would bypass). Shared by LoRA, AdaLoRA and MiSS."""
    from peftkit.engine.layer import AdapterLayer

    if isinstance(base, AdapterLayer):
        return "nested adapter layers"
    w = base.weight
    if w.requires_grad:
        return "the base weight is trainable"
    from peftkit.integrations.quantization import is_quantized

    if is_quantized(base):
        return "the base layer is quantised (its own kernel computes the base output)"
    if x.dtype != w.dtype or not x.is_floating_point():
        return f"input dtype {x.dtype} differs from the base weight's {w.dtype}"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled"
    return None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    factors: Sequence[tuple],
    fan_in_fan_out: bool = False,
    dropout_p: Optional[Sequence[float]] = None,
    merged: Optional[bool] = None,
) -> torch.Tensor:
    """Fused base linear + LoRA adapters. ``factors``: (A (r, in), B (out, r), scaling) per adapter; ``weight``
    (out, in), or (in, out) with ``fan_in_fan_out``, must not require grad. ``dropout_p[i] > 0`` applies inverted
    dropout to adapter i's input (the keep-mask is drawn here). ``merged=None`` picks the cheaper strategy."""
    if len(factors) == 1 and not merged and (dropout_p is None or not dropout_p[0]):
        if _default_factored(merged):
            a, b, s = factors[0]  # the common case, with as little Python as possible
            return _LoraOneFn.apply(x, weight, bias, a, b, s, fan_in_fan_out)
        if triton_linear_enabled(x):
            a, b, s = factors[0]
            return _TritonLoraOneFn.apply(x, weight, bias, a, b, s, fan_in_fan_out)
    in_f = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    out_f = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    ps = list(dropout_p) if dropout_p is not None else [0.0] * len(factors)
    masks = tuple(dropout_mask(x, p) if p > 0 else None for p in ps)
    keep = tuple(1.0 - p for p in ps)
    tokens = x.numel() // max(in_f, 1)
    params = [t for a, b, _ in factors for t in (a, b)]
    track = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if merged is None:
        merged = all(m is None for m in masks) and choose_merged(tokens, in_f, out_f, backward=track)
    elif merged and any(m is not None for m in masks):
        raise ValueError("the merged strategy cannot apply dropout to the adapter input; use merged=False.")
    if merged:
        merged = "grad" if track else "nograd"
    return _LoraLinearFn.apply(x, weight, bias, fan_in_fan_out, tuple(s for _, _, s in factors), masks, keep, merged,
                               *params)


# ---------------------------------------------------------------------------------------------------- DoRA
def dora_norm_from_factors(w_sq: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms ||W + s B A|| (float32, (out,)) from the cached ||w_i||^2 (float32) and the low-rank factors;
    the only product with W is W A^T (out x r), done in W's dtype."""
    a32, b32 = a.float(), b.float()
    cross = ((w @ a.to(w.dtype).t()).float() * b32).sum(dim=1)
    lora_sq = ((b32 @ (a32 @ a32.t())) * b32).sum(dim=1)
    return (w_sq + 2 * scaling * cross + scaling * scaling * lora_sq).clamp_min(0).sqrt()


class _DoraLinearFn(torch.autograd.Function):
    """y = f * (x W^T + s (x A^T) B^T) + b with f = m / ||W + sBA||_row, the norm a constant (detached), for a
    frozen W. Saves x, the rank-r product and y; dm needs sum_tokens g * (y - b) / m, so y is saved instead of the
    pre-scale product (it is often saved downstream anyway: v, gate and up outputs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, scaling, merged, w_sq, a, b, m):  # type: ignore[override]
        dtype = x.dtype
        w = _oriented(weight, fan_in_fan_out)
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f)
        with torch.no_grad():
            norm = dora_norm_from_factors(w_sq, w, a, b, scaling)
        f = (m.detach().float() / norm).to(dtype)
        h = x2 @ a.to(dtype).t()
        if merged:
            wm = _merged_weight(w, [(a, b, scaling)], dtype).mul_(f.view(-1, 1))
            y = F.linear(x, wm, bias)
        else:
            y = F.linear(x, w)
            y.view(-1, out_f).addmm_(h, b.to(dtype).t(), alpha=scaling)
            y.mul_(f)
            if bias is not None:
                y.add_(bias)
        ctx.save_for_backward(x, weight, h, a, b, m, f, y if m.requires_grad else None, bias)
        ctx.fan_in_fan_out, ctx.scaling, ctx.merged = fan_in_fan_out, scaling, merged
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, h, a, b, m, f, y, bias = ctx.saved_tensors
        s = ctx.scaling
        dtype = x.dtype
        w = _oriented(weight, ctx.fan_in_fan_out)
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f)
        g = grad.to(dtype).reshape(-1, out_f)
        ad, bd = a.to(dtype), b.to(dtype)
        bf = bd * f.view(-1, 1)  # the scale f folded into B: (g * f) @ B = g @ (f B)
        need_x, need_a, need_b, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[7], ctx.needs_input_grad[8], ctx.needs_input_grad[9]
        gb = g @ bf if (need_x or need_a) else None
        dx = da = db = dm = dbias = None
        if need_x:
            if ctx.merged:
                dx = g @ _merged_weight(w, [(a, b, s)], dtype).mul_(f.view(-1, 1))
            else:
                dx = (g * f) @ w
                dx.addmm_(gb, ad, alpha=s)
            dx = dx.view(x.shape)
        if need_a:
            da = (gb.t() @ x2).mul_(s).to(a.dtype)
        if need_b:
            db = ((g.t() @ h).float() * (s * f.float()).view(-1, 1)).to(b.dtype)
        if need_m:
            yb = y.reshape(-1, out_f) if bias is None else y.reshape(-1, out_f) - bias
            dm = ((g * yb).sum(0, dtype=torch.float32) / m.detach().float()).to(m.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = g.sum(0)
        return dx, None, dbias, None, None, None, None, da, db, dm


def dora_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_sq: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    merged: Optional[bool] = None,
) -> torch.Tensor:
    """Fused DoRA linear (no dropout). ``w_sq``: float32 squared row norms of the oriented base weight.
    The magnitude must be nonzero everywhere (dm is recovered by dividing the output by it)."""
    in_f = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    out_f = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    if merged is None:
        track = torch.is_grad_enabled() and any(t.requires_grad for t in (x, a, b, magnitude))
        merged = choose_merged(x.numel() // max(in_f, 1), in_f, out_f, backward=track)
    return _DoraLinearFn.apply(x, weight, bias, fan_in_fan_out, scaling, merged, w_sq, a, b, magnitude)
