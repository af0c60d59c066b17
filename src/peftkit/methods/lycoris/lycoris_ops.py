"""LoHa / LoKr math as plain functions: factor shapes, delta weights, and delta-times-input paths.

Shapes (Linear): base weight W (out, in), input x (..., in).

- LoHa: ``delta = s * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product of two rank-r products), w*_a (out, r),
  w*_b (r, in). For convolutions with the Tucker form each rank-r product is rebuilt from a core
  ``t (r, r, k1, k2)`` and two mode matrices ``a (r, out)``, ``b (r, in)``.
- LoKr: ``delta = s * kron(w1, w2)`` with w1 (a, c), w2 (b, d), out = a * b, in = c * d; each factor full or a
  rank-r product.

Every forward path computes in the input's dtype: the small adapter factors are cast to it, never the input upward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ factor shapes
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension``, the layout Hugging Face PEFT (and LyCORIS)
    use for LoKr's Kronecker factors, so that checkpoints have the same shapes.

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)`` as is. Otherwise divisors are
    tried upward from 1 and accepted while ``m + n`` keeps shrinking and ``m`` stays ``<= factor`` (``-1``: no
    limit, i.e. the divisor pair closest to the square root); the result is ordered ``m <= n``.
    Examples: 768 -> (24, 32), 256 -> (16, 16), 127 -> (1, 127), (128, factor=4) -> (4, 32).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


# ------------------------------------------------------------------------------------------ delta weights
def tucker_rebuild(core: torch.Tensor, mode_out: torch.Tensor, mode_in: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv kernel (out, in, k1, k2) from core (r, r, k1, k2), mode_out (r, out), mode_in (r, in)."""
    return torch.einsum("ijkl,jr,ip->prkl", core, mode_in, mode_out)


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference LoHa delta (out, in): ``s * (w1_a @ w1_b) * (w2_a @ w2_b)``; differentiable by plain autograd."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


