"""LoRA linear forward with the rank-r update fused into the base matrix product's epilogue.

    y = x W^T + bias + s * h B^T,    h = x A^T  (tokens, r)

``h`` is computed first (a thin product, also kept for the backward pass); the kernel then runs the base tiled
matrix product and, before its single store of each output tile, adds ``s * h_tile @ B_tile^T`` and the bias, so
the LoRA update never makes its own pass over the (tokens, out) output. The backward pass is the PyTorch one of
:class:`peftkit.methods.lora.lora_ops._LoraOneFn` (cuBLAS products, rank-first).

Opt-in (``PEFTKIT_LORA_PATH=triton``) until it is measured on a GPU against cuBLAS: a hand-tiled product without
autotuning can be slower than the vendor library for the base product it replaces.
"""

from __future__ import annotations

import functools

import torch


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def lora_linear_fwd(x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr, M, N, K, R, scaling,
                        sxm, sxk, swn, swk, shm, shr, sbn, sbr, sym, syn,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                         mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            wt = tl.load(w_ptr + offs_n[None, :] * swn + offs_k[:, None] * swk,
                         mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
            if IEEE:
                acc += tl.dot(xt, wt, input_precision="ieee")
            else:
                acc += tl.dot(xt, wt)
        # epilogue: the rank-r update and the bias, added before the one store of this tile
        offs_r = tl.arange(0, BLOCK_R)
        ht = tl.load(h_ptr + offs_m[:, None] * shm + offs_r[None, :] * shr,
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                     mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
        if IEEE:
            acc += scaling * tl.dot(ht, bt, input_precision="ieee")
        else:
            acc += scaling * tl.dot(ht, bt)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    return triton, lora_linear_fwd


def lora_linear_forward(x2: torch.Tensor, w: torch.Tensor, bias, h: torch.Tensor, b: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """``x2 W^T + bias + scaling * h B^T`` for 2-d ``x2`` (tokens, in), ``w`` (out, in), ``h`` (tokens, r) and
    ``b`` (out, r), all of one dtype; returns a new (tokens, out) tensor in that dtype."""
    triton, kernel = _build()
    m, k = x2.shape
    n, r = w.shape[0], h.shape[1]
    if w.shape[1] != k or b.shape != (n, r) or h.shape[0] != m or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"lora_linear_forward: shapes do not fit: x {tuple(x2.shape)}, W {tuple(w.shape)}, "
                         f"h {tuple(h.shape)}, B {tuple(b.shape)}, bias {None if bias is None else tuple(bias.shape)}.")
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    block_m, block_n, block_k = 64, 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    kernel[grid](x2, w, bias if bias is not None else y, h, b, y, m, n, k, r, float(scaling),
                 *x2.stride(), *w.stride(), *h.stride(), *b.stride(), *y.stride(),
                 HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 BLOCK_R=max(16, _next_pow2(r)), IEEE=x2.dtype == torch.float32)
    return y
