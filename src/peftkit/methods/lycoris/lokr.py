"""LoKr: low-rank Kronecker product adapters (Yeh et al., 2023; LyCORIS), and KronA as its full-factor case.

For a frozen weight W (out x in), adapter ``a`` adds ``delta = s * kron(w1, w2)`` with ``s = alpha / r``,
w1 (a, c), w2 (b, d), ``out = a * b`` and ``in = c * d``. The split of each dimension comes from
:func:`~peftkit.methods.lycoris.lycoris_ops.factorization` (``decompose_factor``), exactly as Hugging Face PEFT chooses it.
Each factor is either stored in full (``lokr_w1``, ``lokr_w2``) or as a rank-r pair (``lokr_w1_a @ lokr_w1_b``,
``lokr_w2_a @ lokr_w2_b``): w2 is low-rank when ``r < max(b, d) / 2``, w1 only with ``decompose_both`` and
``r < max(a, c) / 2``. Convolutions put the kernel into w2 (full ``(b, d, k1, k2)``, flattened into the rank-r pair,
or, with ``use_effective_conv2d``, a Tucker core ``lokr_t2 (r, r, k1, k2)`` with mode matrices ``lokr_w2_a (r, b)``,
``lokr_w2_b (r, d)``). Names, shapes, init and scaling follow PEFT, so checkpoints move both ways unchanged.

**KronA** (Edalati et al., 2022; the survey's section 9.3) is ``delta = s * (W_A kron W_B)`` with both factors
full and trained, computed with the Kronecker-vector product ``W_A X W_B^T`` instead of the product itself. That is
LoKr with full factors on both sides: ``decompose_both=False`` (w1 full) and a rank at least ``max(b, d) / 2``
(w2 full). :class:`KronAConfig` is that recipe: it sets ``r`` to a large constant and ``alpha = scale * r`` so that
``alpha / r == scale``; it is saved as a plain ``LOKR`` config that PEFT loads into the same shapes.

Forward paths of a Linear layer (see :meth:`LoKrLayer.forward_path`): ``"bypass"`` reshapes the input to
X (N, c, d) and computes ``w1 X w2^T`` (never building the (out, in) product) whenever that costs fewer
multiply-adds (``c*d*b + a*c*b < in*out``: all but degenerate splits such as a prime dimension); otherwise, or with
``layer.fast_path = False``, ``"reference"`` builds ``kron(w1, w2)`` and multiplies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType
from peftkit.engine.validation import SCALE_LIMIT, ConfigTypeError, Rule
from peftkit.engine.layer import innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.lycoris import lycoris_ops as ops
from peftkit.methods.lycoris.loha import ForwardPaths, LycorisLayerBase, LycorisSharedConfig, _kaiming, is_supported_base
from peftkit.methods.lora.lora import LORA

# KronA's rank: any r >= max(b, d) / 2 makes both Kronecker factors full; this covers factors up to 131072.
KRONA_RANK = 1 << 16


@dataclass
class LoKrConfig(LycorisSharedConfig):
    """Configuration of LoKr adapters (Hugging Face PEFT's ``LoKrConfig`` fields)."""

    decompose_both: bool = field(default=False, metadata={"help": "Also store the left factor w1 as a rank-r pair."})
    decompose_factor: int = field(
        default=-1, metadata={"help": "Size wanted for the first factor of each dimension; -1: near the square root."}
    )
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rescale kept rows by the kept fraction."})
    init_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: w1 (or w1_a) zeros, the rest Kaiming-uniform (identity at start); 'lycoris': w2 (or "
                  "w2_b) zeros instead; False: all random (not identity)."},
    )

    field_rules: ClassVar[dict[str, Rule]] = {"decompose_factor": Rule(min=1, also=(-1,))}
    # No rank bound against the layer: a factor is stored low-rank only when r < half its size, otherwise in
    # full, so no allocation grows with r (and KronA checkpoints carry r = 65536 on purpose).
    rank_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOKR
        super().__post_init__()
        self._validate_shared(type(self).__name__)
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")
        if not isinstance(self.decompose_factor, int) or (self.decompose_factor != -1 and self.decompose_factor <= 0):
            raise ValueError(
                f"LoKrConfig.decompose_factor must be -1 (automatic) or a positive integer, got {self.decompose_factor!r}."
            )


