"""Mixed-adapter LoRA batches (one adapter per row) as two gather-and-multiply Triton kernels.

The operation, per row ``b`` of the batch and token ``t`` of that row, with ``i = index[b]``:

    result[b, t] += (x[b, t] @ A[i]^T) @ B[i]^T

where ``A`` (n+1, R, in) and ``B`` (n+1, out, R) are the rank-padded stacks of
:func:`peftkit.methods.lora.lora_ops.stacked_factors` (scaling folded into B, the last entry all zeros for rows
without adapter). Its PyTorch reference is :func:`peftkit.methods.lora.lora_ops.mixed_lora_add`, which gathers
``A[index]`` and ``B[index]`` into per-row copies before two batched products; the kernels read each row's factors
in place instead, and skip rows that use no adapter.

Two kernels, as in the SGMV/BGMV papers' split into a *shrink* (in -> R) and an *expand* (R -> out) step:

- prefill (``tokens per row >= 16``): every program takes a block of one row's tokens, which share one adapter,
  and uses ``tl.dot`` (segmented, SGMV-style: the segment is the row);
- decode (fewer tokens per row): one program per token, products as broadcast multiply-and-sum (BGMV-style), so
  a one-token row does not pad to a 16-row matrix tile.

The rank-R hidden activations are kept in float32 between the two steps; the expand step adds into ``result``
in place (its dtype), so no per-row copies of the factors and no (batch, out) temporary exist.
"""

from __future__ import annotations

import functools

import torch

_MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _build():
    """Define the kernels on first use, so that ``TRITON_INTERPRET`` is read when a kernel is first needed."""
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_dot(x_ptr, a_ptr, idx_ptr, h_ptr, T, K, R, none_idx,
                   sxb, sxt, sxk, sab, sar, sak, shb, sht, shr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        m = tl.program_id(1)
        ad = tl.load(idx_ptr + b)
        if ad == none_idx:
            return
        offs_t = m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + b * sxb + offs_t[:, None] * sxt + offs_k[None, :] * sxk,
                         mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)
            at = tl.load(a_ptr + ad * sab + offs_r[None, :] * sar + offs_k[:, None] * sak,
                         mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            if IEEE:
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        tl.store(h_ptr + b * shb + offs_t[:, None] * sht + offs_r[None, :] * shr, acc,
                 mask=(offs_t[:, None] < T) & (offs_r[None, :] < R))

    @triton.jit
    def expand_dot(h_ptr, b_ptr, idx_ptr, y_ptr, T, N, R, none_idx,
                   shb, sht, shr, sbb, sbn, sbr, syb, syt, syn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        m = tl.program_id(1)
        n = tl.program_id(2)
        ad = tl.load(idx_ptr + b)
        if ad == none_idx:
            return
        offs_t = m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        ht = tl.load(h_ptr + b * shb + offs_t[:, None] * sht + offs_r[None, :] * shr,
                     mask=(offs_t[:, None] < T) & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + ad * sbb + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                     mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
        if IEEE:
            upd = tl.dot(ht, bt.to(tl.float32), input_precision="ieee")
        else:
            upd = tl.dot(ht.to(bt.dtype), bt)
        y_ptrs = y_ptr + b * syb + offs_t[:, None] * syt + offs_n[None, :] * syn
        ymask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
        y = tl.load(y_ptrs, mask=ymask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + upd).to(y.dtype), mask=ymask)

    @triton.jit
    def shrink_vec(x_ptr, a_ptr, idx_ptr, h_ptr, T, K, R, none_idx,
                   sxb, sxt, sxk, sab, sar, sak, shb, sht, shr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        ad = tl.load(idx_ptr + b)
        if ad == none_idx:
            return
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + b * sxb + t * sxt + offs_k * sxk, mask=offs_k < K, other=0.0).to(tl.float32)
            at = tl.load(a_ptr + ad * sab + offs_r[:, None] * sar + offs_k[None, :] * sak,
                         mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(at * xv[None, :], axis=1)
        tl.store(h_ptr + b * shb + t * sht + offs_r * shr, acc, mask=offs_r < R)

    @triton.jit
    def expand_vec(h_ptr, b_ptr, idx_ptr, y_ptr, T, N, R, none_idx,
                   shb, sht, shr, sbb, sbn, sbr, syb, syt, syn,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        n = tl.program_id(2)
        ad = tl.load(idx_ptr + b)
        if ad == none_idx:
            return
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        hv = tl.load(h_ptr + b * shb + t * sht + offs_r * shr, mask=offs_r < R, other=0.0)
        bt = tl.load(b_ptr + ad * sbb + offs_n[:, None] * sbn + offs_r[None, :] * sbr,
                     mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
        upd = tl.sum(bt * hv[None, :], axis=1)
        y_ptrs = y_ptr + b * syb + t * syt + offs_n * syn
        y = tl.load(y_ptrs, mask=offs_n < N, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + upd).to(y.dtype), mask=offs_n < N)

    return triton, shrink_dot, expand_dot, shrink_vec, expand_vec


def mixed_lora_add_triton(result: torch.Tensor, x: torch.Tensor, stack, index: torch.Tensor,
                          prefill_threshold: int = _MIN_DOT) -> torch.Tensor:
    """``result[b, ...] += x[b, ...] A[index[b]]^T B[index[b]]^T``, in place; returns ``result``.

    Same contract as :func:`peftkit.methods.lora.lora_ops.mixed_lora_add` for inference (no autograd): ``x`` is
    (batch, ..., in), ``result`` (batch, ..., out), ``index`` (batch,) positions into the stacks, the last one
    meaning "no adapter". Rows with at least ``prefill_threshold`` tokens use the ``tl.dot`` kernels.
    """
    triton, shrink_dot, expand_dot, shrink_vec, expand_vec = _build()
    a_stack, b_stack = stack
    if x.dim() < 2 or result.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"mixed_lora_add_triton: x {tuple(x.shape)} and result {tuple(result.shape)} must share "
                         "every dimension but the last.")
    batch, k_in, n_out = x.shape[0], x.shape[-1], result.shape[-1]
    n_stack, r_pad = a_stack.shape[0], a_stack.shape[1]
    if a_stack.shape[2] != k_in or b_stack.shape[1] != n_out or b_stack.shape[2] != r_pad or index.numel() != batch:
        raise ValueError(f"mixed_lora_add_triton: stacks A {tuple(a_stack.shape)}, B {tuple(b_stack.shape)} and "
                         f"index {tuple(index.shape)} do not fit x {tuple(x.shape)} -> result {tuple(result.shape)}.")
    x3 = x.reshape(batch, -1, k_in)
    tokens = x3.shape[1]
    y3 = result.view(batch, tokens, n_out) if result.is_contiguous() else None
    work = y3 if y3 is not None else result.reshape(batch, tokens, n_out).contiguous()
    a_stack = a_stack.to(x.dtype)
    b_stack = b_stack.to(x.dtype)
    idx = index.to(device=x.device, dtype=torch.int32).contiguous()
    hidden = torch.empty(batch, tokens, r_pad, device=x.device, dtype=torch.float32)
    block_r = max(_MIN_DOT, _next_pow2(r_pad))
    none_idx = n_stack - 1
    ieee = x.dtype == torch.float32
    if tokens >= prefill_threshold:
        block_m, block_k, block_n = (64 if tokens >= 64 else 16), 64, 64
        grid_s = (batch, triton.cdiv(tokens, block_m))
        shrink_dot[grid_s](x3, a_stack, idx, hidden, tokens, k_in, r_pad, none_idx,
                           *x3.stride(), *a_stack.stride(), *hidden.stride(),
                           BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, IEEE=ieee)
        grid_e = (batch, triton.cdiv(tokens, block_m), triton.cdiv(n_out, block_n))
        expand_dot[grid_e](hidden, b_stack, idx, work, tokens, n_out, r_pad, none_idx,
                           *hidden.stride(), *b_stack.stride(), *work.stride(),
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee)
    else:
        block_k, block_n = 128, 128
        shrink_vec[(batch, tokens)](x3, a_stack, idx, hidden, tokens, k_in, r_pad, none_idx,
                                    *x3.stride(), *a_stack.stride(), *hidden.stride(),
                                    BLOCK_K=block_k, BLOCK_R=block_r)
        expand_vec[(batch, tokens, triton.cdiv(n_out, block_n))](
            hidden, b_stack, idx, work, tokens, n_out, r_pad, none_idx,
            *hidden.stride(), *b_stack.stride(), *work.stride(), BLOCK_N=block_n, BLOCK_R=block_r)
    if y3 is None:
        result.copy_(work.view(result.shape))
    return result
