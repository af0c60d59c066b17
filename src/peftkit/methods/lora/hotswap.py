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
        new_shape, old_shape = tuple(given[key].shape), tuple(t.shape)
        # a smaller rank fits into a tensor padded by prepare_model_for_compiled_hotswap (the rest stays zero)
        fits = len(new_shape) == len(old_shape) and all(n <= o for n, o in zip(new_shape, old_shape))
        if new_shape != old_shape and not (fits and _is_rank_padded(key, new_shape, old_shape)):
            raise ValueError(f"Cannot hot-swap {key}: shape {new_shape} in the new checkpoint, {old_shape} loaded "
                             "(different rank). Call prepare_model_for_compiled_hotswap(model, target_rank=<the "
                             "largest rank>) after loading the first adapter, or load it under a new name instead.")
    with torch.no_grad():
        for key, t in live.items():
            value = given[key].to(device=t.device, dtype=t.dtype)
            if tuple(value.shape) == tuple(t.shape):
                t.copy_(value)
            else:
                t.zero_()
                t[tuple(slice(0, n) for n in value.shape)].copy_(value)
        for path, layer in layers:
            if isinstance(layer, LoraLayer):
                r = pattern_value(config.rank_pattern, path, config.r)  # the new adapter's own rank
                alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
                layer.lora_alpha[adapter_name] = alpha
                layer.r[adapter_name] = r
                _set_scaling(layer, adapter_name, lora_scaling(alpha, r, config.use_rslora))
    kept = PeftConfig.from_dict({**config.to_dict(), "inference_mode": old.inference_mode})
    engine.peft_config[adapter_name] = kept
    for _, layer in layers:
        layer.adapter_configs[adapter_name] = kept


def _is_rank_padded(key: str, new_shape: tuple, old_shape: tuple) -> bool:
    """Only the rank dimension may differ: rows of an A factor, columns of a B factor."""
    if ".lora_A" in key or ".lora_embedding_A" in key:
        return new_shape[1:] == old_shape[1:]
    if ".lora_B" in key or ".lora_embedding_B" in key:
        return new_shape[0] == old_shape[0] and new_shape[2:] == old_shape[2:]
    return False


def _set_scaling(layer: Any, adapter_name: str, value: float) -> None:
    """A scaling made a tensor by prepare_model_for_compiled_hotswap is updated in place (a compiled graph keeps
    reading it); a float is replaced."""
    current = layer.scaling.get(adapter_name)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        layer.scaling[adapter_name] = value


def _is_compiled(model: Any) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def prepare_model_for_compiled_hotswap(model: Any, *, target_rank: Optional[int] = None, config: Any = None,
                                       check_compiled: str = "error") -> None:
    """Prepare a model with a loaded LoRA adapter for ``torch.compile`` followed by :func:`hotswap_adapter` of
    adapters with other ranks or alphas, without recompilation (Hugging Face PEFT's function of the same name).

    Call it after loading the first adapter and before compiling. Each LoRA layer's scaling becomes a 0-d tensor
    (hot-swapping then updates it in place), and with ``target_rank`` the A and B factors are zero-padded to that
    rank (the output does not change; a later adapter of rank <= target_rank is copied into the padded tensors).
    ``config`` (a LoraConfig or a dict of them, e.g. ``model.peft_config``): their ``r`` and ``rank_pattern`` are
    set to ``target_rank``. ``check_compiled``: what to do if the model is already compiled: "error", "warn" or
    "ignore"."""
    import warnings

    import torch.nn as nn

    from peftkit.methods.lora.lora import ConvNd, Embedding, Linear, LoraLayer

    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.")
    if target_rank is not None and (not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1):
        raise ValueError(f"target_rank must be a positive integer, got {target_rank!r}.")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:  # check every layer before changing any
        for layer in layers:
            for name in layer.lora_A:
                rank = layer.lora_A[name].weight.shape[0]
                if rank > target_rank:
                    raise ValueError(f"target_rank={target_rank} is smaller than the rank {rank} of adapter {name!r} "
                                     "already loaded; pass the largest rank among all adapters to be hot-swapped.")
            if isinstance(layer, ConvNd) and layer.get_base_layer().groups > 1:
                raise ValueError("prepare_model_for_compiled_hotswap cannot pad LoRA on grouped convolutions "
                                 f"(groups={layer.get_base_layer().groups}).")
            if isinstance(layer, Embedding) and len(layer.lora_embedding_A):
                raise ValueError("prepare_model_for_compiled_hotswap pads LoRA on linear and convolution layers only, "
                                 "not on embeddings (as in PEFT).")
    with torch.no_grad():
        for layer in layers:
            device = layer.get_base_layer().weight.device
            for name, value in list(layer.scaling.items()):
                if not isinstance(value, torch.Tensor):
                    layer.scaling[name] = torch.tensor(float(value), device=device)
            if target_rank is None or not isinstance(layer, (Linear, ConvNd)):
                continue
            for name in list(layer.lora_A):
                a, b = layer.lora_A[name], layer.lora_B[name]
                rank = a.weight.shape[0]
                if rank == target_rank:
                    continue
                new_a = nn.Parameter(a.weight.new_zeros((target_rank,) + tuple(a.weight.shape[1:])),
                                     requires_grad=a.weight.requires_grad)
                new_a[:rank] = a.weight
                new_b = nn.Parameter(b.weight.new_zeros((b.weight.shape[0], target_rank) + tuple(b.weight.shape[2:])),
                                     requires_grad=b.weight.requires_grad)
                new_b[:, :rank] = b.weight
                a.weight, b.weight = new_a, new_b
                if isinstance(a, nn.Linear):
                    a.out_features, b.in_features = target_rank, target_rank
                else:
                    a.out_channels, b.in_channels = target_rank, target_rank
    if not config or target_rank is None:
        return
    configs = config.values() if isinstance(config, dict) else [config]
    for c in configs:
        c.r = target_rank
        if c.rank_pattern:
            c.rank_pattern = {k: target_rank for k in c.rank_pattern}