@dataclass
class KronAConfig(LoKrConfig):
    """KronA: ``delta = scale * kron(W_A, W_B)`` with both factors full (see the module docstring).

    ``scale`` replaces ``r`` / ``alpha`` (which are set from it); factor shapes come from ``decompose_factor``.
    Saved as a ``LOKR`` config; ``peft.LoKrConfig`` (and :class:`LoKrConfig`) load it with identical outputs.
    """

    scale: float = field(default=1.0, metadata={"help": "Multiplier of the Kronecker product."})

    # r and alpha are derived from scale (r is a fixed large constant, not a rank of any layer)
    field_rules: ClassVar[dict[str, Rule]] = {"scale": Rule(min=-SCALE_LIMIT, max=SCALE_LIMIT), "alpha": Rule()}
    rank_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConfigTypeError(f"KronAConfig.scale must be a finite number, got {self.scale!r} ({type(self.scale).__name__}).")
        if not math.isfinite(self.scale):
            raise ValueError(f"KronAConfig.scale must be a finite number, got {self.scale!r}.")
        if self.decompose_both:
            raise ValueError("KronA keeps both Kronecker factors full; use LoKrConfig for decompose_both=True.")
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError("KronA has no rank to vary per module; use LoKrConfig for rank_pattern / alpha_pattern.")
        self.r = KRONA_RANK
        self.alpha = float(self.scale) * KRONA_RANK
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("scale", None)  # written as LoKr's r / alpha, so that every LoKr reader understands it
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KronAConfig":
        data = dict(data)
        if "scale" not in data and data.get("r"):
            data["scale"] = float(data.get("alpha", KRONA_RANK)) / float(data["r"])
        return super().from_dict(data)  # type: ignore[return-value]


