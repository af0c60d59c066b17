"""OFT: orthogonal fine-tuning (Qiu et al., 2023), with the constrained variant COFT.

Each adapted layer learns a block-diagonal orthogonal matrix R (d x d, d = in_features, or in_channels * kh * kw for
a convolution), each block the Cayley transform of a skew-symmetric matrix. The layer computes
``y = W (x R)`` unmerged, ``W' = W R^T`` merged: every neuron (row of W) is rotated by the same R, so the angles
between neurons are kept. Parameter name, shape and math follow Hugging Face PEFT (``oft_R.weight`` holds the
strictly-upper entries of each block's skew matrix, (n_blocks, b*(b-1)/2)).

:class:`OrthogonalLayer` is the shared layer logic of the orthogonal family (OFT, BOFT, HRA): adapters rotate the
layer's input space; linear layers rotate the input (cheap, no d x d matrix), convolutions rotate their filters.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.layer import BASE_ADAPTER, AdapterLayer, MixedBatch, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.orthogonal import orthogonal_ops as ops
from peftkit.methods.common import adapter_dtype

logger = logging.getLogger(__name__)

# PEFT's defaults for the orthogonal family (same for OFT, BOFT and HRA).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"], "opt": ["q_proj", "v_proj"],
}


def check_bias(bias: str, method: str) -> None:
    choices = ("none", "all", f"{method}_only")
    if bias not in choices:
        raise ValueError(f"bias must be one of {choices}, got {bias!r}.")


@dataclass
class OFTConfig(TargetedConfig):
    """Configuration of OFT adapters; field names, defaults and meanings follow Hugging Face PEFT."""

    r: int = field(default=0, metadata={"help": "Number of OFT blocks per layer (set oft_block_size=0 to use it)."})
    oft_block_size: int = field(default=32, metadata={"help": "Size of each OFT block (set r=0 to use it)."})
    module_dropout: float = field(default=0.0, metadata={"help": "Probability of setting a block to the identity "
                                                          "during training (multiplicative dropout)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Kept for PEFT compatibility; must be False."})
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'oft_only'."})
    init_weights: bool = field(default=True, metadata={"help": "True: R = I at start; False: random blocks."})
    coft: bool = field(default=False, metadata={"help": "Constrained OFT: keep each block within eps of I."})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius (freedom of rotation)."})
    block_share: bool = field(default=False, metadata={"help": "Share one block across all blocks of a layer."})
    use_cayley_neumann: bool = field(default=True, metadata={"help": "Approximate the Cayley inverse by a Neumann "
                                                               "series (faster, approximately orthogonal)."})
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of the Neumann series."})

    field_rules: ClassVar[dict[str, Rule]] = {
        "r": Rule(min=0), "oft_block_size": Rule(min=0), "num_cayley_neumann_terms": Rule(min=0, max=100),
        "module_dropout": Rule(min=0.0, max=1.0, max_open=True), "eps": Rule(min=0.0),
    }

    def __post_init__(self) -> None:
        self.peft_type = PeftType.OFT
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"OFTConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError("OFTConfig needs r (number of blocks) or oft_block_size (block size); both are 0.")
        if self.r != 0 and self.oft_block_size != 0:
            raise ValueError(
                f"OFTConfig got r={self.r} and oft_block_size={self.oft_block_size}; give exactly one, since "
                "r * oft_block_size = in_features. To use r, pass oft_block_size=0 (its default is 32)."
            )
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout!r}.")
        if self.coft and not self.eps > 0:
            raise ValueError(f"coft=True needs eps > 0, got {self.eps!r}.")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}.")
        check_bias(self.bias, "oft")


# ------------------------------------------------------------------------------------------------ shared layer


def _kind(base: nn.Module) -> str:
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, nn.Conv2d):
        return "conv"
    if isinstance(base, nn.Embedding):
        return "embedding"
    raise TypeError(f"{type(base).__name__} is not supported by the orthogonal methods")


class OrthogonalLayer(AdapterLayer):
    """Layer logic shared by OFT, BOFT and HRA: each adapter ``a`` has an orthogonal R_a acting on the input space
    (and BOFT an optional per-output scale s_a). Merged: ``W' = s * (W_flat @ R^T)``.

    Methods implement ``_rotation(name)`` (the dense R), ``_rotate(name, x)`` (``x @ R`` without building R),
    ``_inverse_rotation(name)`` and optionally ``_scale(name)`` and ``_prepare(name)``.
    With several active adapters [a, b], ``W_eff = W R_a^T R_b^T``: b rotates the input first, then a, so merging
    them in order gives exactly the unmerged output.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.kind = _kind(base)
        if self.kind == "conv":
            if base.groups != 1:
                raise ValueError(f"Grouped convolutions (groups={base.groups}) are not supported; target another layer.")
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self.rot_dim = base.in_channels * math.prod(base.kernel_size)
        elif self.kind == "linear":
            self.in_features, self.out_features = base.in_features, base.out_features
            self.rot_dim = base.in_features
        else:
            self.in_features, self.out_features = base.embedding_dim, base.num_embeddings
            self.rot_dim = base.embedding_dim

    # ---- method hooks
    def _rotation(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ self._rotation(name).to(x.dtype)

    def _inverse_rotation(self, name: str) -> torch.Tensor:
        return self._rotation(name).t()

    def _scale(self, name: str) -> Optional[torch.Tensor]:
        return None

    def _prepare(self, name: str) -> None:
        """Called before each use of adapter ``name`` (COFT's projection)."""

    # ---- merging: never with dropout, also in train mode (a merged weight must not depend on a random draw)
    _merging: bool = False

    def _dropout_active(self) -> bool:
        return self.training and not self._merging

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self._merging = True
        try:
            super().merge(adapter_names, safe_merge=safe_merge)
        finally:
            self._merging = False

    def unmerge(self) -> None:
        self._merging = True
        try:
            super().unmerge()
        finally:
            self._merging = False

    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        self._merging = True
        try:
            return super().first_nonfinite_merge(adapter_names)
        finally:
            self._merging = False

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self._prepare(adapter_name)
        rot = self._rotation(adapter_name)
        flat = weight.reshape(weight.shape[0], -1).to(rot.dtype) @ rot.t()
        scale = self._scale(adapter_name)
        if scale is not None:
            flat = flat * scale.to(flat.dtype).reshape(-1, 1)
        return flat.reshape(weight.shape).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        inv = self._inverse_rotation(adapter_name)
        flat = weight.reshape(weight.shape[0], -1).to(inv.dtype)
        scale = self._scale(adapter_name)
        if scale is not None:
            flat = flat / scale.to(flat.dtype).reshape(-1, 1)
        return (flat @ inv.t()).reshape(weight.shape).to(weight.dtype)

    # ---- forward
    def effective_weight(self, names: Sequence[str]) -> torch.Tensor:
        """``W`` with the adapters folded in, differentiable in the adapter parameters (reference / conv path)."""
        weight = self.get_base_layer().weight
        flat = weight.reshape(weight.shape[0], -1)
        for name in names:
            rot = self._rotation(name)
            flat = flat @ rot.to(flat.dtype).t()
            scale = self._scale(name)
            if scale is not None:
                flat = flat * scale.to(flat.dtype).reshape(-1, 1)
        return flat.reshape(weight.shape)

    def _output_scale(self, names: Sequence[str], dtype: torch.dtype) -> Optional[torch.Tensor]:
        scale = None
        for name in names:
            s = self._scale(name)
            if s is not None:
                s = s.reshape(-1).to(dtype)
                scale = s if scale is None else scale * s
        return scale

    def _forward_nested(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward when ``base_layer`` is another method's adapter layer (PeftMixedModel): the rotated input goes
        through that layer (with its own adapters), as PEFT composes them."""
        if self.kind != "linear":
            raise NotImplementedError(
                f"{type(self).__name__} on a {self.kind} layer cannot be stacked on another method's adapter layer; "
                "in a PeftMixedModel add the rotation adapter first, or target other modules with it."
            )
        for name in names:
            self._prepare(name)
        h = x
        for name in reversed(list(names)):
            h = self._rotate(name, h)
        out = self.base_layer(h, *args, **kwargs)
        scale = self._output_scale(names, x.dtype)
        if scale is None:
            return out
        bias = self.get_base_layer().bias
        return out * scale if bias is None else (out - bias) * scale + bias

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(self.base_layer, AdapterLayer):
            return self._forward_nested(x, names, *args, **kwargs)
        for name in names:
            self._prepare(name)
        base = self.get_base_layer()
        if self.kind == "conv":
            return base._conv_forward(x, self.effective_weight(names).to(x.dtype), base.bias)
        # Linear: rotate the input (tokens x d at O(d * block) per token) instead of building W R^T.
        h = x
        for name in reversed(list(names)):
            h = self._rotate(name, h)
        scale = self._output_scale(names, x.dtype)
        if scale is None:
            return F.linear(h, base.weight, base.bias)
        out = F.linear(h, base.weight) * scale
        return out if base.bias is None else out + base.bias

    def forward_reference(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Plain implementation: fold the adapters into the weight and run the base op (tests compare against it)."""
        for name in names:
            self._prepare(name)
        base = self.get_base_layer()
        weight = self.effective_weight(names).to(x.dtype)
        if self.kind == "conv":
            return base._conv_forward(x, weight, base.bias)
        return F.linear(x, weight, base.bias)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Multiplicative: the output is recomputed from the rotated input rather than corrected additively.
        return self.forward_adapters(x, [adapter_name], *args, **kwargs)

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind != "linear" or isinstance(self.base_layer, AdapterLayer):
            return super().forward_mixed(x, batch, *args, **kwargs)
        names = [n for n in batch.groups if n != BASE_ADAPTER and n in self.adapter_configs]
        base = self.get_base_layer()
        if not names:
            return base(x)
        h = x.clone()
        row_scale = None
        for name in names:
            self._prepare(name)
            rows = batch.rows(name, x.device)
            h[rows] = self._rotate(name, x[rows])
            s = self._scale(name)
            if s is not None:
                if row_scale is None:
                    row_scale = x.new_ones(x.shape[0], self.out_features)
                row_scale[rows] = s.reshape(1, -1).to(x.dtype)
        out = F.linear(h, base.weight)
        if row_scale is not None:
            out = out * row_scale.reshape((x.shape[0],) + (1,) * (out.dim() - 2) + (-1,))
        return out if base.bias is None else out + base.bias


# ------------------------------------------------------------------------------------------------ OFT layer


class OFTRotation(nn.Module):
    """Holds one adapter's ``weight``: (n_blocks, b*(b-1)/2), or (1, ...) with block sharing."""

    def __init__(self, n_stored: int, block_size: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_stored, block_size * (block_size - 1) // 2, device=device, dtype=dtype))


def _nearest_divisor(dim: int, value: int) -> int:
    """PEFT's adjustment of an r / block size that does not divide ``dim`` (checkpoints depend on it)."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


class OFTLayer(OrthogonalLayer):
    """OFT on ``nn.Linear``, ``nn.Conv2d`` (rotating the flattened filters) and ``nn.Embedding`` (rotating the
    embedding vectors)."""

    adapter_slots = ("oft_R", "oft_embedding_R")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self._oft: dict[str, OFTConfig] = {}

    def _slot(self) -> nn.ModuleDict:
        return self.oft_embedding_R if self.kind == "embedding" else self.oft_R

    def update_layer(self, adapter_name: str, config: OFTConfig, module_name: str = "", loading: bool = False) -> None:
        dim = self.rot_dim
        r, block = config.r, config.oft_block_size
        if r == 0:
            if dim % block != 0 or block > dim:
                new = _nearest_divisor(dim, block)
                logger.warning("OFT: oft_block_size=%d does not divide %s's dimension %d; using %d (as PEFT does).",
                               block, module_name or "the layer", dim, new)
                block = new
            r = dim // block
        else:
            if dim % r != 0 or r > dim:
                new = _nearest_divisor(dim, r)
                logger.warning("OFT: r=%d does not divide %s's dimension %d; using %d (as PEFT does).",
                               r, module_name or "the layer", dim, new)
                r = new
            block = dim // r
        w = self.get_base_layer().weight
        module = OFTRotation(1 if config.block_share else r, block, w.device, adapter_dtype(w))
        if not loading and config.init_weights is False:
            nn.init.normal_(module.weight, mean=0.0, std=0.1)
        self._slot()[adapter_name] = module
        self.r[adapter_name], self.oft_block_size[adapter_name] = r, block
        self._oft[adapter_name] = config

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.oft_block_size, self._oft):
            d.pop(adapter_name, None)

    def _prepare(self, name: str) -> None:
        config = self._oft[name]
        if config.coft:
            weight = self._slot()[name].weight
            with torch.no_grad():
                weight.copy_(ops.coft_project(weight, config.eps))

    def rotation_blocks(self, name: str) -> torch.Tensor:
        """The (n_blocks, b, b) blocks of R (module dropout applied in training)."""
        config = self._oft[name]
        q = ops.skew_from_vector(self._slot()[name].weight, self.oft_block_size[name])
        if config.use_cayley_neumann:
            blocks = ops.cayley_neumann(q, config.num_cayley_neumann_terms)
        else:
            blocks = ops.cayley_exact(q)
        if config.block_share:
            blocks = blocks.expand(self.r[name], -1, -1)
        if self._dropout_active() and config.module_dropout > 0:
            blocks = ops.drop_blocks(blocks, config.module_dropout)
        return blocks

    def _rotation(self, name: str) -> torch.Tensor:
        return ops.block_diag_dense(self.rotation_blocks(name))

    def _rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return ops.block_rotate(x, self.rotation_blocks(name).to(x.dtype))

    def _inverse_rotation(self, name: str) -> torch.Tensor:
        # The Neumann form is only approximately orthogonal: invert the blocks so that unmerge is exact.
        with torch.no_grad():
            blocks = self.rotation_blocks(name)
            return ops.block_diag_dense(torch.linalg.inv(blocks.float()).to(blocks.dtype))

    # ---- Embedding: the rotation acts on the output vectors, W' = W R
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.kind != "embedding":
            return super().merged_weight(adapter_name, weight)
        self._prepare(adapter_name)
        rot = self._rotation(adapter_name)
        return (weight.to(rot.dtype) @ rot).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.kind != "embedding":
            return super().unmerged_weight(adapter_name, weight)
        inv = self._inverse_rotation(adapter_name)
        return (weight.to(inv.dtype) @ inv).to(weight.dtype)

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "linear" and isinstance(self.base_layer, AdapterLayer):  # stacked (PeftMixedModel)
            return self._forward_nested(x, names, *args, **kwargs)
        if self.kind == "linear" and len(names) == 1:
            # one adapter: fold the blocks into W for the forward GEMM, block-sized products in backward
            self._prepare(names[0])
            base = self.get_base_layer()
            return ops.block_rotated_linear(x, self.rotation_blocks(names[0]).to(x.dtype), base.weight, base.bias)
        if self.kind != "embedding":
            return super().forward_adapters(x, names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            self._prepare(name)
            result = self._rotate(name, result)
        return result

    def forward_reference(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if self.kind != "embedding":
            return super().forward_reference(x, names)
        result = self.base_layer(x)
        for name in names:
            result = result @ self._rotation(name).to(result.dtype)
        return result

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "embedding":
            return AdapterLayer.forward_mixed(self, x, batch, *args, **kwargs)
        return super().forward_mixed(x, batch, *args, **kwargs)


def create_oft_layer(target: nn.Module, adapter_name: str, config: OFTConfig, module_name: str = "",
                     loading: bool = False) -> Optional[OFTLayer]:
    base = innermost_base(target)
    if not isinstance(base, (nn.Linear, nn.Conv2d, nn.Embedding)):
        return None
    if config.fan_in_fan_out:
        raise ValueError(f"fan_in_fan_out=True but {module_name} stores its weight as (out, in); set it to False.")
    layer = OFTLayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


OFT = register_method(
    MethodSpec(
        peft_type=PeftType.OFT.value,
        config_cls=OFTConfig,
        create_layer=create_oft_layer,
        prefix="oft_",
        default_target_modules=DEFAULT_TARGETS,
    )
)