def loha_delta_tucker(t1, w1_a, w1_b, t2, w2_a, w2_b, scale: float) -> torch.Tensor:
    """LoHa delta (out, in, k1, k2) with both Hadamard operands in Tucker form (``use_effective_conv2d``)."""
    return tucker_rebuild(t1, w1_a, w1_b) * tucker_rebuild(t2, w2_a, w2_b) * scale


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, base_shape: torch.Size) -> torch.Tensor:
    """LoKr delta in the base weight's shape: ``s * kron(w1, w2)`` reshaped.

    A 4-d ``w2`` (out_b, in_d, k1, k2) gets ``w1`` broadcast over the kernel dims, so the kernel comes from w2. The
    element order (``torch.kron`` then a reshape, including the padded-dimension case of a 3-d Conv1d ``w2``) is the
    one Hugging Face PEFT uses, which keeps checkpoints interchangeable.
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(base_shape)


def row_dropout_mask(rows: int, p: float, rescale: bool, device, dtype) -> torch.Tensor:
    """Keep-mask (rows,) of the rank dropout: each output row of the delta is dropped with probability ``p``;
    with ``rescale`` the kept rows are divided by the kept fraction (an all-dropped mask stays all zero)."""
    keep = (torch.rand(rows) > p).to(device=device, dtype=dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(torch.finfo(dtype).tiny)
    return keep


# ------------------------------------------------------------------------------------------ LoHa forward paths
def loha_linear_reference(x: torch.Tensor, w1_a, w1_b, w2_a, w2_b, scale: float) -> torch.Tensor:
    """Delta output ``x @ delta^T`` with the delta built by plain autograd (keeps the delta for backward)."""
    dtype = x.dtype
    delta = loha_delta(w1_a.to(dtype), w1_b.to(dtype), w2_a.to(dtype), w2_b.to(dtype), scale)
    return F.linear(x, delta)


class _HadaLinear(torch.autograd.Function):
    """``x @ (s * (w1_a w1_b) * (w2_a w2_b))^T`` that saves only x and the factors, and rebuilds the delta in
    backward: no (out, in) tensor lives from forward to backward."""

    @staticmethod
    def forward(ctx, x, w1_a, w1_b, w2_a, w2_b, scale: float):  # type: ignore[override]
        dtype = x.dtype
        with torch.no_grad():
            delta = loha_delta(w1_a.to(dtype), w1_b.to(dtype), w2_a.to(dtype), w2_b.to(dtype), scale)
            out = F.linear(x, delta)
        ctx.save_for_backward(x, w1_a, w1_b, w2_a, w2_b)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        scale = ctx.scale
        dtype = grad_out.dtype
        a1, b1, a2, b2 = (t.to(dtype) for t in (w1_a, w1_b, w2_a, w2_b))
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        p1, p2 = a1 @ b1, a2 @ b2  # (out, in) each
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ (p1 * p2 * scale)).reshape(x.shape)
        if any(ctx.needs_input_grad[1:5]):
            grad_w = [None] * 4
            gd = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in): dL/d(delta) / s
            gd.mul_(scale)
            g1 = gd * p2  # dL/d(p1)
            grad_w[0], grad_w[1] = g1 @ b1.t(), a1.t() @ g1
            del g1
            g2 = gd.mul_(p1)  # dL/d(p2), reusing gd's storage
            grad_w[2], grad_w[3] = g2 @ b2.t(), a2.t() @ g2
            grad_w = [gw.to(w.dtype) for gw, w in zip(grad_w, (w1_a, w1_b, w2_a, w2_b))]
            grad_w = [gw if need else None for gw, need in zip(grad_w, ctx.needs_input_grad[1:5])]
            return (grad_x, *grad_w, None)
        return grad_x, None, None, None, None, None


def loha_linear_recompute(x: torch.Tensor, w1_a, w1_b, w2_a, w2_b, scale: float) -> torch.Tensor:
    """Same value as :func:`loha_linear_reference`; the delta is rebuilt in backward instead of kept."""
    return _HadaLinear.apply(x, w1_a, w1_b, w2_a, w2_b, scale)


class _HadaMergedLinear(torch.autograd.Function):
    """``y = x (W + sum_i delta_i)^T + bias`` in one matmul, for any number of LoHa adapters on one Linear.

    Against ``base(x) + x delta^T`` this saves a full forward and a full input-gradient product: the adapters
    cost one extra (out, in) product per step (the delta gradient ``g^T x``, shared by all adapters and by W when
    it trains). Saved for backward: x, W, bias and the factors; the merged weight is rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, *factors):  # type: ignore[override]
        dtype = x.dtype
        merged = _merged_weight(weight, scales, factors, dtype)
        out = F.linear(x, merged, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, weight, *factors)
        ctx.scales = scales
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, *factors = ctx.saved_tensors
        scales = ctx.scales
        dtype = grad_out.dtype
        need = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if need[0]:
            grad_x = (g @ _merged_weight(weight, scales, factors, dtype)).reshape(x.shape)
        if ctx.has_bias and need[2]:
            grad_b = g.sum(0)
        grad_factors: list = [None] * len(factors)
        if need[1] or any(need[4:]):
            gd = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in): dL/dW = dL/d(delta)
            if need[1]:
                grad_w = gd.to(weight.dtype)
            for i, s in enumerate(scales):
                ws = factors[4 * i: 4 * i + 4]
                if not any(need[4 + 4 * i: 8 + 4 * i]):
                    continue
                a1, b1, a2, b2 = (t.to(dtype) for t in ws)
                g1 = gd * (a2 @ b2)
                g1.mul_(s)
                grads = [g1 @ b1.t(), a1.t() @ g1]
                g1 = None
                g2 = gd * (a1 @ b1)
                g2.mul_(s)
                grads += [g2 @ b2.t(), a2.t() @ g2]
                for j in range(4):
                    if need[4 + 4 * i + j]:
                        grad_factors[4 * i + j] = grads[j].to(ws[j].dtype)
        return (grad_x, grad_w, grad_b, None, *grad_factors)


def _merged_weight(weight, scales, factors, dtype) -> torch.Tensor:
    merged = weight.to(dtype).clone()
    for i, s in enumerate(scales):
        a1, b1, a2, b2 = (t.to(dtype) for t in factors[4 * i: 4 * i + 4])
        merged.add_((a1 @ b1).mul_(a2 @ b2), alpha=s)
    return merged


def loha_merged_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], adapters) -> torch.Tensor:
    """Base linear plus every LoHa adapter in ``adapters`` (tuples ``(w1_a, w1_b, w2_a, w2_b, scale)``) as one
    matmul with the merged weight; see :class:`_HadaMergedLinear`."""
    scales = tuple(float(a[4]) for a in adapters)
    flat = [t for a in adapters for t in a[:4]]
    return _HadaMergedLinear.apply(x, weight, bias, scales, *flat)


def loha_merged_is_cheaper(rank: int, in_features: int, out_features: int) -> bool:
    """Merged-weight path vs rank-r^2 factored path, per token of a training step: the merged path adds one
    (out, in) product (the delta gradient); the factored path adds three rank-r^2 passes over in + out."""
    return 3 * rank * rank * (in_features + out_features) >= in_features * out_features


def khatri_rao_factors(w1_a, w1_b, w2_a, w2_b) -> tuple[torch.Tensor, torch.Tensor]:
    """(P (out, r1*r2), Q (r1*r2, in)) with ``P @ Q == (w1_a @ w1_b) * (w2_a @ w2_b)``: the Hadamard product of
    two rank-r products is a rank-r^2 product of row-wise Kronecker products of the factors."""
    out, r1 = w1_a.shape
    r2 = w2_a.shape[1]
    p = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(out, r1 * r2)
    q = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(r1 * r2, w1_b.shape[1])
    return p, q


