"""Pure functions of the orthogonal family (OFT, BOFT, HRA): Cayley transforms, block-diagonal products,
butterfly permutations and Householder chains.

Convention used throughout: an adapter rotates the *input* of a layer, ``x -> x @ R`` with ``R`` (d x d)
orthogonal, so that ``y = (x @ R) @ W.T = x @ (W @ R.T).T``: the merged weight is ``W @ R.T``. The rows of ``W``
(the neurons) are all rotated by the same orthogonal matrix, which keeps their pairwise angles (the
"hyperspherical energy") unchanged.

Fast paths (``*_rotate_input``) never build the d x d matrix; reference paths (``*_dense``) do, and serve merging
and the tests that check the fast paths.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

# ------------------------------------------------------------------------------------------- skew / Cayley


@functools.lru_cache(maxsize=64)
def _skew_index(block_size: int, device: str) -> torch.Tensor:
    """Flat (b*b,) index into ``[0, vec, -vec]``: 0 on the diagonal, 1 + k above it, 1 + m + k below it.

    Cached across calls, so built as a normal tensor even when first asked for under ``torch.inference_mode()``
    (an inference tensor would break every later training step that uses it)."""
    with torch.inference_mode(False):
        return _build_skew_index(block_size, device)


def _build_skew_index(block_size: int, device: str) -> torch.Tensor:
    m = block_size * (block_size - 1) // 2
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    idx = torch.zeros(block_size, block_size, dtype=torch.long)
    idx[rows, cols] = torch.arange(m) + 1
    idx[cols, rows] = torch.arange(m) + 1 + m
    return idx.reshape(-1).to(device)


def skew_from_vector(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n_blocks, b*(b-1)/2) strictly-upper entries (row-major, as ``triu_indices``) -> (n_blocks, b, b)
    skew-symmetric matrices Q = U - U^T. One gather (backward: one index_add) instead of a scatter."""
    n = vec.shape[0]
    signed = torch.cat([vec.new_zeros(n, 1), vec, -vec], dim=1)
    return signed.index_select(1, _skew_index(block_size, str(vec.device))).view(n, block_size, block_size)


def _neumann_coefficients(num_terms: int) -> list[float]:
    """Coefficients of Q^0..Q^K in PEFT's series: 1, 2, ..., 2, 1 (K = max(3, num_terms - 1) from 3 terms on)."""
    if num_terms <= 1:
        return [1.0]
    if num_terms == 2:
        return [1.0, 2.0]
    k = max(3, num_terms - 1)
    return [1.0] + [2.0] * (k - 1) + [1.0]


def cayley_neumann(q: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Truncated Neumann series of the Cayley transform of skew ``q`` (n, b, b), in PEFT's exact form:
    ``I + 2Q + 2Q^2 + ... + 2Q^(K-1) + Q^K`` (approximately orthogonal when ``q`` is small).

    Evaluated by Horner's rule: one product and one add per power (``baddbmm``'s backward is slow on CPU).
    """
    coeffs = _neumann_coefficients(num_terms)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    if len(coeffs) == 1:
        return eye.expand_as(q).clone()
    t = q * coeffs[-1] + eye * coeffs[-2]
    for c in reversed(coeffs[:-2]):
        t = torch.bmm(q, t) + eye * c
    return t


def _solve_dtype(t: torch.Tensor) -> torch.dtype:
    """Linear solves / factorisations run in float32 for half-precision inputs (CPU has no half kernels for them,
    and half precision is too coarse for them anyway); the result is cast back."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform ``R = (I - Q)(I + Q)^-1`` of skew ``q`` (..., b, b): orthogonal to float precision."""
    dtype = q.dtype
    q = q.to(_solve_dtype(q))
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False).to(dtype)


