"""BOFT: orthogonal butterfly fine-tuning (Liu et al., 2023).

The orthogonal matrix of OFT is replaced by a product of m butterfly factors ``M_i = P_i B_i P_i^T`` (B_i
block-diagonal with exact-Cayley blocks, P_i a butterfly permutation), so every input reaches every output with
O(d log d) parameters; a learned per-output scale ``boft_s`` follows. Unmerged: ``y = s * (W (x M_{m-1}...M_0)) + b``.
Parameter names, shapes and math follow Hugging Face PEFT (``boft_R``: (m, n_blocks, b, b), ``boft_s``: (out, 1)
for linear layers, (1, out) for convolutions). Everything is plain PyTorch: each factor is one batched matmul
over its blocks and two index gathers; no compiled extension and no loop over blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.layer import AdapterLayer, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.orthogonal import orthogonal_ops as ops
from peftkit.methods.common import adapter_dtype
from peftkit.methods.orthogonal.oft import DEFAULT_TARGETS, OrthogonalLayer, check_bias


@dataclass
class BOFTConfig(TargetedConfig):
    """Configuration of BOFT adapters; field names, defaults and meanings follow Hugging Face PEFT."""

    boft_block_size: int = field(default=4, metadata={"help": "Block size (set boft_block_num=0 to use it)."})
    boft_block_num: int = field(default=0, metadata={"help": "Number of blocks (set boft_block_size=0 to use it)."})
    boft_n_butterfly_factor: int = field(default=1, metadata={"help": "Number of butterfly factors m; 1 = plain "
                                                                 "block-diagonal OFT with exact Cayley blocks."})
    boft_dropout: float = field(default=0.0, metadata={"help": "Probability of setting blocks of one random factor "
                                                          "to the identity during training."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Kept for PEFT compatibility; must be False."})
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'boft_only'."})
    init_weights: bool = field(default=True, metadata={"help": "True: identity at start; False: random."})

    field_rules: ClassVar[dict[str, Rule]] = {
        "boft_block_size": Rule(min=0), "boft_block_num": Rule(min=0), "boft_n_butterfly_factor": Rule(min=1),
        "boft_dropout": Rule(min=0.0, max=1.0, max_open=True),
    }

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOFT
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"BOFTConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError("BOFTConfig needs boft_block_size or boft_block_num; both are 0.")
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ValueError(
                f"BOFTConfig got boft_block_size={self.boft_block_size} and boft_block_num={self.boft_block_num}; give "
                "exactly one (their product is the layer's input dimension). To use boft_block_num, pass "
                "boft_block_size=0 (its default is 4)."
            )
        if not isinstance(self.boft_n_butterfly_factor, int) or self.boft_n_butterfly_factor < 1:
            raise ValueError(f"boft_n_butterfly_factor must be an integer >= 1, got {self.boft_n_butterfly_factor!r}.")
        if not 0.0 <= float(self.boft_dropout) < 1.0:
            raise ValueError(f"boft_dropout must be in [0, 1), got {self.boft_dropout!r}.")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}.")
        check_bias(self.bias, "boft")


def boft_shape(dim: int, block_size: int, block_num: int, n_factors: int, what: str) -> tuple[int, int]:
    """Resolve (block_size, block_num) for a layer of dimension ``dim`` or raise an error that says what fits."""
    extra = n_factors - 1  # butterfly factors beyond the first
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    if block_num:
        if dim % block_num != 0:
            raise ValueError(f"BOFT: {what} ({dim}) is not divisible by boft_block_num={block_num}; use one of "
                             f"{divisors}.")
        if extra and (block_num % (2 ** extra) != 0):
            raise ValueError(f"BOFT: boft_n_butterfly_factor={n_factors} needs boft_block_num divisible by "
                             f"2**{extra}={2 ** extra}, got {block_num}.")
        block_size = dim // block_num
    else:
        if dim % block_size != 0:
            raise ValueError(f"BOFT: {what} ({dim}) is not divisible by boft_block_size={block_size}; use one of "
                             f"{divisors}.")
        if extra and dim % (block_size * 2 ** extra) != 0:
            raise ValueError(f"BOFT: boft_n_butterfly_factor={n_factors} needs {what} ({dim}) divisible by "
                             f"boft_block_size * 2**{extra} = {block_size * 2 ** extra}; lower the factor or the "
                             "block size.")
        block_num = dim // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ValueError(f"BOFT: with boft_n_butterfly_factor > 1 the block size ({block_size}) and the number of "
                         f"blocks ({block_num}) must both be even.")
    return block_size, block_num


class BOFTLayer(OrthogonalLayer):
    """BOFT on ``nn.Linear`` (input rotation) and ``nn.Conv2d`` (filter rotation)."""

    adapter_slots = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self._dropout: dict[str, float] = {}
        # Permutations are data-independent: kept per adapter as plain tensors, moved to the input's device on use.
        self._perms: dict[str, list[Optional[torch.Tensor]]] = {}
        self._inv_perms: dict[str, list[Optional[torch.Tensor]]] = {}

    def update_layer(self, adapter_name: str, config: BOFTConfig, module_name: str = "", loading: bool = False) -> None:
        what = "the convolution's in_channels * kh * kw" if self.kind == "conv" else "in_features"
        m = config.boft_n_butterfly_factor
        block_size, block_num = boft_shape(self.rot_dim, config.boft_block_size, config.boft_block_num, m,
                                           f"{module_name or 'layer'}: {what}")
        w = self.get_base_layer().weight
        dtype = adapter_dtype(w)
        r = torch.zeros(m, block_num, block_size, block_size, device=w.device, dtype=dtype)
        s_shape = (1, self.out_features) if self.kind == "conv" else (self.out_features, 1)
        s = torch.ones(s_shape, device=w.device, dtype=dtype)
        if not loading and config.init_weights is False:
            nn.init.normal_(r, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(r)
        self.boft_s[adapter_name] = nn.Parameter(s)
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = block_size, block_num
        self._dropout[adapter_name] = float(config.boft_dropout)
        perms = ops.butterfly_permutations(self.rot_dim, block_num, block_size, m)
        identity = torch.arange(self.rot_dim)
        self._perms[adapter_name] = [None if torch.equal(p, identity) else p.to(w.device) for p in perms]
        self._inv_perms[adapter_name] = [None if p is None else torch.argsort(p) for p in self._perms[adapter_name]]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.boft_block_size, self.boft_block_num, self._dropout, self._perms, self._inv_perms):
            d.pop(adapter_name, None)

    def _on(self, perms: list[Optional[torch.Tensor]], device: torch.device) -> list[Optional[torch.Tensor]]:
        return [None if p is None else p.to(device) for p in perms]

    def rotation_blocks(self, name: str) -> torch.Tensor:
        """(m, n_blocks, b, b) exact-Cayley blocks of every factor (dropout applied in training)."""
        raw = self.boft_R[name]
        m, n, b, _ = raw.shape
        blocks = ops.cayley_exact(0.5 * (raw - raw.transpose(-2, -1)))
        p = self._dropout[name]
        if self._dropout_active() and p > 0:
            # as in PEFT: blocks of one random factor are reset to the identity
            i = int(torch.randint(0, m, (1,)).item())
            blocks = torch.cat([blocks[:i], ops.drop_blocks(blocks[i], p)[None], blocks[i + 1:]])
        return blocks

    def _rotation(self, name: str) -> torch.Tensor:
        blocks = self.rotation_blocks(name)
        return ops.butterfly_dense(blocks, self._on(self._perms[name], blocks.device))

    def _rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        blocks = self.rotation_blocks(name).to(x.dtype)
        return ops.butterfly_rotate_input(x, blocks, self._on(self._perms[name], x.device),
                                          self._on(self._inv_perms[name], x.device))

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "linear" and len(names) == 1 and self.boft_R[names[0]].shape[0] == 1:
            # one factor (plain block-diagonal): fold the blocks into W, block-sized products in backward
            base = self.get_base_layer()
            blocks = self.rotation_blocks(names[0])[0].to(x.dtype)
            out = ops.block_rotated_linear(x, blocks, base.weight, None) * self._scale(names[0]).to(x.dtype)
            return out if base.bias is None else out + base.bias
        return super().forward_adapters(x, names, *args, **kwargs)

    def _scale(self, name: str) -> torch.Tensor:
        return self.boft_s[name].reshape(-1)

    # _inverse_rotation: the exact Cayley transform is orthogonal, so the transpose (the default) is the inverse.


def create_boft_layer(target: nn.Module, adapter_name: str, config: BOFTConfig, module_name: str = "",
                      loading: bool = False) -> Optional[BOFTLayer]:
    base = innermost_base(target)
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        return None
    if config.fan_in_fan_out:
        raise ValueError(f"fan_in_fan_out=True but {module_name} stores its weight as (out, in); set it to False.")
    layer = BOFTLayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


BOFT = register_method(
    MethodSpec(
        peft_type=PeftType.BOFT.value,
        config_cls=BOFTConfig,
        create_layer=create_boft_layer,
        prefix="boft_",
        default_target_modules=DEFAULT_TARGETS,
    )
)
