"""LoHa: low-rank Hadamard product adapters (FedPara, Hyeon-Woo et al., 2021; LyCORIS).

For a frozen weight W (out x in), adapter ``a`` adds ``delta = s * (w1_a @ w1_b) * (w2_a @ w2_b)`` with
w1_a, w2_a (out, r), w1_b, w2_b (r, in) and ``s = alpha / r``. The Hadamard product of two rank-r matrices has
rank up to r^2 with the parameter count of a rank-2r LoRA. Convolutions flatten the kernel into ``in`` or, with
``use_effective_conv2d``, rebuild each operand from a Tucker core ``hada_t* (r, r, k1, k2)`` and mode matrices
``hada_w*_a (r, out)``, ``hada_w*_b (r, in)``. Parameter names, shapes, init and scaling follow Hugging Face PEFT,
so checkpoints move between the two libraries unchanged.

Forward paths of a Linear layer (see :meth:`LoHaLayer.forward_path`; ``layer.forward_paths`` shows them all):

- ``"merged"``: the base product and every such adapter in ONE matmul with ``W + sum delta``, in a custom autograd
  function that rebuilds the merged weight in backward. Against a separate delta branch this saves one forward
  and one input-gradient (out, in) product per step, and nothing of size (out, in) is kept for backward.
- ``"factored"``: ``(x Q^T) P^T`` with the rank-r^2 Khatri-Rao factors P, Q, chosen when three rank-r^2 passes
  cost less than one (out, in) product, ``3 r^2 (in + out) < in * out`` (large layers): the delta is never built.
- ``"recompute"``: a separate delta branch whose delta is rebuilt in backward rather than kept; used instead of
  ``"merged"`` while rank dropout is active in training, or when the base layer is itself wrapped.
- ``"reference"``: plain autograd through the delta (set ``layer.fast_path = False``); used by tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.layer import AdapterLayer, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.lycoris import lycoris_ops as ops
from peftkit.methods.common import adapter_dtype, pattern_value
from peftkit.methods.lora.lora import LORA
from peftkit.integrations import quantization as _quant


@dataclass
class LycorisSharedConfig(TargetedConfig):
    """Fields LoHa and LoKr share; names and meanings follow Hugging Face PEFT."""

    r: int = field(default=8, metadata={"help": "Rank of each low-rank factor."})
    alpha: float = field(default=8, metadata={"help": "Scaling numerator: scaling = alpha / r."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "In training, drop each output row of the delta with this probability."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "In training, skip the whole adapter of a layer with this probability."}
    )
    use_effective_conv2d: bool = field(
        default=False,
        metadata={"help": "Convolutions with kernel > 1: Tucker (CP) decomposition of the kernel ('Proposition 3' "
                  "of FedPara) instead of flattening it into the input dimension."},
    )
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank, keys are regexes."})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Per-module alpha, keys are regexes."})

    # Checked by peftkit.engine.validation before the model is touched (types come from the annotations).
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": Rule(min=1),
        "alpha": Rule(),  # finite; bounded relative to r in _validate_shared (KronA writes alpha = scale * 2**16)
        "rank_dropout": Rule(min=0.0, max=1.0, max_open=True),
        "module_dropout": Rule(min=0.0, max=1.0),
        "rank_pattern": Rule(regex_keys=True, each=Rule(min=1)),
        "alpha_pattern": Rule(regex_keys=True, each=Rule(min=-SCALE_LIMIT, max=SCALE_LIMIT)),
    }
    rank_fields: ClassVar[tuple[str, ...]] = ("r",)

    def _validate_shared(self, name: str) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"{name}.r must be a positive integer, got {self.r!r}.")
        for key, value in (self.rank_pattern or {}).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}.")
        if abs(self.alpha) / self.r > SCALE_LIMIT:
            raise ValueError(
                f"{name}.alpha={self.alpha!r} gives a scaling alpha / r = {self.alpha / self.r:g}; its magnitude must be "
                f"at most {SCALE_LIMIT:g} (larger ones overflow the adapter's output)."
            )
        if not 0.0 <= float(self.rank_dropout) < 1.0:
            raise ValueError(f"{name}.rank_dropout must be in [0, 1), got {self.rank_dropout!r}.")
        if not 0.0 <= float(self.module_dropout) <= 1.0:
            raise ValueError(f"{name}.module_dropout must be in [0, 1], got {self.module_dropout!r}.")


@dataclass
class LoHaConfig(LycorisSharedConfig):
    """Configuration of LoHa adapters (Hugging Face PEFT's ``LoHaConfig`` fields)."""

    init_weights: bool = field(
        default=True,
        metadata={"help": "True: hada_w2_b zeros, the rest Kaiming-uniform (identity at start); False: all random."},
    )

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOHA
        super().__post_init__()
        self._validate_shared("LoHaConfig")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}.")


