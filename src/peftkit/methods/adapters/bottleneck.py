"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) with AdapterHub's config names and semantics.

An adapter is ``A(z) = dropout(up(act(down(z))) * scaling)``, placed at a sub-layer of each block. With ``h`` the
sub-layer's output, ``x`` its residual input and ``LN`` its LayerNorm (post-LN models; none for pre-LN models),
the model goes on with ``LN(h' + x)`` (or ``h' + x``), where

- sequential (``is_parallel=False``): ``z = LN(h + x)`` if ``original_ln_before`` (``h + x`` without LN) else
  ``h``; the adapter's residual ``r = h`` (``residual_before_ln=True``), ``h + x`` (``"post_add"``) or ``z``
  (False); ``h' = A(z) + r`` (``ln_after`` adds a new LayerNorm, before or after ``+ r`` by
  ``adapter_residual_before_ln``).
- parallel (``is_parallel=True``): ``h' = h + A(x)``, the adapter reads the sub-layer's input.

Defaults and presets equal AdapterHub ``adapters`` 1.3. Its default init ``"bert"`` (N(0, 0.02) on both
projections) is *not* the identity; ``init_weights="houlsby"`` is near-identity, ParBn's ``"mam_adapter"``
(zero up-projection) is exactly the identity. Adapters cannot be merged (the non-linearity sits between the
projections).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.registry import MethodSpec, register_config_strings, register_method
from peftkit.engine.sublayer import (CROSS_ADAPTER, MH_ADAPTER, OUTPUT_ADAPTER, BlockPlacement,
                                     SublayerAdapterLayer, find_blocks, placements_for)
from peftkit.engine.tuner import AdapterModel
from peftkit.methods.common import adapter_dtype

PREFIX = "adapters_"
SLOTS = {MH_ADAPTER: "adapters_mh", CROSS_ADAPTER: "adapters_cross", OUTPUT_ADAPTER: "adapters_output"}
INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
# Fields AdapterHub can save that peftkit does not support yet, with the value that means "unused".
_UNSUPPORTED = {"inv_adapter": None, "stochastic_depth": 0.0, "shared_W_phm": False,
                "original_ln_after": True}


