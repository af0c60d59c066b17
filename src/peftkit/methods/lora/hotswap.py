"""Hot-swapping a loaded LoRA adapter: replace its weights (and scaling) in place with another checkpoint's.

The adapter's tensors keep their identity, so optimiser references and compiled graphs keep pointing at them. The
new checkpoint must target the same modules with the same ranks; anything else is refused before any weight is
written.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from peftkit.engine.config import PeftConfig

# config fields that change the output beyond the tensors and the scaling: they must agree
_MUST_MATCH = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias")


def hotswap_adapter(model: Any, model_name_or_path: Union[str, os.PathLike], adapter_name: str,
                    torch_device: Optional[str] = None, **kwargs: Any) -> None:
    """Load the LoRA checkpoint at ``model_name_or_path`` into the existing adapter ``adapter_name`` of ``model``
    (a PeftModel), in place. Scalings follow the new config (``lora_alpha``, ``alpha_pattern``)."""
    from peftkit.engine.io import load_tensors, resolve_weights_file

    subfolder = kwargs.pop("subfolder", None)
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder, **kwargs)
    tensors = load_tensors(resolve_weights_file(model_name_or_path, subfolder=subfolder, **kwargs),
                           device=torch_device or "cpu")
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config)


def hotswap_adapter_from_state_dict(model: Any, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig) -> None:
    """:func:`hotswap_adapter` from tensors already in memory (PEFT checkpoint keys, adapter name left out)."""
    from peftkit.engine.save_load import CHECKPOINT_PREFIX, adapter_parameter_map
    from peftkit.methods.lora.lora import LoraLayer, lora_scaling
    from peftkit.methods.common import pattern_value

    engine = getattr(model, "base_model", model)
    if adapter_name not in engine.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r} to hot-swap; this model has: "
                         f"{', '.join(engine.peft_config)}.")
    old = engine.peft_config[adapter_name]
    if str(config.peft_type) != "LORA" or str(old.peft_type) != "LORA":
        raise ValueError(f"hotswap_adapter supports LoRA adapters only (got {config.peft_type} into {old.peft_type}).")
    for key in _MUST_MATCH:
        if getattr(old, key, None) != getattr(config, key, None):
            raise ValueError(f"Cannot hot-swap: the configs differ in {key} ({getattr(old, key, None)!r} vs "
                             f"{getattr(config, key, None)!r}), which changes the computation beyond the weights.")
    layers = [(p, layer) for p, layer in engine.adapter_layers() if adapter_name in layer.adapter_configs]
    if any(adapter_name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before hot-swapping.")
    live = adapter_parameter_map(engine, adapter_name)
    given = {(k[len(CHECKPOINT_PREFIX):] if k.startswith(CHECKPOINT_PREFIX) else k): v for k, v in state_dict.items()}
    missing, extra = sorted(set(live) - set(given)), sorted(set(given) - set(live))
    if missing or extra:
        raise ValueError(
            "Cannot hot-swap: the new adapter does not target the same modules"
            + (f"; not in the new checkpoint: {', '.join(missing[:5])}" if missing else "")
            + (f"; not in the loaded adapter: {', '.join(extra[:5])}" if extra else "")
            + ". Load it with load_adapter() under a new name instead."
        )
    for key, t in live.items():
        if tuple(t.shape) != tuple(given[key].shape):
            raise ValueError(f"Cannot hot-swap {key}: shape {tuple(given[key].shape)} in the new checkpoint, "
                             f"{tuple(t.shape)} loaded (different rank); load it under a new name instead.")
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(given[key].to(device=t.device, dtype=t.dtype))
        for path, layer in layers:
            if isinstance(layer, LoraLayer):
                r = layer.r[adapter_name]
                alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
                layer.lora_alpha[adapter_name] = alpha
                layer.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
    kept = PeftConfig.from_dict({**config.to_dict(), "inference_mode": old.inference_mode})
    engine.peft_config[adapter_name] = kept
    for _, layer in layers:
        layer.adapter_configs[adapter_name] = kept
