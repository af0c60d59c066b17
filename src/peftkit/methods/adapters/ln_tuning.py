"""LayerNorm tuning: only the normalisation layers' own parameters train (AkbarTajari et al., 2022; Zhao et al.,
2023). The survey finds it "surprisingly competitive" and recommends it as a baseline.

Each adapter is a trainable copy of a targeted norm layer (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, or
any module whose class name says it is a norm layer, such as transformers' ``LlamaRMSNorm`` and ``T5LayerNorm``;
as in PEFT, any other module targeted by name, e.g. a BatchNorm, whose running statistics are saved too);
while the adapter is active the copy runs in place of the original, which stays frozen and untouched. As in
Hugging Face PEFT, the copy's parameters are saved under ``<module>.ln_tuning_layers.<param>`` (full values, not
differences), so checkpoints move between the two libraries unchanged.

Merging writes the adapter's values into the base layer (the originals are kept aside, a few vectors per layer,
and restored bit for bit by unmerge): the merged model is exactly the unmerged one. Only one adapter can be active
(or merged) at a time, since each replaces the layer's parameters; ``adapter_names=`` mixes them per row.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.layer import AdapterLayer, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.tuner import AdapterModel

logger = logging.getLogger(__name__)

# Default targets per transformers model_type: Hugging Face PEFT's choices, plus encoder families PEFT has no
# default for (BERT/RoBERTa-style ``LayerNorm``, ViT's ``layernorm*``), so that ``peftkit train`` works on them.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    # not in PEFT's table:
    "bert": ["LayerNorm"],
    "roberta": ["LayerNorm"],
    "xlm-roberta": ["LayerNorm"],
    "electra": ["LayerNorm"],
    "vit": ["layernorm_before", "layernorm_after", "layernorm"],
}

_NOT_IN_PEFT = ("layers_to_transform", "layers_pattern")


@dataclass
class LNTuningConfig(TargetedConfig):
    """Configuration of LayerNorm tuning; field names follow Hugging Face PEFT's ``LNTuningConfig``
    (``target_modules``, ``exclude_modules``, ``modules_to_save``)."""

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LN_TUNING
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_IN_PEFT:
            if out.get(key) is None:
                out.pop(key, None)
        return out


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm, or a module whose class is named like a norm layer (``LlamaRMSNorm``,
    ``T5LayerNorm``, ...) and holds its own parameters. Batch norm is not counted (it is tuned only when
    targeted by name)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())):
        return True
    name = type(module).__name__.lower()
    return "norm" in name and any(True for _ in module.parameters(recurse=False))


class LNTuningLayer(AdapterLayer):
    """A norm layer with one trainable copy per adapter."""

    adapter_slots = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self._originals: Optional[dict[str, torch.Tensor]] = None  # base values while an adapter is merged

    def update_layer(self, adapter_name: str, config: LNTuningConfig, module_name: str = "", loading: bool = False) -> None:
        tuned = copy.deepcopy(self.base_layer)
        if self._originals is not None:  # the base currently holds a merged adapter's values
            with torch.no_grad():
                for name, p in self._state(tuned).items():
                    p.copy_(self._originals[name])
        self.ln_tuning_layers[adapter_name] = tuned

    def adapter_buffers(self, adapter_name: str):
        """The copy's persistent buffers (a batch norm's running statistics), saved beside its parameters under
        the same keys as PEFT (``<module>.ln_tuning_layers.<name>``)."""
        if adapter_name not in self.ln_tuning_layers:
            return
        tuned = self.ln_tuning_layers[adapter_name]
        params = {n for n, _ in tuned.named_parameters()}
        for name, t in tuned.state_dict(keep_vars=True).items():
            if name not in params:
                yield f"ln_tuning_layers.{adapter_name}.{name}", t

    def _state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return dict(module.state_dict(keep_vars=True))  # parameters and persistent buffers

    def _single(self, names: Sequence[str]) -> str:
        if len(names) > 1:
            raise ValueError(
                f"LN tuning adapters each replace the norm layers' parameters, so only one can be active at a time "
                f"(got {list(names)}); activate one, or use adapter_names= to choose one per row."
            )
        return names[0]

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.ln_tuning_layers[self._single(names)](x, *args, **kwargs)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.ln_tuning_layers[adapter_name](x, *args, **kwargs)

    # ---- merge: the adapter's values go into the base layer; the originals are kept for unmerge
    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        for name in adapter_names:
            if name in self.ln_tuning_layers and name not in self.merged_adapters:
                if not all(torch.isfinite(p).all() for p in self.ln_tuning_layers[name].parameters()):
                    return name
        return None

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.adapter_configs and n not in self.merged_adapters]
        if not names:
            return
        name = self._single(names)
        if self.merged_adapters:
            logger.warning("LN tuning: %s is merged already; unmerging it before merging %s.", self.merged_adapters, name)
            self.unmerge()
        if safe_merge and self.first_nonfinite_merge([name]) is not None:
            raise ValueError(f"Merging adapter {name!r} would put NaN or inf into the base weights; nothing was changed.")
        tuned = self._state(self.ln_tuning_layers[name])
        with torch.no_grad():
            self._originals = {n: p.detach().clone() for n, p in self._state(self.base_layer).items()}
            for n, p in self._state(self.base_layer).items():
                p.copy_(tuned[n])
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            for n, p in self._state(self.base_layer).items():
                p.copy_(self._originals[n])
        self._originals = None
        self.merged_adapters.clear()


def create_ln_tuning_layer(target: nn.Module, adapter_name: str, config: LNTuningConfig, module_name: str = "",
                           loading: bool = False) -> Optional[LNTuningLayer]:
    """Wrap a targeted module that holds parameters. The default targets are the model's norm layers; as in PEFT,
    a module the user targets by name is tuned whatever its type (a Linear, a BatchNorm with its running
    statistics, a block), since each adapter is a trainable copy of it. Modules without parameters: None."""
    base = innermost_base(target)
    if not is_norm_layer(base) and next(base.parameters(), None) is None:
        return None
    layer = LNTuningLayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


class LNTuningModel(AdapterModel):
    """The engine, refusing more than one active LN tuning adapter before anything changes."""

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(
                f"LN tuning adapters each replace the norm layers' parameters, so only one can be active at a time "
                f"(got {names}); activate one, or use adapter_names= to choose one per row."
            )
        super().set_adapter(names, inference_mode=inference_mode)


LN_TUNING = register_method(
    MethodSpec(
        peft_type=PeftType.LN_TUNING.value,
        config_cls=LNTuningConfig,
        create_layer=create_ln_tuning_layer,
        prefix="ln_tuning_",
        model_cls=LNTuningModel,
        default_target_modules=DEFAULT_TARGET_MODULES,
    )
)

__all__ = ["LNTuningConfig", "LNTuningLayer", "LNTuningModel", "is_norm_layer"]
