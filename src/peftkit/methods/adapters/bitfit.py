"""BitFit: only the bias terms train (Ben-Zaken et al., 2021).

Unlike the usual "unfreeze every bias" recipe, the base model stays intact: adapter ``a`` of a module with bias
``b`` learns a difference ``bitfit_bias`` (zeros at start) and the module computes with ``b + bitfit_bias``. So
adapters are switchable, can be disabled, deleted and saved on their own (``<module>.bitfit_bias``, a few KB), and
merging is an addition to the bias (the original bias is kept aside and restored bit for bit by unmerge).

Targets: every module with a bias (``target_modules=None``, the method's definition) or the named ones. Hugging
Face PEFT has no BitFit, so the checkpoint format (``peft_type: "BITFIT"``) is peftkit's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.layer import BASE_ADAPTER, AdapterLayer, MixedBatch, ModulesToSaveWrapper, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.targeting import ALL_LINEAR, find_targets
from peftkit.engine.tuner import AdapterModel
from peftkit.methods.common import adapter_dtype, conv1d_cls
from peftkit.integrations import quantization as _quant

logger = logging.getLogger(__name__)


@dataclass
class BitFitConfig(TargetedConfig):
    """Configuration of BitFit. ``target_modules=None`` (the default) trains a difference for every bias of the
    model (outside ``modules_to_save``); a list or regex restricts it to those modules."""

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BITFIT
        super().__post_init__()


def own_bias(module: nn.Module) -> Optional[nn.Parameter]:
    """The module's own bias parameter, if it has one."""
    b = module._parameters.get("bias") if hasattr(module, "_parameters") else None
    return b if isinstance(b, nn.Parameter) else None


_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                  nn.modules.instancenorm._InstanceNorm)


