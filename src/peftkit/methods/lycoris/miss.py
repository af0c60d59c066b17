"""MiSS, Matrix Shard Sharing (Kang & Yin, 2024), with its ``bat`` and ``mini`` variants.

One trainable matrix per layer, shaped like LoRA's B. For a frozen weight W (out x in):

- default (``init_weights=True``): ``miss_block`` D is (r, out). The input is cut into shards of r features
  (zero-padded when r does not divide in), the shards are summed and multiplied by D:
  ``y = W x + D^T sum_k x[k*r:(k+1)*r]``. Equivalently the update repeats D^T along the input dimension:
  ``delta W[o, j] = D[j mod r, o]``.
- ``mini``: D is (r, mini_r) and is tiled ``out / mini_r`` times along the output dimension before use.
- ``bat``: D is (out/r, r, r), one r x r block per output shard. W is cut into r x r blocks W_ij and the update is
  non-linear in W: ``W'_ij = W_ij + W_ij D_i + D_i``. Requires r to divide both in and out. Unmerge inverts
  ``(I + D_i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.layer import AdapterLayer, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.lora import lora_ops
from peftkit.methods.common import adapter_dtype, conv1d_cls
from peftkit.methods.lora.lora import LORA

_BIAS_CHOICES = ("none", "all", "MiSS_only")
_INIT_CHOICES = (True, False, "bat", "mini")


@dataclass
class MissConfig(TargetedConfig):
    """Configuration of MiSS adapters; field names and meanings follow Hugging Face PEFT."""

    r: int = field(default=64, metadata={"help": "Shard size along in_features (rows of miss_block)."})
    miss_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    mini_r: int = field(
        default=1, metadata={"help": "With init_weights='mini': columns of miss_block; must divide out_features."}
    )
    init_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: MiSS (zeros, identity at start); False: random miss_block (not identity); "
                  "'bat': non-linear per-shard update (r must divide in and out features); 'mini': (r, mini_r) block "
                  "tiled along out_features."},
    )
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'MiSS_only'."})

    field_rules: ClassVar[dict[str, Rule]] = {"r": Rule(min=1), "mini_r": Rule(min=1), "miss_dropout": Rule(min=0.0, max=1.0, max_open=True)}

    def __post_init__(self) -> None:
        self.peft_type = PeftType.MISS
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"MissConfig.r must be a positive integer, got {self.r!r}.")
        if isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r <= 0:
            raise ValueError(f"MissConfig.mini_r must be a positive integer, got {self.mini_r!r}.")
        if self.init_weights not in _INIT_CHOICES or (isinstance(self.init_weights, int) and not isinstance(self.init_weights, bool)):
            raise ValueError(f"MissConfig.init_weights must be one of True, False, 'bat', 'mini'; got {self.init_weights!r}.")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"MissConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}.")
        if not 0.0 <= float(self.miss_dropout) < 1.0:
            raise ValueError(f"miss_dropout must be in [0, 1), got {self.miss_dropout!r}.")


# ------------------------------------------------------------------------------------------------ math
def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """(..., in) -> (..., r): zero-pad ``in`` up to a multiple of r and sum the shards of r features."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)


def tiled_delta(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """Default / mini update as a dense (out, in) matrix: ``delta[o, j] = block[j mod r, o]``; block is (r, out)."""
    r = block.shape[0]
    return block.t().repeat(1, math.ceil(in_features / r))[:, :in_features]


def bat_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Bat update of an (out, in) weight given ``block`` (out/r, r, r): per r x r block, ``W_ij D_i + D_i``."""
    out_f, in_f = weight.shape
    r = block.shape[-1]
    w = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r)
    return (w @ block + block).permute(1, 2, 0, 3).reshape(out_f, in_f)


def bat_unmerge(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Inverse of ``W + bat_delta(W, D)``: ``W_ij = (W'_ij - D_i) (I + D_i)^-1``."""
    out_f, in_f = weight.shape
    r = block.shape[-1]
    eye = torch.eye(r, device=block.device, dtype=torch.float32)
    inv = torch.linalg.inv(eye + block.float()).to(block.dtype)
    w = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)
    return ((w - block) @ inv).permute(1, 2, 0, 3).reshape(out_f, in_f)


