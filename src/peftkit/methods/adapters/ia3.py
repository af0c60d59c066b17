"""(IA)^3: infused adapters by inhibiting and amplifying inner activations (Liu et al., 2022).

Each targeted layer learns one vector ``l`` per adapter. A feed-forward layer (``feedforward_modules``) scales its
*input*, ``y = W (l * x) + b``; any other layer scales its *output*, ``y = l * (W x + b)``. Both fold into the
weights exactly: input scaling multiplies the columns of W, output scaling its rows and the bias, so a merged
layer costs nothing at inference. Several active adapters multiply (their vectors' product is applied).

Parameter names (``ia3_l``), shapes (Linear / GPT-2 Conv1D: ``(out, 1)``, or ``(1, in)`` for feed-forward layers;
Conv2d: ``(1, C, 1, 1)``, Conv3d: ``(1, C, 1, 1, 1)``), initialisation (ones) and default targets per model type
follow Hugging Face PEFT, so checkpoints move between the two libraries unchanged.

Unmerge divides the merged weights by the vector again (exact up to one rounding of float arithmetic); where a
vector entry is zero, the affected weights are kept aside at merge time and restored bit for bit.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.layer import BASE_ADAPTER, AdapterLayer, MixedBatch, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.tuner import AdapterModel
from peftkit.methods.common import adapter_dtype, conv1d_cls
from peftkit.integrations import quantization as _quant

logger = logging.getLogger(__name__)

# Default (target modules, feed-forward modules) per transformers model_type: the same choices as Hugging Face PEFT
# (keys, values and the second feed-forward projection for most families), so that a config without targets
# adapts the same modules in both libraries.
_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}
DEFAULT_TARGET_MODULES = {k: list(v[0]) for k, v in _DEFAULTS.items()}
DEFAULT_FEEDFORWARD_MODULES = {k: list(v[1]) for k, v in _DEFAULTS.items()}

# Fields of ours that Hugging Face PEFT's IA3Config lacks: left out of adapter_config.json while unused, so that
# PEFT reads our files without warnings.
_NOT_IN_PEFT = ("layers_to_transform", "layers_pattern")


@dataclass
class IA3Config(TargetedConfig):
    """Configuration of (IA)^3 adapters; field names and meanings follow Hugging Face PEFT's ``IA3Config``."""

    feedforward_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Targeted modules whose input (not output) is scaled, as the paper does for the second "
                  "feed-forward projection: names the module names end with, or a regex matched against the full "
                  "name. Must be a subset of target_modules. Default: per model type, as Hugging Face PEFT."},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the layer stores weight as (in, out), like GPT-2's Conv1D (set automatically for "
                  "Conv1D layers, as PEFT does)."},
    )
    init_ia3_weights: bool = field(
        default=True, metadata={"help": "True: vectors start at ones (identity); False: random normal (not identity)."}
    )

    def __post_init__(self) -> None:
        self.peft_type = PeftType.IA3
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}.")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules; {extra} are not targeted. "
                    "Add them to target_modules or remove them from feedforward_modules."
                )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_IN_PEFT:
            if out.get(key) is None:
                out.pop(key, None)
        return out


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """Whether ``module_name`` is one of ``config.feedforward_modules`` (PEFT's rule: a regex must match the whole
    name; a list entry matches a name that ends with it)."""
    ff = config.feedforward_modules
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name.endswith(key) for key in ff)


