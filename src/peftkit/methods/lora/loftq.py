"""LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"): quantisation-aware LoRA initialisation.

For a weight W, LoftQ alternates ``T`` times between quantising what the adapter does not cover and fitting the
adapter to what the quantisation lost:

    Q_t = dequant(quant(W - s * B_{t-1} A_{t-1}))        (B_0 A_0 = 0)
    s * B_t A_t = best rank-r approximation of W - Q_t    (truncated SVD, split as sqrt(S) on both sides)

so that ``Q + s * B A`` starts close to W. The base layer keeps ``Q`` (the dequantised weight: a float simulation
of the quantised model, the "fake-quant" path that needs neither bitsandbytes nor a GPU), and the adapter starts
at ``A, B``.

Quantisers, simulated in float32:
- 4 bits: NormalFloat-4 (QLoRA): blocks of 64 values scaled by their absolute maximum, each value rounded to the
  nearest of the 16 NF4 levels.
- 8 bits: row-wise absmax int8 (LLM.int8()'s vector-wise quantisation): ``round(127 * w / max|w_row|)``.

Departure from Hugging Face PEFT 0.21, whose LoftQ needs bitsandbytes and a CUDA device: this runs anywhere, and
the LoRA scaling s is taken into account (PEFT stores the SVD factors as they are, so ``Q + s B A`` only
approximates W when ``lora_alpha == r``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The 16 NormalFloat-4 levels (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCK = 64
LOFTQ_BITS = (4, 8)


@dataclass
class LoftQConfig:
    """LoftQ's settings (as PEFT's ``LoftQConfig``): ``loftq_bits`` (4: NF4, 8: int8) and ``loftq_iter``
    (alternating steps). Pass it as ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})

    def __post_init__(self) -> None:
        check_loftq_settings(self.loftq_bits, self.loftq_iter)


def check_loftq_settings(bits: object, iters: object) -> None:
    if bits not in LOFTQ_BITS or isinstance(bits, bool):
        raise ValueError(f"loftq_config: loftq_bits={bits!r} is not supported; use 4 (NF4) or 8 (int8).")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters <= 0:
        raise ValueError(f"loftq_config: loftq_iter must be a positive integer, got {iters!r}.")


def fake_quantize_nf4(weight: torch.Tensor, block: int = NF4_BLOCK) -> torch.Tensor:
    """``weight`` after NF4 quantisation and dequantisation (blocks of ``block`` consecutive values)."""
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=weight.device)
    idx = ((blocks / scale).unsqueeze(-1) - levels).abs().argmin(dim=-1)
    out = levels[idx] * scale
    return out.reshape(-1)[: weight.numel()].view(weight.shape)


def fake_quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out x in) after row-wise absmax int8 quantisation and dequantisation."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    check_loftq_settings(bits, 1)
    return fake_quantize_nf4(weight) if bits == 4 else fake_quantize_int8(weight)


def loftq_factors(weight: torch.Tensor, r: int, scaling: float, bits: int, iters: int):
    """LoftQ for one weight (out x in): ``(A, B, Q)`` with ``Q + scaling * B @ A`` close to ``weight``; ``Q`` is
    the dequantised weight (float32)."""
    check_loftq_settings(bits, iters)
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-d weight (out x in), got shape {tuple(weight.shape)}.")
    if scaling == 0:
        raise ValueError("LoftQ needs a non-zero LoRA scaling (lora_alpha != 0).")
    w = weight.detach().float()
    approx = torch.zeros_like(w)  # s * B A so far
    k = min(r, *w.shape)  # a rank above the layer's dimensions: the extra rows/columns stay zero
    a = w.new_zeros(r, w.shape[1])
    b = w.new_zeros(w.shape[0], r)
    sign = 1.0 if scaling > 0 else -1.0
    for _ in range(iters):
        q = fake_quantize(w - approx, bits)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(s[:k] / abs(scaling))
        b[:, :k] = u[:, :k] * root * sign
        a[:k] = root[:, None] * vh[:k]
        approx = scaling * (b @ a)
    return a, b, q


__all__ = ["LoftQConfig", "NF4_LEVELS", "fake_quantize", "fake_quantize_int8", "fake_quantize_nf4", "loftq_factors"]