def _tiled_add(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """W + tiled_delta(D): (out, in) plus D^T (out, r) repeated along in_features, as a fresh tensor; a broadcast
    over the shards when r divides in_features (no (out, in) copy of D is built)."""
    out_f, in_f = w.shape
    r = d.shape[0]
    if in_f % r == 0:
        return (w.view(out_f, in_f // r, r) + d.t().unsqueeze(1)).view(out_f, in_f)
    return w + tiled_delta(d, in_f)


class _MissShardFn(torch.autograd.Function):
    """y = x W^T + b + shard_sum(x) D for a frozen W and D (r, out), as one autograd node, in one of two ways:

    - factored (r must divide in_features): y += h D with h = shard_sum(x); backward adds g D^T, broadcast over
      the shards, into the base input gradient in place. Two rank-r products per step beyond the base ones.
    - merged: y = x (W + tiled D^T)^T with W + tiled D^T built transiently (a broadcast add, rebuilt in backward
      rather than saved). Only dD = h^T g remains as a rank-r product, so once tokens * r outgrows the weight
      (training batches; r is 64 by default) this is the cheaper way.

    Saves h (tokens, r), never the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, block, fan_in_fan_out, merged):  # type: ignore[override]
        w = weight.t() if fan_in_fan_out else weight
        out_f, in_f = w.shape
        r = block.shape[0]
        d = block if block.dtype == x.dtype else block.to(x.dtype)
        h = shard_sum(x.reshape(-1, in_f), r)  # (tokens, r)
        if merged:
            y = F.linear(x, _tiled_add(w, d), bias)
        else:
            y = F.linear(x, w, bias)
            (y if y.dim() == 2 else y.view(-1, out_f)).addmm_(h, d)
        ctx.save_for_backward(weight, h, d)
        ctx.fan_in_fan_out, ctx.x_shape, ctx.merged = fan_in_fan_out, x.shape, merged
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, h, d = ctx.saved_tensors
        w = weight.t() if ctx.fan_in_fan_out else weight
        out_f, in_f = w.shape
        r = d.shape[0]
        need_x, _, need_bias, need_block = ctx.needs_input_grad[:4]
        g = grad.to(h.dtype).reshape(-1, out_f)
        dx = dd = dbias = None
        if need_x:
            if ctx.merged:
                dx = torch.mm(g, _tiled_add(w, d))
            else:
                dx = torch.mm(g, w)
                dx.view(-1, in_f // r, r).add_(torch.mm(g, d.t()).unsqueeze(1))
            dx = dx.view(ctx.x_shape)
        if need_block:
            dd = torch.mm(h.t(), g)
        if need_bias:
            dbias = g.sum(0)
        return dx, None, dbias, dd, None, None


def miss_merged_is_cheaper(tokens: int, r: int, in_f: int) -> bool:
    """Merged costs two broadcast adds over the (out, in) weight per step; factored two rank-r products over
    the tokens, (tokens x r x out) multiply-adds each. Merged once tokens * r exceeds a few times in_features."""
    return tokens * r > 4 * in_f


class MissLinear(AdapterLayer):
    """MiSS on ``nn.Linear`` or transformers' ``Conv1D`` (weight stored as in x out)."""

    adapter_slots = ("miss_block",)
    aux_slots = ("miss_dropout",)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        w = self.get_base_layer().weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self.miss_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.variant: dict[str, str] = {}  # "miss", "mini", "bat" (per adapter, unlike a per-layer switch)

    def update_layer(self, adapter_name: str, config: MissConfig, module_name: str = "", loading: bool = False) -> None:
        r, mini_r, init = config.r, config.mini_r, config.init_weights
        where = module_name or type(self.get_base_layer()).__name__
        if r > self.in_features:
            raise ValueError(
                f"MiSS r={r} is larger than in_features={self.in_features} of {where}; use r <= {self.in_features} "
                "or exclude this module."
            )
        base_w = self.get_base_layer().weight
        dtype = adapter_dtype(base_w)
        if init == "bat":
            if self.in_features % r or self.out_features % r:
                raise ValueError(
                    f"MiSS init_weights='bat' cuts the weight into r x r blocks, so r must divide both sizes, but "
                    f"{where} has in_features={self.in_features}, out_features={self.out_features} and r={r}. Choose an "
                    "r that divides both, exclude this module, or use init_weights=True."
                )
            shape: tuple[int, ...] = (self.out_features // r, r, r)
            variant = "bat"
        elif init == "mini":
            if mini_r > self.out_features or self.out_features % mini_r:
                raise ValueError(
                    f"MiSS init_weights='mini' tiles a (r, mini_r) block along out_features, so mini_r must divide "
                    f"out_features, but {where} has out_features={self.out_features} and mini_r={mini_r}. Choose a "
                    "mini_r that divides it or exclude this module."
                )
            shape = (r, mini_r)
            variant = "mini"
        else:
            shape = (r, self.out_features)
            variant = "miss"
        block = torch.zeros(shape, device=base_w.device, dtype=dtype)
        if init is False and not loading:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # PEFT's "random" init: not an identity
        self.miss_block[adapter_name] = nn.Parameter(block)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.variant[adapter_name] = variant
        p = float(config.miss_dropout)
        self.miss_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.miss_r, self.miss_mini_r, self.variant):
            d.pop(adapter_name, None)

    # ---- helpers
    def _full_block(self, adapter_name: str) -> torch.Tensor:
        """The (r, out) matrix applied to the shard sum (mini's block tiled along out_features)."""
        block = self.miss_block[adapter_name]
        if self.variant[adapter_name] == "mini":
            block = block.repeat(1, self.out_features // self.miss_mini_r[adapter_name])
        return block

    def _orient(self, weight: torch.Tensor) -> torch.Tensor:
        """Stored weight <-> (out, in) orientation (a transpose for Conv1D; its own inverse)."""
        return weight.t() if self.fan_in_fan_out else weight

    # ---- merge
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.variant[adapter_name] == "bat":
            return self._orient(bat_delta(self._orient(self.get_base_layer().weight).to(self.miss_block[adapter_name].dtype),
                                          self.miss_block[adapter_name]))
        return self._orient(tiled_delta(self._full_block(adapter_name), self.in_features))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.variant[adapter_name] != "bat":
            return weight + self.delta_weight(adapter_name).to(weight.dtype)
        block = self.miss_block[adapter_name]
        w = self._orient(weight).to(block.dtype)
        return self._orient(w + bat_delta(w, block)).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.variant[adapter_name] != "bat":
            return weight - self.delta_weight(adapter_name).to(weight.dtype)
        block = self.miss_block[adapter_name]
        return self._orient(bat_unmerge(self._orient(weight).to(block.dtype), block)).to(weight.dtype)

    # ---- forward
    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.variant[adapter_name] == "bat":
            # the update depends on W, so it is applied as a weight; used for single adapters of mixed batches
            delta = self._orient(self.delta_weight(adapter_name))
            return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        block = self._full_block(adapter_name)
        x_d = self.miss_dropout[adapter_name](x.to(block.dtype))
        return result + (shard_sum(x_d, block.shape[0]) @ block).to(result.dtype)

    def _fused_ok(self, x: torch.Tensor, names: Sequence[str]) -> bool:
        """Whether :class:`_MissShardFn` can serve this call: one shard adapter, no active dropout, and what every
        fused linear node needs (frozen weight, matching dtype, no autocast)."""
        if len(names) != 1:
            return False
        n = names[0]
        if self.variant[n] == "bat":
            return False
        if self.training and not isinstance(self.miss_dropout[n], nn.Identity):
            return False
        return lora_ops.fused_linear_decline(self._modules["base_layer"], x) is None

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs and self._fused_ok(x, names):
            base = self._modules["base_layer"]
            r = self.miss_r[names[0]]
            merged = self.in_features % r != 0 or miss_merged_is_cheaper(x.numel() // self.in_features, r, self.in_features)
            return _MissShardFn.apply(x, base.weight, base.bias, self._full_block(names[0]), self.fan_in_fan_out, merged)
        if not any(self.variant[n] == "bat" for n in names) or isinstance(self.base_layer, AdapterLayer):
            return super().forward_adapters(x, names, *args, **kwargs)
        # Bat's update depends on the weight it is applied to, so with a bat adapter active the layer runs on the
        # adapted weight, built in the order of ``names`` exactly as merge() would build it (so merged == unmerged
        # for any mix of variants); shard adapters in that chain are folded in without their dropout.
        base = self.get_base_layer()
        weight = base.weight
        for n in names:
            weight = self.merged_weight(n, weight)
        result = F.linear(x.to(weight.dtype), self._orient(weight), base.bias)
        return result.to(x.dtype) if x.dtype.is_floating_point else result


def create_miss_layer(target: nn.Module, adapter_name: str, config: MissConfig, module_name: str = "", loading: bool = False) -> Optional[MissLinear]:
    base = innermost_base(target)
    if isinstance(base, nn.Linear):
        layer = MissLinear(target, fan_in_fan_out=False)
    elif conv1d_cls() and isinstance(base, conv1d_cls()):
        layer = MissLinear(target, fan_in_fan_out=True)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


MISS = register_method(
    MethodSpec(
        peft_type=PeftType.MISS.value,
        config_cls=MissConfig,
        create_layer=create_miss_layer,
        prefix="miss_",
        default_target_modules=dict(LORA.default_target_modules),
    )
)