def loha_linear_factored(x: torch.Tensor, w1_a, w1_b, w2_a, w2_b, scale: float) -> torch.Tensor:
    """Delta output through the rank-r^2 factorisation ``((x Q^T) P^T) * s``: for large layers, where three
    rank-r^2 passes cost less than one (out, in) product (see :func:`loha_merged_is_cheaper`)."""
    dtype = x.dtype
    p, q = khatri_rao_factors(w1_a.to(dtype), w1_b.to(dtype), w2_a.to(dtype), w2_b.to(dtype))
    return F.linear(F.linear(x, q), p) * scale


# ------------------------------------------------------------------------------------------ LoKr forward paths
class _KronBypassFn(torch.autograd.Function):
    """Y_n = s * W1 X_n W2^T for each row n, X_n the row viewed as (c, d), W1 (a, c), W2 (b, d); output rows
    (a * b). Saves only x and the factors: the (N, c, b) intermediate X W2^T is recomputed in backward (one
    product of the same cost as a rank-b LoRA product) instead of being kept, so the node holds no
    activation-sized tensor beyond the input that the base layer saves anyway.

    Backward, with G_n (a, b) the output gradient and U_n = W1^T G_n (c, b):
    dX_n = s U_n W2, dW1 = s sum_n G_n (X_n W2^T)^T, dW2 = s sum_n U_n^T X_n.
    Only plain 2-d GEMMs over explicit reshapes: many tiny batched products are slow on CPU."""

    @staticmethod
    def forward(ctx, x, w1, w2, scale):  # type: ignore[override]
        dtype = x.dtype
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        a, c = w1c.shape
        b, d = w2c.shape
        z = x.reshape(-1, d) @ w2c.t()  # (N*c, b)
        n = z.shape[0] // c
        zt = z.view(n, c, b).transpose(1, 2).reshape(n * b, c)  # (N*b, c)
        y = (zt @ (w1c.t() * scale)).view(n, b, a).transpose(1, 2)  # (N, a, b)
        ctx.save_for_backward(x, w1, w2)
        ctx.scale = scale
        return y.reshape(*x.shape[:-1], a * b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w1, w2 = ctx.saved_tensors
        s = ctx.scale
        dtype = x.dtype
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        a, c = w1c.shape
        b, d = w2c.shape
        x2 = x.reshape(-1, d)  # (N*c, d)
        n = x2.shape[0] // c
        g = grad.to(dtype).reshape(n, a, b)
        gt = g.transpose(1, 2).reshape(n * b, a)  # rows (n, j): G_n[:, j]
        v = gt @ w1c  # (N*b, c): rows are U_n^T
        dx = dw1 = dw2 = None
        if ctx.needs_input_grad[0]:
            u = v.view(n, b, c).transpose(1, 2).reshape(n * c, b)  # (N*c, b): U_n stacked
            dx = (u @ w2c).mul_(s).view(x.shape)
        if ctx.needs_input_grad[1]:
            zt = (x2 @ w2c.t()).view(n, c, b).transpose(1, 2).reshape(n * b, c)  # recomputed X_n W2^T, transposed
            dw1 = (g.permute(1, 0, 2).reshape(a, n * b) @ zt).mul_(s).to(w1.dtype)
        if ctx.needs_input_grad[2]:
            dw2 = (v.view(n, b, c).permute(1, 0, 2).reshape(b, n * c) @ x2).mul_(s).to(w2.dtype)
        return dx, dw1, dw2, None


def lokr_linear_bypass(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ (s * kron(w1, w2))^T`` without building the Kronecker product.

    With x reshaped to X (N, c, d), the delta output is ``w1 @ X @ w2^T`` (N, a, b), flattened to (N, a * b).
    Cost per row ``c*d*b + a*c*b`` multiply-adds instead of ``a*b*c*d``; see :class:`_KronBypassFn`.
    """
    return _KronBypassFn.apply(x, w1, w2, scale)


def lokr_linear_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: build the Kronecker product and multiply."""
    dtype = x.dtype
    delta = torch.kron(w1.to(dtype), w2.to(dtype)) * scale
    return F.linear(x, delta)


def lokr_bypass_is_cheaper(w1_shape, w2_shape) -> bool:
    a, c = w1_shape
    b, d = w2_shape
    return c * d * b + a * c * b < a * b * c * d


def low_rank_or_full(full: Optional[torch.Tensor], a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> torch.Tensor:
    """A Kronecker factor: the full matrix if stored, else the product of its rank-r pair."""
    return full if full is not None else a @ b