# ---------------------------------------------------------------------------------------------- the layer
def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def conv_kernel(base: nn.Module) -> Optional[tuple[int, ...]]:
    """Kernel size of a Conv1d/Conv2d base layer, None for Linear."""
    return tuple(base.kernel_size) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else None


class ForwardPaths(Mapping):
    """``layer.forward_paths``: adapter name -> the forward path it takes now; a live view of the layer (deleted
    adapters leave it, the paths follow the layer's mode)."""

    def __init__(self, layer: "LycorisLayerBase") -> None:
        self._layer = layer

    def __getitem__(self, name: str) -> str:
        if name not in self._layer.adapter_configs:
            raise KeyError(name)
        return self._layer.forward_path(name)

    def __iter__(self):
        return iter(list(self._layer.adapter_configs))

    def __len__(self) -> int:
        return len(self._layer.adapter_configs)

    def __repr__(self) -> str:
        return repr(dict(self))


class LycorisLayerBase(AdapterLayer):
    """State LoHa and LoKr layers share: per-adapter rank, alpha, scaling and the two dropouts."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.in_features, self.out_features = base.in_channels // base.groups, base.out_channels
        self.kernel_size = conv_kernel(base)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.fast_path: bool = True  # False: every forward uses the plain reference math (for tests)

    def _base_weight_shape(self) -> torch.Size:
        """The base weight's logical shape (a quantised linear's (out, in), not its packed storage)."""
        return _quant.weight_shape(self.get_base_layer())

    def _set_hyper(self, adapter_name: str, config: LycorisSharedConfig, module_name: str) -> int:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = float(config.rank_dropout)
        self.module_dropout[adapter_name] = float(config.module_dropout)
        return r

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout):
            d.pop(adapter_name, None)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply the adapter's effect by ``scale`` relative to alpha / r."""
        if adapter_name in self.scaling:
            self.scaling[adapter_name] = scale * self.alpha[adapter_name] / self.r[adapter_name]

    def _new_param(self, *shape: int) -> nn.Parameter:
        w = self.get_base_layer().weight
        return nn.Parameter(torch.zeros(*shape, device=w.device, dtype=adapter_dtype(w)))

    # ---- forward pieces shared by both methods
    def _skip_module(self, adapter_name: str) -> bool:
        """Module dropout: in training the adapter is left out of this call with probability module_dropout."""
        p = self.module_dropout[adapter_name]
        return self.training and p > 0 and torch.rand(1).item() <= p

    def _rank_dropout_scale(self, adapter_name: str) -> bool:
        raise NotImplementedError  # pragma: no cover - abstract

    def _apply_rank_dropout(self, adapter_name: str, delta_out: torch.Tensor) -> torch.Tensor:
        """Drop output rows of the delta: the same as masking the rows of the delta weight, applied to its output."""
        p = self.rank_dropout[adapter_name]
        if not (self.training and p > 0):
            return delta_out
        mask = ops.row_dropout_mask(self.out_features, p, self._rank_dropout_scale(adapter_name), delta_out.device,
                                    delta_out.dtype)
        if self.kernel_size is None:
            return delta_out * mask
        return delta_out * mask.view((-1,) + (1,) * (delta_out.dim() - 2))

    def _conv_delta_out(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.get_base_layer()._conv_forward(x, delta.to(x.dtype), None)

    def _linear_delta_out(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _delta_out(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output (rank dropout applied), in the result's dtype."""
        if self.kernel_size is None:
            delta_out = self._linear_delta_out(adapter_name, x)
        else:
            delta_out = self._conv_delta_out(x, self._delta_in_dtype(adapter_name, x.dtype))
        return self._apply_rank_dropout(adapter_name, delta_out).to(result.dtype)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._skip_module(adapter_name):
            return result
        return result + self._delta_out(adapter_name, x, result)

    def _delta_in_dtype(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract


class LoHaLayer(LycorisLayerBase):
    """LoHa on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (the layer types Hugging Face PEFT supports)."""

    adapter_slots = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for slot in self.adapter_slots:
            setattr(self, slot, nn.ParameterDict())

    def _rank_dropout_scale(self, adapter_name: str) -> bool:
        return True  # LoHa always rescales the kept rows (as PEFT and LyCORIS do)

    def update_layer(self, adapter_name: str, config: LoHaConfig, module_name: str = "", loading: bool = False) -> None:
        r = self._set_hyper(adapter_name, config, module_name)
        out_f, in_f, k = self.out_features, self.in_features, self.kernel_size
        # A kernel of size 1 is a pointwise product: the flat form is exact and cheaper than Tucker.
        tucker = bool(config.use_effective_conv2d) and k is not None and math.prod(k) > 1
        if tucker:
            core = (k[0], k[1]) if len(k) == 2 else (k[0], 1)
            self.hada_t1[adapter_name] = self._new_param(r, r, *core)
            self.hada_t2[adapter_name] = self._new_param(r, r, *core)
            shapes = ((r, out_f), (r, in_f))
        else:
            flat_in = in_f * (math.prod(k) if k is not None else 1)
            shapes = ((out_f, r), (r, flat_in))
        self.hada_w1_a[adapter_name] = self._new_param(*shapes[0])
        self.hada_w1_b[adapter_name] = self._new_param(*shapes[1])
        self.hada_w2_a[adapter_name] = self._new_param(*shapes[0])
        self.hada_w2_b[adapter_name] = self._new_param(*shapes[1])
        if loading:
            return  # a checkpoint overwrites the zeros
        with torch.no_grad():
            for slot in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_t1", "hada_t2"):
                if adapter_name in getattr(self, slot):
                    _kaiming(getattr(self, slot)[adapter_name])
            if not config.init_weights:  # otherwise w2_b stays zero: the delta starts at exactly zero
                _kaiming(self.hada_w2_b[adapter_name])

    def _factors(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
        slots = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        ts = [getattr(self, s)[adapter_name] for s in slots]
        return tuple(t if dtype is None else t.to(dtype) for t in ts)

    def _delta_in_dtype(self, adapter_name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self._factors(adapter_name, dtype)
        s = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            t1, t2 = self.hada_t1[adapter_name], self.hada_t2[adapter_name]
            if dtype is not None:
                t1, t2 = t1.to(dtype), t2.to(dtype)
            delta = ops.loha_delta_tucker(t1, w1a, w1b, t2, w2a, w2b, s)
        else:
            delta = ops.loha_delta(w1a, w1b, w2a, w2b, s)
        return delta.reshape(self._base_weight_shape())

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta in the base weight's shape (out, in[, k...]), in the adapter's dtype."""
        return self._delta_in_dtype(adapter_name, None)

    def forward_path(self, adapter_name: str) -> str:
        """Which computation the unmerged forward uses for this adapter: ``"merged"``, ``"factored"``,
        ``"recompute"`` or ``"reference"`` (Linear; see the module docstring), ``"conv-delta"`` (convolutions
        build the delta kernel)."""
        if self.kernel_size is not None:
            return "conv-delta"
        if not self.fast_path:
            return "reference"
        if not ops.loha_merged_is_cheaper(self.r[adapter_name], self.in_features, self.out_features):
            return "factored"
        if isinstance(self.base_layer, AdapterLayer) or (self.training and self.rank_dropout[adapter_name] > 0):
            return "recompute"
        if _quant.is_quantized(self.get_base_layer()):  # the quantised kernel computes the base output
            return "recompute"
        return "merged"

    @property
    def forward_paths(self) -> "ForwardPaths":
        return ForwardPaths(self)

    def _linear_delta_out(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        factors = self._factors(adapter_name)
        s = self.scaling[adapter_name]
        path = self.forward_path(adapter_name)
        if path == "factored":
            return ops.loha_linear_factored(x, *factors, s)
        if path in ("recompute", "merged"):
            return ops.loha_linear_recompute(x, *factors, s)
        return ops.loha_linear_reference(x, *factors, s)

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kernel_size is not None or args or kwargs:
            return super().forward_adapters(x, names, *args, **kwargs)
        names = [n for n in names if not self._skip_module(n)]
        merged = [n for n in names if self.forward_path(n) == "merged"]
        if merged:
            base = self.get_base_layer()
            adapters = [(*self._factors(n), self.scaling[n]) for n in merged]
            result = ops.loha_merged_linear(x, base.weight, base.bias, adapters)
        else:
            result = _quant.base_forward(self.base_layer, x)  # = base_layer(x); a 4-bit base: chunked
        for n in names:
            if n not in merged:
                result = result + self._delta_out(n, x, result)
        return result

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, paths={self.forward_paths}"


def is_supported_base(base: nn.Module) -> bool:
    return isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d))


def create_loha_layer(target: nn.Module, adapter_name: str, config: LoHaConfig, module_name: str = "", loading: bool = False) -> Optional[LoHaLayer]:
    """Wrap ``target`` (Linear / Conv1d / Conv2d) in a LoHa layer; None for other module types (e.g. GPT-2's
    Conv1D, which Hugging Face PEFT's LoHa does not support either)."""
    if not is_supported_base(innermost_base(target)):
        return None
    layer = LoHaLayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


LOHA = register_method(
    MethodSpec(
        peft_type=PeftType.LOHA.value,
        config_cls=LoHaConfig,
        create_layer=create_loha_layer,
        prefix="hada_",
        default_target_modules=dict(LORA.default_target_modules),
        supports_quantized_base=True,
    )
)