def coft_project(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """Constrained OFT: shrink each block's skew matrix into a Frobenius ball of radius ``eps / sqrt(n_blocks)``.

    ``vec`` is (n_blocks, b*(b-1)/2); the full skew matrix holds each entry twice, hence the ``sqrt(2)``.
    """
    radius = eps / (vec.shape[0] ** 0.5)
    norm = vec.norm(dim=1, keepdim=True) * (2.0 ** 0.5)
    scale = torch.where(norm <= radius, torch.ones_like(norm), radius / norm.clamp_min(torch.finfo(vec.dtype).tiny))
    return vec * scale


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: replace ``int(p * n_blocks)`` random blocks of (n_blocks, b, b) by the identity."""
    n, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * n)
    if k == 0 or n == 1:
        return blocks
    mask = torch.zeros(n, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(n, device=blocks.device)[:k]] = 1
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return blocks * (1 - mask) + eye * mask


# ------------------------------------------------------------------------------------------- block diagonal


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` without building the matrix: x (..., n*b), blocks (n, b, b) -> (..., n*b).

    One batched matmul over the blocks; the input is viewed as (n, tokens, b) with strides, not copied.
    """
    n, b = blocks.shape[0], blocks.shape[-1]
    shape = x.shape
    x2 = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
    out = torch.bmm(x2, blocks)  # (n, tokens, b)
    return out.transpose(0, 1).reshape(shape)


class _BlockRotatedLinear(torch.autograd.Function):
    """``F.linear(x @ blockdiag(R), W, bias)`` for a frozen W.

    Forward folds R into W (out * d * b flops) so the big product is the base layer's own GEMM; backward computes
    ``g_h = g @ W`` (the GEMM a frozen layer needs anyway) and then only block-sized products:
    ``g_x = g_h R^T`` and ``g_R = x^T g_h`` per block. Saved: x, R and W (no rotated copy of the input).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        n, b = blocks.shape[0], blocks.shape[-1]
        out_features = weight.shape[0]
        folded = torch.bmm(weight.reshape(out_features, n, b).transpose(0, 1), blocks.transpose(1, 2))
        folded = folded.transpose(0, 1).reshape(out_features, n * b)
        ctx.save_for_backward(x, blocks, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, folded, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, blocks, weight = ctx.saved_tensors
        n, b = blocks.shape[0], blocks.shape[-1]
        grad_h = grad @ weight  # (..., d): gradient w.r.t. the rotated input x @ R
        grad_x = grad_blocks = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = block_rotate(grad_h, blocks.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            xb = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
            gb = grad_h.reshape(-1, n, b).transpose(0, 1)
            grad_blocks = torch.bmm(xb.transpose(1, 2), gb)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_blocks, None, grad_bias


def block_rotated_linear(x: torch.Tensor, blocks: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x @ blockdiag(blocks), weight, bias)``; the fused path needs a frozen ``weight``."""
    # the weight's gradient is needed only when autograd records (FSDP v1 hands a frozen weight in as a view with
    # requires_grad=True): under no_grad the fused path is taken either way, so outputs do not depend on wrapping
    if weight.requires_grad and torch.is_grad_enabled():
        return torch.nn.functional.linear(block_rotate(x, blocks), weight, bias)
    return _BlockRotatedLinear.apply(x, blocks, weight, bias)


def block_diag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """(n, b, b) -> the (n*b, n*b) block-diagonal matrix (differentiable, no Python loop)."""
    n, b = blocks.shape[0], blocks.shape[-1]
    out = blocks.new_zeros(n, b, n, b)
    idx = torch.arange(n, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(n * b, n * b)


# ------------------------------------------------------------------------------------------- butterfly


def butterfly_permutation(dim: int, n_chunks: int, sub: int) -> torch.Tensor:
    """Index permutation of one butterfly factor (PEFT's layout): ``dim`` splits into ``n_chunks`` chunks; inside
    each chunk the sub-chunks of size ``sub`` are reordered even-indexed first, then odd-indexed.

    Returns ``perm`` with ``P[i, perm[i]] = 1`` for the factor's permutation matrix ``P``.
    """
    length = dim // n_chunks
    k = length // sub
    order = torch.cat([torch.arange(0, k, 2), torch.arange(1, k, 2)])
    perm = (torch.arange(n_chunks)[:, None, None] * length + order[None, :, None] * sub + torch.arange(sub)[None, None, :])
    return perm.reshape(-1)


def butterfly_permutations(dim: int, block_num: int, block_size: int, n_factors: int) -> list[torch.Tensor]:
    """The ``n_factors`` permutations of BOFT; factor ``i`` mixes blocks ``2**i`` apart. One factor = identity."""
    if n_factors == 1:
        return [torch.arange(dim)]
    return [butterfly_permutation(dim, block_num // (2 ** i), block_size // 2) for i in range(n_factors)]


def butterfly_rotate_input(x: torch.Tensor, blocks: torch.Tensor, perms: Sequence[Optional[torch.Tensor]],
                           inv_perms: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``x @ (M_{m-1} ... M_0)`` with ``M_i = P_i blockdiag(blocks[i]) P_i^T``; blocks (m, n, b, b).

    ``x @ P`` is the gather ``x[..., inv_perm]`` and ``y @ P^T`` is ``y[..., perm]`` (``None``: identity).
    """
    for i in reversed(range(blocks.shape[0])):
        if inv_perms[i] is not None:
            x = x.index_select(-1, inv_perms[i])
        x = block_rotate(x, blocks[i])
        if perms[i] is not None:
            x = x.index_select(-1, perms[i])
    return x


def butterfly_dense(blocks: torch.Tensor, perms: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """The d x d matrix ``M_{m-1} ... M_0`` (reference path and merging); ``M_i[j, k] = B_i[perm[j], perm[k]]``."""
    out = None
    for i in range(blocks.shape[0]):
        m = block_diag_dense(blocks[i])
        if perms[i] is not None:
            m = m[perms[i]][:, perms[i]]
        out = m if out is None else m @ out
    return out


# ------------------------------------------------------------------------------------------- Householder


def normalize_columns(u: torch.Tensor) -> torch.Tensor:
    return u / u.norm(dim=0)


def householder_t_factor(u: torch.Tensor) -> torch.Tensor:
    """For unit columns u_0..u_{r-1} (d, r): the upper-triangular T (r, r) with
    ``H_0 H_1 ... H_{r-1} = I - U T U^T`` where ``H_i = I - 2 u_i u_i^T`` (compact WY form).

    ``T^{-1} = I/2 + strict_upper(U^T U)``, so T comes from one small triangular solve instead of r steps.
    """
    r = u.shape[1]
    gram = u.t() @ u
    t_inv = torch.triu(gram, diagonal=1) + 0.5 * torch.eye(r, device=u.device, dtype=u.dtype)
    t_inv = t_inv.to(_solve_dtype(t_inv))
    eye = torch.eye(r, device=u.device, dtype=t_inv.dtype)
    return torch.linalg.solve_triangular(t_inv, eye, upper=True).to(u.dtype)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning u's columns in order (classical Gram-Schmidt, computed by QR).

    QR may flip a column's sign against Gram-Schmidt; the reflection ``I - 2 Q Q^T`` does not see signs.
    """
    q, _ = torch.linalg.qr(u.to(_solve_dtype(u)), mode="reduced")
    return q.to(u.dtype)


def householder_rotate_input(x: torch.Tensor, u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """``x @ H^T`` for HRA's ``H = H_0 ... H_{r-1}`` (or ``I - 2QQ^T`` with Gram-Schmidt), at O(tokens * d * r).

    Without Gram-Schmidt the columns need no normalising: with ``H_i = I - 2 u_i u_i^T / |u_i|^2`` the WY factor is
    ``T^{-1} = diag(|u_i|^2) / 2 + strict_upper(U^T U)``, one masked r x r Gram matrix and a triangular solve.
    """
    u = u.to(x.dtype)
    if apply_gs:
        q = gram_schmidt(u)
        return x - 2.0 * (x @ q) @ q.t()
    t = householder_t_from_raw(u)
    return x - ((x @ u) @ t.t()) @ u.t()


class _HouseholderLinear(torch.autograd.Function):
    """``F.linear(x - x U T^T U^T, W, bias)`` for a frozen W: forward folds the reflections into W (no pass over the
    activations beyond the base GEMM); backward uses ``g_h = g @ W`` (needed by a frozen layer anyway) and a few
    (tokens x d x r) products. Gradients flow to U directly and through T (computed outside with autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]):
        folded = weight - ((weight @ u) @ t) @ u.t()  # W H
        ctx.save_for_backward(x, u, t, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, folded, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, u, t, weight = ctx.saved_tensors
        d = x.shape[-1]
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, d)
        grad_h = g2 @ weight  # gradient w.r.t. h = x H^T
        b = grad_h @ u
        bt = b @ t
        grad_x = grad_u = grad_t = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h - bt @ u.t()).reshape(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            a = x2 @ u
            grad_u = -(x2.t() @ bt) - grad_h.t() @ (a @ t.t())
            grad_t = -(b.t() @ a)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0)
        return grad_x, grad_u, grad_t, None, grad_bias


def householder_linear(x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x @ H^T, weight, bias)`` for HRA without Gram-Schmidt; fused when ``weight`` is frozen."""
    if weight.requires_grad and torch.is_grad_enabled():  # see block_rotated_linear
        return torch.nn.functional.linear(householder_rotate_input(x, u, False), weight, bias)
    u = u.to(x.dtype)
    return _HouseholderLinear.apply(x, u, householder_t_from_raw(u), weight, bias)


def householder_t_from_raw(u: torch.Tensor) -> torch.Tensor:
    """WY factor T for raw (not normalised) planes: ``T^{-1} = diag(|u_i|^2) / 2 + strict_upper(U^T U)``."""
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    mask = torch.triu(torch.ones(r, r, device=u.device, dtype=u.dtype), diagonal=1) + 0.5 * eye
    work = _solve_dtype(u)
    return torch.linalg.solve_triangular(((u.t() @ u) * mask).to(work), eye.to(work), upper=True).to(u.dtype)


def householder_dense(u: torch.Tensor, apply_gs: bool, transpose: bool = False) -> torch.Tensor:
    """Reference: the d x d matrix H (or H^T) built reflection by reflection, as in the HRA paper."""
    d, r = u.shape
    eye = torch.eye(d, device=u.device, dtype=u.dtype)
    if apply_gs:
        q = gram_schmidt(u)
        return eye - 2.0 * q @ q.t()
    u = normalize_columns(u)
    h = eye
    for i in (reversed(range(r)) if transpose else range(r)):
        ui = u[:, i : i + 1]
        h = h - 2.0 * (h @ ui) @ ui.t()
    return h


def householder_orthogonality_loss(u: torch.Tensor) -> torch.Tensor:
    """HRA's regulariser: ``||U^T U - I||_F^2`` for the unit reflection planes U (d, r)."""
    un = normalize_columns(u)
    gram = un.t() @ un
    return (gram - torch.eye(gram.shape[0], device=u.device, dtype=u.dtype)).pow(2).sum()