@dataclass
class BnConfig(TargetedConfig):
    """A bottleneck adapter (AdapterHub's ``BnConfig``: same fields, same defaults, same meanings).

    ``mh_adapter``, ``output_adapter``, ``reduction_factor`` and ``non_linearity`` must be given (as in AdapterHub);
    the presets :class:`SeqBnConfig`, :class:`DoubleSeqBnConfig`, :class:`ParBnConfig` set them.
    """

    mh_adapter: Optional[bool] = field(default=None, metadata={"help": "Adapter after the (self-)attention block."})
    output_adapter: Optional[bool] = field(default=None, metadata={"help": "Adapter after the feed-forward block."})
    reduction_factor: Optional[Union[float, dict]] = field(
        default=None, metadata={"help": "hidden / bottleneck width; a number or {'<layer>': f, 'default': f}."})
    non_linearity: Optional[str] = field(default=None, metadata={"help": "Activation (relu, swish, gelu, tanh, ...)."})
    original_ln_before: bool = field(default=False, metadata={"help": "Apply the sub-layer's residual (and LayerNorm) before the adapter."})
    original_ln_after: bool = field(default=True, metadata={"help": "Apply the sub-layer's residual (and LayerNorm) after the adapter."})
    ln_before: bool = field(default=False, metadata={"help": "A new LayerNorm before the down-projection."})
    ln_after: bool = field(default=False, metadata={"help": "A new LayerNorm after the up-projection."})
    init_weights: str = field(default="bert", metadata={"help": "bert (N(0,0.02), not identity), mam_adapter (zero up), houlsby (trunc-normal 1e-2)."})
    init_weights_seed: Optional[int] = field(default=None, metadata={"help": "Re-seed before each adapter module's init."})
    is_parallel: bool = field(default=False, metadata={"help": "Parallel adapter: reads the sub-layer input."})
    scaling: Union[float, str] = field(default=1.0, metadata={"help": "A number, 'learned' (one scalar) or 'channel' (one per feature)."})
    use_gating: bool = field(default=False, metadata={"help": "UniPELT gate: A(z) * mean_seq(sigmoid(gate(z)))."})
    residual_before_ln: Union[bool, str] = field(default=True, metadata={"help": "Adapter residual: True (h), 'post_add' (h + x) or False (adapter input)."})
    adapter_residual_before_ln: bool = field(default=False, metadata={"help": "Add the adapter residual before ln_after."})
    inv_adapter: Optional[str] = field(default=None, metadata={"help": "Invertible adapter (not supported yet)."})
    inv_adapter_reduction_factor: Optional[float] = None
    cross_adapter: bool = field(default=False, metadata={"help": "Adapter after cross-attention (encoder-decoder)."})
    leave_out: list[int] = field(default_factory=list, metadata={"help": "Layer indices without adapters."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter output."})
    phm_layer: bool = field(default=False, metadata={"help": "Projections as PHM layers (Compacter)."})
    phm_dim: int = 4
    factorized_phm_W: Optional[bool] = True
    shared_W_phm: Optional[bool] = False
    shared_phm_rule: Optional[bool] = True
    factorized_phm_rule: Optional[bool] = False
    phm_c_init: Optional[str] = "normal"
    phm_init_range: Optional[float] = 0.0001
    learn_phm: Optional[bool] = True
    hypercomplex_nonlinearity: Optional[str] = "glorot-uniform"
    phm_rank: Optional[int] = 1
    phm_bias: Optional[bool] = True
    stochastic_depth: Optional[float] = 0.0
    # peftkit: where the sub-layers are, for architectures without a placement table entry
    block_pattern: Optional[str] = field(default=None, metadata={"help": "Regex of the blocks' full module names."})
    sublayer_modules: Optional[dict] = field(default=None, metadata={"help": "{location: {'h_module', 'x_module', ...}} relative to a block."})
    hidden_size: Optional[int] = field(default=None, metadata={"help": "Model width, when the model has no config.hidden_size."})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOTTLENECK
        super().__post_init__()
        missing = [f for f in _REQUIRED if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs {', '.join(missing)} (as AdapterHub's BnConfig does), or use "
                             "a preset: SeqBnConfig, DoubleSeqBnConfig, ParBnConfig, CompacterConfig.")
        for name, unused in _UNSUPPORTED.items():
            if getattr(self, name) != unused:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is not supported by peftkit yet "
                                 f"(only {unused!r}).")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights={self.init_weights!r}: use one of {', '.join(INIT_WEIGHTS)}.")
        if isinstance(self.scaling, str) and self.scaling not in ("learned", "channel"):
            raise ValueError(f"scaling={self.scaling!r}: use a number, 'learned' or 'channel'.")
        if isinstance(self.scaling, int) and not isinstance(self.scaling, bool):
            self.scaling = float(self.scaling)
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln={self.residual_before_ln!r}: use True, False or 'post_add'.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True.")
        if isinstance(self.reduction_factor, dict):
            self.reduction_factor = {str(k): v for k, v in self.reduction_factor.items()}
        elif not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor={self.reduction_factor!r}: use a positive number or a mapping.")
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter):
            raise ValueError("Set at least one of mh_adapter, output_adapter, cross_adapter to True.")
        self.leave_out = [int(i) for i in (self.leave_out or [])]
        if self.phm_layer:
            if self.hypercomplex_nonlinearity not in ("phm", "glorot-normal", "glorot-uniform", "normal"):
                raise ValueError(f"hypercomplex_nonlinearity={self.hypercomplex_nonlinearity!r} is not one of phm, "
                                 "glorot-normal, glorot-uniform, normal.")
            if self.phm_c_init not in ("normal", "uniform"):
                raise ValueError(f"phm_c_init={self.phm_c_init!r}: use 'normal' or 'uniform'.")
            if self.phm_c_init == "normal" and not (isinstance(self.phm_init_range, (int, float))
                                                    and not isinstance(self.phm_init_range, bool)
                                                    and 0 < self.phm_init_range < float("inf")):
                raise ValueError(f"phm_init_range={self.phm_init_range!r}: phm_c_init='normal' needs a positive std.")

    def locations(self) -> list[str]:
        return [loc for loc, on in ((MH_ADAPTER, self.mh_adapter), (CROSS_ADAPTER, self.cross_adapter),
                                    (OUTPUT_ADAPTER, self.output_adapter)) if on]

    def bottleneck_size(self, hidden: int, layer_idx: Optional[int]) -> int:
        rf = self.reduction_factor
        if isinstance(rf, dict):
            if layer_idx is not None and str(layer_idx) in rf:
                rf = rf[str(layer_idx)]
            elif "default" in rf:
                rf = rf["default"]
            else:
                raise ValueError(f"reduction_factor={rf!r} has no entry for layer {layer_idx} and no 'default'.")
        return max(1, int(hidden // rf))

    def adapterhub_dict(self) -> dict[str, Any]:
        """The ``config`` dict AdapterHub writes for this adapter (its fields only)."""
        from dataclasses import fields

        ours = {f.name for f in fields(TargetedConfig)} | {"block_pattern", "sublayer_modules", "hidden_size"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ours}


@dataclass
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the feed-forward block (AdapterHub's ``SeqBnConfig``)."""

    mh_adapter: Optional[bool] = False
    output_adapter: Optional[bool] = True
    reduction_factor: Optional[Union[float, dict]] = 16
    non_linearity: Optional[str] = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True


@dataclass
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after attention and after the feed-forward block."""

    mh_adapter: Optional[bool] = True
    output_adapter: Optional[bool] = True
    reduction_factor: Optional[Union[float, dict]] = 16
    non_linearity: Optional[str] = "swish"
    original_ln_before: bool = False


@dataclass
class ParBnConfig(BnConfig):
    """He et al. (2021): a parallel adapter beside the feed-forward block, scaled by 4, zero-initialised up."""

    mh_adapter: Optional[bool] = False
    output_adapter: Optional[bool] = True
    reduction_factor: Optional[Union[float, dict]] = 2
    non_linearity: Optional[str] = "relu"
    original_ln_before: bool = False
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: Union[float, str] = 4.0


# ------------------------------------------------------------------------------------------------- the module
def activation(name: str) -> nn.Module:
    key = name.lower()
    table = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
             "gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "leakyrelu": nn.LeakyReLU,
             "linear": nn.Identity, "identity": nn.Identity}
    if key not in table:
        try:
            from transformers.activations import get_activation

            return get_activation(key)
        except Exception:
            raise ValueError(f"non_linearity={name!r} is unknown; use one of {', '.join(table)}.") from None
    return table[key]()


class Bottleneck(nn.Module):
    """One adapter at one sub-layer. Names follow AdapterHub (``adapter_down`` = [LN] + down + act,
    ``adapter_up``, ``adapter_norm_after``, ``scaling``) so its checkpoints map one-to-one."""

    def __init__(self, hidden: int, bottleneck: int, config: BnConfig, shared: Optional[nn.ParameterDict] = None):
        super().__init__()
        self.parallel = config.is_parallel
        self.original_ln_before = config.original_ln_before
        self.residual_before_ln = config.residual_before_ln
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        if config.init_weights_seed is not None:
            torch.manual_seed(config.init_weights_seed)
        down: list[nn.Module] = [nn.LayerNorm(hidden)] if config.ln_before else []
        if config.phm_layer:
            from peftkit.methods.adapters.compacter import PHMLinear

            down.append(PHMLinear(hidden, bottleneck, config, "down", shared))
            up: nn.Module = PHMLinear(bottleneck, hidden, config, "up", shared)
        else:
            down.append(nn.Linear(hidden, bottleneck))
            up = nn.Linear(bottleneck, hidden)
        down.append(activation(config.non_linearity))
        self.adapter_down = nn.Sequential(*down)
        self.adapter_up = up
        if isinstance(config.scaling, str):
            self.scaling = nn.Parameter(torch.ones(1 if config.scaling == "learned" else hidden))
        else:
            self.scaling_value = float(config.scaling)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(config.dropout)
        self._plain = config.dropout == 0 and not isinstance(config.scaling, str) and float(config.scaling) == 1.0
        if config.use_gating:  # UniPELT (AdapterHub): a per-example scalar gate on the adapter's input
            self.gate = nn.Linear(hidden, 1)
        self._init(config)

    @torch.no_grad()
    def _init(self, config: BnConfig) -> None:
        linears = [m for m in list(self.adapter_down) + [self.adapter_up] if isinstance(m, nn.Linear)]
        if config.init_weights == "bert":
            for m in linears:
                m.weight.normal_(0.0, 0.02)
                m.bias.zero_()
        elif config.init_weights == "mam_adapter":
            for m in self.adapter_down:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                    m.bias.zero_()
            if isinstance(self.adapter_up, nn.Linear):
                self.adapter_up.weight.zero_()
                self.adapter_up.bias.zero_()
        else:  # houlsby
            for m in linears:
                nn.init.trunc_normal_(m.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                m.bias.zero_()
        if "gate" in self._modules:  # AdapterHub inits the gate N(0, 0.02), bias 0, whatever init_weights says
            self.gate.weight.normal_(0.0, 0.02)
            self.gate.bias.zero_()

    def scale(self, up: torch.Tensor) -> torch.Tensor:
        s = self.scaling if "scaling" in self._parameters else self.scaling_value
        return up * s

    def adapter(self, z: torch.Tensor) -> torch.Tensor:
        """A(z) without residual: dropout(up(act(down(z))) * scaling)."""
        up = self.adapter_up(self.adapter_down(z))
        if not self._plain:  # scaling 1 and no dropout: skip two no-op kernels
            up = self.dropout(self.scale(up))
        gate = self._modules.get("gate")
        if gate is not None:
            up = up * torch.sigmoid(gate(z)).mean(dim=1, keepdim=True)
        return up

    def forward(self, h: torch.Tensor, x: Optional[torch.Tensor], layer_norm: Optional[nn.Module]) -> torch.Tensor:
        """``h'`` for sub-layer output ``h``, residual input ``x`` and the sub-layer's LayerNorm (or None)."""
        norm_after = self._modules.get("adapter_norm_after")
        if self.parallel:
            if x is None:
                raise ValueError("A parallel adapter needs the sub-layer's input, which was not recorded.")
            out = self.adapter(x)
            if norm_after is not None:
                out = norm_after(out)
            return out + h
        residual = h
        z = h
        if self.original_ln_before and x is not None:
            z = h + x
            if self.residual_before_ln == "post_add":
                residual = z
            if layer_norm is not None:
                z = layer_norm(z)
        if self.residual_before_ln is False:
            residual = z
        out = self.adapter(z)
        if self.adapter_residual_before_ln:
            out = out + residual
        if norm_after is not None:
            out = norm_after(out)
        if not self.adapter_residual_before_ln:
            out = out + residual
        return out


class BottleneckLayer(SublayerAdapterLayer):
    """A block hosting bottleneck adapters at its sub-layers (one container per location)."""

    adapter_slots = tuple(SLOTS.values())

    def __init__(self, base_layer: nn.Module, placement: BlockPlacement) -> None:
        super().__init__(base_layer, placement)
        for slot in SLOTS.values():
            setattr(self, slot, nn.ModuleDict())

    def slot_for(self, location: str) -> str:
        return SLOTS[location]

    def update_layer(self, adapter_name: str, config: BnConfig, module_name: str = "", **_: Any) -> None:
        hidden = config._hidden  # type: ignore[attr-defined]  (set by BottleneckModel._resolve_targets)
        layer_idx = config._layer_index.get(module_name)  # type: ignore[attr-defined]
        available = {p.location for p in self.placement.sublayers}
        ref = next(iter(self.base_layer.parameters()), None)
        for loc in config.locations():
            if loc not in available:
                continue
            module = Bottleneck(hidden, config.bottleneck_size(hidden, layer_idx), config,
                                getattr(config, "_shared", None))
            if ref is not None:  # float32 adapters on a half-precision base (stable optimiser state), as PEFT does
                module.to(device=ref.device, dtype=adapter_dtype(ref) if ref.is_floating_point() else None)
            getattr(self, SLOTS[loc])[adapter_name] = module

    def apply_sublayer(self, adapter_name: str, location: str, h: torch.Tensor, x: Optional[torch.Tensor],
                       layer_norm: Optional[nn.Module]) -> torch.Tensor:
        module = getattr(self, SLOTS[location])[adapter_name]
        dtype = h.dtype
        compute = next(module.parameters()).dtype
        if dtype == compute:
            return module(h, x, layer_norm)
        # a half-precision base with float32 adapters: the adapter math in float32, the result in the base's dtype
        ln = None
        if layer_norm is not None:
            ln_dtype = next(layer_norm.parameters(), h).dtype
            ln = lambda t: layer_norm(t.to(ln_dtype)).to(compute)  # noqa: E731
        return module(h.to(compute), None if x is None else x.to(compute), ln).to(dtype)


def create_bottleneck_layer(target: nn.Module, adapter_name: str, config: BnConfig, module_name: str = "",
                            **kwargs: Any) -> Optional[BottleneckLayer]:
    placement = config._placement_by_block.get(module_name)  # type: ignore[attr-defined]
    if placement is None:
        return None
    layer = BottleneckLayer(target, placement)
    try:
        layer.update_layer(adapter_name, config, module_name=module_name)
    except Exception:
        layer.on_unwrap()  # the layer is never installed: take its hooks off the base modules again
        raise
    return layer


class BottleneckModel(AdapterModel):
    """The engine for bottleneck adapters: finds the blocks from the placement table and keeps Compacter's
    shared parameters (one set per adapter, ``adapters_shared.<adapter>``)."""

    def _resolve_targets(self, config: BnConfig, spec: MethodSpec) -> BnConfig:
        table = placements_for(self.model, config.block_pattern, config.sublayer_modules)
        blocks = find_blocks(self.model, table)
        if not blocks:
            raise ValueError(f"No block of {type(self.model).__name__} matches the placement patterns "
                             f"{[bp.block_pattern for bp in table]}; set block_pattern to a regex of the blocks' names.")
        hidden = config.hidden_size or getattr(getattr(self.model, "config", None), "hidden_size", None)
        if not hidden:
            raise ValueError(f"{type(self.model).__name__} has no config.hidden_size; set BnConfig(hidden_size=...).")
        config._hidden = int(hidden)  # type: ignore[attr-defined]
        config._placement_by_block = dict(blocks)  # type: ignore[attr-defined]
        config._layer_index = {name: i for i, (name, _) in enumerate(blocks)}  # type: ignore[attr-defined]
        config.target_modules = [name for name, _ in blocks
                                 if config._layer_index[name] not in config.leave_out]  # type: ignore[attr-defined]
        if not config.target_modules:
            raise ValueError(f"leave_out={config.leave_out} leaves out every layer; nothing to adapt.")
        return config

    def inject_adapter(self, adapter_name: str, config: BnConfig, loading: bool = False) -> None:
        if "adapters_shared" not in self._modules:
            self.adapters_shared = nn.ModuleDict()
        shared = None
        if config.phm_layer and config.shared_phm_rule:
            from peftkit.methods.adapters.compacter import shared_phm_parameters

            shared = shared_phm_parameters(config)
            config._shared = shared  # type: ignore[attr-defined]
        super().inject_adapter(adapter_name, config, loading=loading)
        if shared is not None:
            ref = next((p for _, layer in self.adapter_layers() for _, p in layer.adapter_parameters(adapter_name)), None)
            if ref is not None:
                shared.to(ref.device)
            self.adapters_shared[adapter_name] = shared
            self.set_adapter(self.active_adapters)

    def _discard_partial_adapter(self, adapter_name: str) -> None:
        for _, layer in list(self.adapter_layers()):
            if not any(n != adapter_name for n in layer.adapter_configs):
                layer.on_unwrap()
        super()._discard_partial_adapter(adapter_name)
        if adapter_name in self.adapters_shared:
            del self.adapters_shared[adapter_name]

    def set_adapter(self, adapter_names: Any, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        for name, params in self.adapters_shared.items():
            cfg = self.peft_config[name]
            on = name in self.active_adapters and not inference_mode and bool(cfg.learn_phm)
            for p in params.values():
                p.requires_grad_(on)
        for _, layer in self.adapter_layers():  # a per-layer PHM rule trains only with learn_phm
            for name in layer.adapter_configs:
                if not self.peft_config[name].learn_phm:
                    for local, p in layer.adapter_parameters(name):
                        if ".phm_rule" in local:
                            p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.adapters_shared:
            del self.adapters_shared[adapter_name]

    def engine_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.adapters_shared:
            return {}
        return {f"base_model.adapters_shared.{k}": p for k, p in self.adapters_shared[adapter_name].items()}

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: Any = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names)  # raises: bottleneck adapters do not merge; nothing changes
        for _, layer in self.adapter_layers():
            layer.on_unwrap()
        return super()._unwrap(merge=False)


BOTTLENECK = register_method(
    MethodSpec(
        peft_type=PeftType.BOTTLENECK.value,
        config_cls=BnConfig,
        create_layer=create_bottleneck_layer,
        prefix=PREFIX,
        model_cls=BottleneckModel,
        supports_merge=False,
    )
)


# ------------------------------------------------------------------------------------- config-string shorthand
def _presets() -> dict[str, type]:
    from peftkit.methods.adapters.compacter import CompacterConfig, CompacterPlusPlusConfig

    return {"seq_bn": SeqBnConfig, "pfeiffer": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig,
            "houlsby": DoubleSeqBnConfig, "par_bn": ParBnConfig, "parallel": ParBnConfig,
            "compacter": CompacterConfig, "compacter++": CompacterPlusPlusConfig}


def _parse_value(text: str) -> Any:
    import json

    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text.strip("'\"")


def config_from_string(text: str) -> BnConfig:
    """``"seq_bn"``, ``"par_bn[reduction_factor=4,scaling=learned]"``: a preset with overrides (AdapterHub's
    config strings). Overrides are ``key=value`` pairs separated by commas; values are numbers, booleans, strings."""
    m = re.fullmatch(r"\s*([A-Za-z_+]+)\s*(?:\[(.*)\])?\s*", text)
    presets = _presets()
    if not m or m.group(1).lower() not in presets:
        raise ValueError(f"Unknown adapter config string {text!r}; use one of {', '.join(presets)}, optionally with "
                         "[key=value,...] overrides, e.g. 'seq_bn[reduction_factor=8]'.")
    cls = presets[m.group(1).lower()]
    kwargs: dict[str, Any] = {}
    body = (m.group(2) or "").strip()
    if body:
        # split on commas that are not inside brackets/braces
        parts, depth, cur = [], 0, ""
        for ch in body:
            depth += ch in "[{("
            depth -= ch in "]})"
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        for part in parts:
            if "=" not in part:
                raise ValueError(f"Config string {text!r}: override {part!r} is not key=value.")
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in names:
                raise ValueError(f"Config string {text!r}: {cls.__name__} has no field {key!r}.")
            kwargs[key] = _parse_value(value)
    return cls(**kwargs)


def register_preset(name: str, config_cls: type) -> MethodSpec:
    """A CLI / bench name (``--method seq_bn``) for a preset config; configs still say peft_type BOTTLENECK, so
    adapters of different presets live side by side in one model."""
    import dataclasses

    return register_method(dataclasses.replace(BOTTLENECK, peft_type=name, config_cls=config_cls))


for _name, _cls in (("SEQ_BN", SeqBnConfig), ("DOUBLE_SEQ_BN", DoubleSeqBnConfig), ("PAR_BN", ParBnConfig)):
    register_preset(_name, _cls)

register_config_strings(["seq_bn", "pfeiffer", "double_seq_bn", "houlsby", "par_bn", "parallel", "compacter",
                         "compacter++"], config_from_string)