# ---------------------------------------------------------------------------------------------- the layer
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Merges multiply in float32 at least (half-precision weights are rounded once, at the end)."""
    return torch.promote_types(t.dtype, torch.float32)


class IA3Layer(AdapterLayer):
    """(IA)^3 on ``nn.Linear``, transformers' ``Conv1D`` (GPT-2), ``nn.Conv2d`` or ``nn.Conv3d``."""

    adapter_slots = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        base = self.get_base_layer()
        self.spatial = 0  # spatial dims of a convolution's activations
        if isinstance(base, (nn.Conv2d, nn.Conv3d)):
            self.kind = "conv"
            self.spatial = base.weight.dim() - 2
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif conv1d_cls() and isinstance(base, conv1d_cls()):
            self.kind = "conv1d"  # weight stored as (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            self.kind = "linear"
            self.in_features, self.out_features = base.in_features, base.out_features
        self._merge_backup: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    @property
    def fan_in_fan_out(self) -> bool:
        return self.kind == "conv1d"

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str = "", loading: bool = False) -> None:
        ff = is_feedforward(config, module_name)
        n = self.in_features if ff else self.out_features
        if self.kind == "conv":
            shape: tuple[int, ...] = (1, n) + (1,) * self.spatial
        else:
            shape = (1, n) if ff else (n, 1)
        w = self.get_base_layer().weight
        param = torch.ones(shape, device=w.device, dtype=adapter_dtype(w))
        if not config.init_ia3_weights and not loading:
            param = torch.randn(shape, device=w.device, dtype=torch.float32).to(param.dtype)
        self.ia3_l[adapter_name] = nn.Parameter(param)
        self.is_feedforward[adapter_name] = ff

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.is_feedforward.pop(adapter_name, None)

    # ---- vectors in the shapes they are applied in
    def _act_view(self, v: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """A vector (or ``rows`` x features table) shaped to broadcast over an activation: features last for
        Linear/Conv1D, on dim 1 for convolutions."""
        flat = v.reshape(-1) if rows is None else v.reshape(rows, -1)
        if self.kind == "conv":
            ones = (1,) * self.spatial
            return flat.view(-1, *ones) if rows is None else flat.view(rows, -1, *ones)
        return flat

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The adapter's vector shaped to multiply the base weight elementwise."""
        v = self.ia3_l[adapter_name].reshape(-1)
        base = self.get_base_layer()
        ff = self.is_feedforward[adapter_name]
        if self.kind == "linear":  # weight (out, in)
            return v.view(1, -1) if ff else v.view(-1, 1)
        if self.kind == "conv1d":  # weight (in, out)
            return v.view(-1, 1) if ff else v.view(1, -1)
        extra = (1,) * (base.weight.dim() - 2)
        if not ff:
            return v.view(-1, 1, *extra)
        groups = base.groups
        ipg, opg = base.in_channels // groups, base.out_channels // groups
        return v.view(groups, 1, ipg).expand(groups, opg, ipg).reshape(base.out_channels, ipg, *extra)

    def _scales(self, names: Sequence[str], dtype: torch.dtype) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(input scale, output scale) of the adapters ``names`` together: products of their vectors, or None."""
        s_in = s_out = None
        for n in names:
            v = self._act_view(self.ia3_l[n]).to(dtype)
            if self.is_feedforward[n]:
                s_in = v if s_in is None else s_in * v
            else:
                s_out = v if s_out is None else s_out * v
        return s_in, s_out

    # ---- forward
    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        s_in, s_out = self._scales(names, x.dtype)
        if s_in is not None:
            x = x * s_in
        result = self.base_layer(x, *args, **kwargs)
        if s_out is not None:
            result = result * s_out.to(result.dtype)
        return result

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_adapters(x, [adapter_name], *args, **kwargs)

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``i`` uses adapter ``batch.names[i]``: one pass, each row scaled by its adapter's vector (rows of
        adapters this layer does not hold, or ``__base__``, by ones)."""
        present = [n for n in batch.groups if n != BASE_ADAPTER and n in self.adapter_configs]
        if not present:
            return self.base_layer(x, *args, **kwargs)
        index = batch.index_tensor(present, x.device)
        rows = x.shape[0]

        def table(ff: bool, size: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
            if not any(self.is_feedforward[n] == ff for n in present):
                return None
            ones = torch.ones(size, device=x.device, dtype=dtype)
            vecs = [self.ia3_l[n].reshape(-1).to(dtype) if self.is_feedforward[n] == ff else ones for n in present]
            t = torch.stack(vecs + [ones])[index]  # (rows, size)
            if self.kind == "conv":
                return t.view(rows, size, *([1] * (x.dim() - 2)))
            return t.view(rows, *([1] * (x.dim() - 2)), size)

        s_in = table(True, self.in_features, x.dtype)
        if s_in is not None:
            x = x * s_in
        result = self.base_layer(x, *args, **kwargs)
        s_out = table(False, self.out_features, result.dtype)
        return result if s_out is None else result * s_out

    # ---- merge
    def _merged(self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        scale = self._weight_scale(adapter_name)
        new_w = (weight * scale.to(_compute_dtype(weight))).to(weight.dtype)
        new_b = None
        if bias is not None and not self.is_feedforward[adapter_name]:
            v = self.ia3_l[adapter_name].reshape(-1)
            new_b = (bias * v.to(_compute_dtype(bias))).to(bias.dtype)
        return new_w, new_b

    # a quantised base merges through dequantise-merge-requantise (integrations.quantization.merge_quantized)
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._merged(adapter_name, weight, None)[0]

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return (weight / self._weight_scale(adapter_name).to(_compute_dtype(weight))).to(weight.dtype)

    def _scale_bias(self, adapter_name: str, inverse: bool = False) -> None:
        bias = getattr(self.get_base_layer(), "bias", None)
        if bias is None or self.is_feedforward[adapter_name]:
            return
        v = self.ia3_l[adapter_name].reshape(-1).to(_compute_dtype(bias))
        with torch.no_grad():
            bias.data.copy_((bias.data / v if inverse else bias.data * v).to(bias.dtype))

    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        base = self.get_base_layer()
        weight = _quant.dequantize(base) if _quant.is_quantized(base) else base.weight.data
        bias = base.bias.data if getattr(base, "bias", None) is not None else None
        with torch.no_grad():
            for name in adapter_names:
                if name not in self.adapter_configs or name in self.merged_adapters:
                    continue
                new_w, new_b = self._merged(name, weight, bias)
                weight, bias = new_w, (new_b if new_b is not None else bias)
                if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
                    return name
        return None

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        base = self.get_base_layer()
        for name in names:
            if name not in self.adapter_configs or name in self.merged_adapters:
                continue
            if _quant.is_quantized(base):
                if (self.ia3_l[name] == 0).any():
                    raise ValueError(
                        f"Adapter {name!r} has zero (IA)3 scales: merged into the quantised {type(base).__name__} it "
                        "could not be unmerged (peftkit keeps no full-precision copy of the weight); nothing was changed."
                    )
                _quant.merge_quantized(self, name, safe_merge=safe_merge)
                self._scale_bias(name)
                self.merged_adapters.append(name)
                continue
            bias = base.bias if getattr(base, "bias", None) is not None else None
            with torch.no_grad():
                new_w, new_b = self._merged(name, base.weight.data, bias.data if bias is not None else None)
                if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
                    raise ValueError(
                        f"Merging adapter {name!r} would put NaN or inf into the base weights; nothing was changed."
                    )
                if (self.ia3_l[name] == 0).any():  # division cannot undo a zero: keep the originals
                    self._merge_backup[name] = (base.weight.data.clone(), bias.data.clone() if bias is not None else None)
                base.weight.data.copy_(new_w)
                if new_b is not None:
                    bias.data.copy_(new_b)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if _quant.is_quantized(base):
                _quant.merge_quantized(self, name, unmerge=True)
                self._scale_bias(name, inverse=True)
                continue
            bias = base.bias if getattr(base, "bias", None) is not None else None
            with torch.no_grad():
                backup = self._merge_backup.pop(name, None)
                if backup is not None:
                    base.weight.data.copy_(backup[0])
                    if bias is not None and backup[1] is not None:
                        bias.data.copy_(backup[1])
                    continue
                w = base.weight.data
                scale = self._weight_scale(name).to(_compute_dtype(w))
                w.copy_((w / scale).to(w.dtype))
                if bias is not None and not self.is_feedforward[name]:
                    v = self.ia3_l[name].reshape(-1)
                    v = v.to(_compute_dtype(bias))
                    bias.data.copy_((bias.data / v).to(bias.dtype))

    def extra_repr(self) -> str:
        ff = {n: ("input" if f else "output") for n, f in self.is_feedforward.items()}
        return f"{super().extra_repr()}, scales={ff}"


def create_ia3_layer(target: nn.Module, adapter_name: str, config: IA3Config, module_name: str = "",
                     loading: bool = False) -> Optional[IA3Layer]:
    """Wrap ``target`` (Linear, GPT-2 Conv1D, Conv2d, Conv3d: the layer types Hugging Face PEFT's (IA)^3 supports);
    None for other module types."""
    base = innermost_base(target)
    if isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            logger.warning("fan_in_fan_out=True but %s is an nn.Linear (stored as out x in); using False.", module_name)
            config.fan_in_fan_out = False
    elif conv1d_cls() and isinstance(base, conv1d_cls()):
        if not config.fan_in_fan_out:
            logger.info("%s is a Conv1D (weight stored as in x out); setting fan_in_fan_out=True.", module_name)
            config.fan_in_fan_out = True
    elif not isinstance(base, (nn.Conv2d, nn.Conv3d)):
        return None
    layer = IA3Layer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


class IA3Model(AdapterModel):
    """The engine, with (IA)^3's per-model-type default for ``feedforward_modules`` as well as ``target_modules``."""

    def _resolve_targets(self, config: TargetedConfig, spec: MethodSpec) -> TargetedConfig:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if config.feedforward_modules is None:
            if model_type not in DEFAULT_FEEDFORWARD_MODULES:
                if config.target_modules is None:
                    raise ValueError(
                        f"IA3Config has neither target_modules nor feedforward_modules, and there is no default for "
                        f"model type {model_type!r}; pass target_modules (e.g. the key, value and second feed-forward "
                        "projections) and feedforward_modules (those whose input is scaled, e.g. ['down_proj'])."
                    )
                raise ValueError(
                    f"IA3Config.feedforward_modules is not set and there is no default for model type {model_type!r}; "
                    "pass feedforward_modules (the targeted modules whose input is scaled, e.g. ['down_proj']; [] for "
                    "none)."
                )
            config.feedforward_modules = list(DEFAULT_FEEDFORWARD_MODULES[model_type])
        return super()._resolve_targets(config, spec)


    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Create ``adapter_name`` whose vectors are ``sum_i weights[i] * vector of adapters[i]`` (Hugging Face
        PEFT's ``IA3Model.add_weighted_adapter``): it targets the union of the adapters' modules; a layer that an
        adapter does not adapt contributes nothing from it. The new adapter is not activated."""
        adapters, weights = list(adapters), [float(w) for w in weights]
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"add_weighted_adapter needs one weight per adapter; got {len(adapters)} adapters and "
                             f"{len(weights)} weights.")
        for a in adapters:
            if a not in self.peft_config:
                raise ValueError(f"No adapter named {a!r}; this model has: {', '.join(self.peft_config)}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
        for path, wrapper in self.modules_to_save_wrappers():
            owners = [a for a in adapters if a in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(f"Adapters {owners} each have their own trained copy of {path} (modules_to_save); "
                                 "they cannot be combined.")
        configs = [self.peft_config[a] for a in adapters]

        def union(field_name: str):
            values = [getattr(c, field_name) for c in configs]
            if all(isinstance(v, str) for v in values):
                return "|".join(f"({v})" for v in values)
            if any(isinstance(v, str) for v in values):
                raise ValueError(f"Cannot combine adapters whose {field_name} mix regexes and lists of names.")
            return sorted(set().union(*[set(v or []) for v in values]))

        import dataclasses

        config = dataclasses.replace(configs[0], target_modules=union("target_modules"),
                                     feedforward_modules=union("feedforward_modules"))
        self.inject_adapter(adapter_name, config)
        with torch.no_grad():
            for path, layer in self.adapter_layers():
                if adapter_name not in layer.ia3_l:
                    continue
                new = layer.ia3_l[adapter_name]
                new.zero_()
                for a, w in zip(adapters, weights):
                    if a not in layer.ia3_l:
                        continue
                    if layer.ia3_l[a].shape != new.shape:
                        self.delete_adapter(adapter_name)
                        raise ValueError(
                            f"{path}: adapter {a!r} scales the layer's {'input' if layer.is_feedforward[a] else 'output'}"
                            f" but the combination scales its {'input' if layer.is_feedforward[adapter_name] else 'output'}"
                            "; combine adapters that agree on feedforward_modules."
                        )
                    new.add_(layer.ia3_l[a].to(new.dtype), alpha=w)


IA3 = register_method(
    MethodSpec(
        peft_type=PeftType.IA3.value,
        config_cls=IA3Config,
        create_layer=create_ia3_layer,
        prefix="ia3_",
        model_cls=IA3Model,
        default_target_modules=DEFAULT_TARGET_MODULES,
        supports_quantized_base=True,
    )
)

__all__ = ["IA3Config", "IA3Layer", "IA3Model"]