class BitFitLayer(AdapterLayer):
    """A module with a bias, and one bias difference per adapter."""

    adapter_slots = ("bitfit_bias",)
    merges_base_weight = False  # merging adds to the bias: a quantised weight is never re-quantised

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        base = self.get_base_layer()
        if _quant.is_quantized(base):
            self.kind = "quantized"  # the quantised kernel computes W x + b; the bias differences are added to it
        elif isinstance(base, nn.Linear):
            self.kind = "linear"
        elif conv1d_cls() and isinstance(base, conv1d_cls()):
            self.kind = "conv1d"
        elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self.kind = "conv"
        elif isinstance(base, nn.LayerNorm):
            self.kind = "layer_norm"
        else:
            self.kind = "generic"  # the bias goes in through torch.func.functional_call
        self._bias_backup: list[torch.Tensor] = []

    @property
    def base_bias(self) -> nn.Parameter:
        return own_bias(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: BitFitConfig, module_name: str = "", loading: bool = False) -> None:
        b = self.base_bias
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(b.shape, device=b.device, dtype=adapter_dtype(b)))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.bitfit_bias[adapter_name]

    # ---- forward: the base module with bias + sum of the active differences (= the merged module, exactly)
    def _forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.kind == "generic" or args or kwargs:
            return torch.func.functional_call(base, {"bias": bias}, (x,) + args, kwargs)
        if self.kind == "linear":
            return F.linear(x, base.weight, bias)
        if self.kind == "conv1d":
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), base.weight)
            return out.view(*x.shape[:-1], base.weight.shape[-1])
        if self.kind == "conv":
            return base._conv_forward(x, base.weight, bias)
        return F.layer_norm(x, base.normalized_shape, base.weight, bias, base.eps)

    def _total_bias(self, names: Sequence[str]) -> torch.Tensor:
        b = self.base_bias
        total = b
        for n in names:
            total = total + self.bitfit_bias[n].to(b.dtype)
        return total

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "quantized":
            out = self.base_layer(x, *args, **kwargs)
            for n in names:
                out = out + self.bitfit_bias[n].to(out.dtype)
            return out
        return self._forward_with_bias(x, self._total_bias(names), *args, **kwargs)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "quantized":
            return result + self.bitfit_bias[adapter_name].to(result.dtype)
        return self._forward_with_bias(x, self._total_bias([adapter_name]), *args, **kwargs)

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``i`` uses adapter ``batch.names[i]``: the base output plus each row's bias difference, in one pass
        (modules of unknown structure: one sub-batch per adapter)."""
        if self.kind == "generic" or args or kwargs:
            return super().forward_mixed(x, batch, *args, **kwargs)
        present = [n for n in batch.groups if n != BASE_ADAPTER and n in self.adapter_configs]
        result = self.base_layer(x)
        if not present:
            return result
        zeros = torch.zeros_like(self.base_bias, dtype=result.dtype)
        table = torch.stack([self.bitfit_bias[n].to(result.dtype) for n in present] + [zeros])
        rows = table[batch.index_tensor(present, x.device)]  # (batch, *bias shape)
        if isinstance(self.get_base_layer(), _CHANNEL_FIRST):
            rows = rows.view(rows.shape[0], -1, *([1] * (result.dim() - 2)))
        else:  # the bias covers the trailing dims (a LayerNorm's normalized_shape may be several)
            bshape = tuple(zeros.shape)
            rows = rows.view(rows.shape[0], *([1] * (result.dim() - 1 - len(bshape))), *bshape)
        return result + rows

    # ---- merge: an addition to the bias; the original is kept so that unmerge restores it exactly
    def _weight_param(self) -> nn.Parameter:
        return self.base_bias

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        b = self.base_bias
        for name in names:
            if name not in self.adapter_configs or name in self.merged_adapters:
                continue
            with torch.no_grad():
                new = b.data + self.bitfit_bias[name].to(b.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(
                        f"Merging adapter {name!r} would put NaN or inf into the base biases; nothing was changed."
                    )
                self._bias_backup.append(b.data.clone())
                b.data.copy_(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        b = self.base_bias
        with torch.no_grad():
            while self.merged_adapters:
                self.merged_adapters.pop()
                b.data.copy_(self._bias_backup.pop())


def create_bitfit_layer(target: nn.Module, adapter_name: str, config: BitFitConfig, module_name: str = "",
                        loading: bool = False) -> Optional[BitFitLayer]:
    """Wrap any module that has its own bias parameter; None for modules without one."""
    if own_bias(innermost_base(target)) is None:
        return None
    layer = BitFitLayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


def _model_label(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__}" + (f" (model type {model_type!r})" if model_type else "")


class BitFitModel(AdapterModel):
    """The engine, with BitFit's targets: every module that has a bias, unless ``target_modules`` names some."""

    def _biased_modules(self) -> list[str]:
        inner = tuple(f"{n}." for n, m in self.model.named_modules()
                      if n and isinstance(m, (AdapterLayer, ModulesToSaveWrapper)))
        out = []
        for name, module in self.model.named_modules():
            if not name or (inner and name.startswith(inner)) or isinstance(module, ModulesToSaveWrapper):
                continue
            base = innermost_base(module) if isinstance(module, AdapterLayer) else module
            if own_bias(base) is not None:
                out.append(name)
        return out

    def _resolve_targets(self, config: TargetedConfig, spec: MethodSpec) -> TargetedConfig:
        if config.target_modules is None:
            saved = list(config.modules_to_save or [])
            names = [n for n in self._biased_modules()
                     if not any(n == m or n.endswith("." + m) or n.startswith(m + ".") or f".{m}." in f".{n}."
                                for m in saved)]
            if not names:
                raise ValueError(
                    f"BitFit trains bias terms, but {_model_label(self.model)} has no bias parameters"
                    + (" outside modules_to_save" if saved else "")
                    + " (Llama- and T5-style models are built without biases). Use a method that does not need "
                    "biases, such as LN tuning (LNTuningConfig) or (IA)^3 (IA3Config)."
                )
            config.target_modules = names
            return config
        config = super()._resolve_targets(config, spec)
        try:
            matched = find_targets(self.model, config)
        except ValueError:
            return config  # the engine raises the same error, with its hints
        with_bias = set(self._biased_modules())
        without = [n for n in matched if n not in with_bias]
        if len(without) == len(matched):
            raise ValueError(
                f"BitFit trains bias terms, but none of the modules target_modules={config.target_modules!r} matched "
                f"in {_model_label(self.model)} has a bias: {', '.join(without[:10])}"
                + (" ..." if len(without) > 10 else "") + ". Target modules with biases, or use another method."
            )
        if without and str(config.target_modules) != ALL_LINEAR:
            logger.warning("BitFit: these targeted modules have no bias and are left alone: %s", ", ".join(without[:10]))
        return config


BITFIT = register_method(
    MethodSpec(
        peft_type=PeftType.BITFIT.value,
        config_cls=BitFitConfig,
        create_layer=create_bitfit_layer,
        prefix="bitfit_",
        model_cls=BitFitModel,
        supports_quantized_base=True,
    )
)

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitModel"]