class LoKrLayer(LycorisLayerBase):
    """LoKr on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (the layer types Hugging Face PEFT supports)."""

    adapter_slots = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for slot in self.adapter_slots:
            setattr(self, slot, nn.ParameterDict())
        self.rank_dropout_scale: dict[str, bool] = {}

    def _rank_dropout_scale(self, adapter_name: str) -> bool:
        return self.rank_dropout_scale[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.rank_dropout_scale.pop(adapter_name, None)

    def factor_shapes(self, decompose_factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, b), (c, d)) with out = a * b, in = c * d."""
        return ops.factorization(self.out_features, decompose_factor), ops.factorization(self.in_features, decompose_factor)

    def update_layer(self, adapter_name: str, config: LoKrConfig, module_name: str = "", loading: bool = False) -> None:
        r = self._set_hyper(adapter_name, config, module_name)
        self.rank_dropout_scale[adapter_name] = bool(config.rank_dropout_scale)
        (a, b), (c, d) = self.factor_shapes(config.decompose_factor)
        k = self.kernel_size
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        tucker = bool(config.use_effective_conv2d) and k is not None and max(k) > 1 and not full_w2
        new = self._new_param
        if full_w1:
            self.lokr_w1[adapter_name] = new(a, c)
        else:
            self.lokr_w1_a[adapter_name], self.lokr_w1_b[adapter_name] = new(a, r), new(r, c)
        if full_w2:
            self.lokr_w2[adapter_name] = new(b, d, *(k or ()))
        elif tucker:
            core = (k[0], k[1]) if len(k) == 2 else (k[0], 1)
            self.lokr_t2[adapter_name] = new(r, r, *core)
            self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name] = new(r, b), new(r, d)
        else:
            flat_d = d * (math.prod(k) if k is not None else 1)
            self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name] = new(b, r), new(r, flat_d)
        if loading:
            return  # a checkpoint overwrites the zeros
        self._init(adapter_name, config.init_weights)

    def _init(self, adapter_name: str, init: Union[bool, str]) -> None:
        # Which tensor stays zero decides that the delta starts at zero: w1's (True) or w2's ('lycoris').
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init]
        with torch.no_grad():
            for slot in self.adapter_slots:
                container = getattr(self, slot)
                if adapter_name in container and slot not in zero:
                    _kaiming(container[adapter_name])

    # ---- the two Kronecker factors
    def _w1(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            w = self.lokr_w1[adapter_name]
            return w if dtype is None else w.to(dtype)
        a, b = self.lokr_w1_a[adapter_name], self.lokr_w1_b[adapter_name]
        return a @ b if dtype is None else a.to(dtype) @ b.to(dtype)

    def _w2(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        if adapter_name in self.lokr_w2:
            return cast(self.lokr_w2[adapter_name])
        a, b = cast(self.lokr_w2_a[adapter_name]), cast(self.lokr_w2_b[adapter_name])
        if adapter_name in self.lokr_t2:
            return ops.tucker_rebuild(cast(self.lokr_t2[adapter_name]), a, b)
        return a @ b

    def _delta_in_dtype(self, adapter_name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        w1, w2 = self._w1(adapter_name, dtype), self._w2(adapter_name, dtype)
        return ops.lokr_delta(w1, w2, self.scaling[adapter_name], self._base_weight_shape())

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta in the base weight's shape (out, in[, k...]), in the adapter's dtype."""
        return self._delta_in_dtype(adapter_name, None)

    def forward_path(self, adapter_name: str) -> str:
        """Which computation the unmerged forward uses: ``"bypass"`` (Kronecker-vector product), ``"reference"``
        (build kron(w1, w2), Linear) or ``"conv-delta"`` (convolutions build the delta kernel)."""
        if self.kernel_size is not None:
            return "conv-delta"
        w1_shape = self._factor_shape(adapter_name, 1)
        w2_shape = self._factor_shape(adapter_name, 2)
        if self.fast_path and ops.lokr_bypass_is_cheaper(w1_shape, w2_shape):
            return "bypass"
        return "reference"

    def _factor_shape(self, adapter_name: str, which: int) -> tuple[int, int]:
        if which == 1:
            if adapter_name in self.lokr_w1:
                return tuple(self.lokr_w1[adapter_name].shape)  # type: ignore[return-value]
            return self.lokr_w1_a[adapter_name].shape[0], self.lokr_w1_b[adapter_name].shape[1]
        if adapter_name in self.lokr_w2:
            return tuple(self.lokr_w2[adapter_name].shape[:2])  # type: ignore[return-value]
        return self.lokr_w2_a[adapter_name].shape[0], self.lokr_w2_b[adapter_name].shape[1]

    @property
    def forward_paths(self) -> "ForwardPaths":
        return ForwardPaths(self)

    def _linear_delta_out(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self._w1(adapter_name), self._w2(adapter_name)
        s = self.scaling[adapter_name]
        if self.forward_path(adapter_name) == "bypass":
            return ops.lokr_linear_bypass(x, w1, w2, s)
        return ops.lokr_linear_reference(x, w1, w2, s)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, paths={self.forward_paths}"


def create_lokr_layer(target: nn.Module, adapter_name: str, config: LoKrConfig, module_name: str = "", loading: bool = False) -> Optional[LoKrLayer]:
    """Wrap ``target`` (Linear / Conv1d / Conv2d) in a LoKr layer; None for other module types (e.g. GPT-2's
    Conv1D, which Hugging Face PEFT's LoKr does not support either)."""
    if not is_supported_base(innermost_base(target)):
        return None
    layer = LoKrLayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


LOKR = register_method(
    MethodSpec(
        peft_type=PeftType.LOKR.value,
        config_cls=LoKrConfig,
        create_layer=create_lokr_layer,
        prefix="lokr_",
        default_target_modules=dict(LORA.default_target_modules),
        supports_quantized_base=True,
    )
)
