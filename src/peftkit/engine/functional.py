"""PEFT's functional API: adapter state dicts of a model, injecting adapters without a :class:`PeftModel`, the base
model's own state dict, and the adapter status reports (``get_layer_status`` / ``get_model_status``).

Each function takes a :class:`~peftkit.engine.peft_model.PeftModel` or a plain model that
:func:`inject_adapter_in_model` gave adapters to. Keys follow Hugging Face PEFT: ``base_model.model.<path>`` for a
PeftModel, ``<path>`` for a model with injected adapters.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftConfig
from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.engine.save_load import CHECKPOINT_PREFIX, LoadResult, get_adapter_state_dict, set_adapter_state_dict
from peftkit.engine.targeting import NoMatchingPeftModuleError
from peftkit.integrations.wrappers import clean_key, full_params, unwrap

_ENGINE_ATTR = "_peftkit_engine"  # where inject_adapter_in_model keeps the engine of a bare model (not a submodule)


def _engine_and_prefix(model: nn.Module) -> tuple[Any, str]:
    """The engine (:class:`AdapterModel`) behind ``model`` and the key prefix its checkpoints strip."""
    from peftkit.engine.peft_model import PeftModel
    from peftkit.engine.tuner import AdapterModel

    if isinstance(model, PeftModel):
        return model.base_model, ""
    if isinstance(model, AdapterModel):
        return model, ""
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None and not _holds_adapters(model):
        # DDP, FSDP, torch.compile, DeepSpeed, accelerate: the adapters are on the module the wrapper wraps
        inner, walked = unwrap(model, _holds_adapters)
        if walked:
            return _engine_and_prefix(inner)
    if engine is None:
        raise ValueError(
            f"{type(model).__name__} holds no peftkit adapters; pass a PeftModel (get_peft_model) or a model that "
            "inject_adapter_in_model() gave adapters to."
        )
    return engine, CHECKPOINT_PREFIX


def _holds_adapters(model: nn.Module) -> bool:
    from peftkit.engine.peft_model import PeftModel
    from peftkit.engine.tuner import AdapterModel

    return isinstance(model, (PeftModel, AdapterModel)) or _ENGINE_ATTR in model.__dict__


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """Replace the modules ``peft_config`` targets by adapter layers, in place, and return ``model`` itself (no
    :class:`PeftModel` around it). The base parameters are frozen. Call again with another name to add an adapter of
    the same method. ``state_dict`` (optional, the adapter's tensors keyed as :func:`get_peft_model_state_dict`
    returns them) is loaded into the new adapter."""
    import copy

    from peftkit.engine.peft_model import _adapter_model_for

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peftkit config (e.g. LoraConfig), got {type(peft_config).__name__}.")
    if peft_config.is_prompt_learning:
        raise ValueError("inject_adapter_in_model does not support prompt learning methods; use get_peft_model.")
    peft_config = copy.deepcopy(peft_config)
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None:
        engine = _adapter_model_for(model, peft_config, adapter_name, loading=state_dict is not None)
        object.__setattr__(model, _ENGINE_ATTR, engine)  # plain attribute: not a submodule, not in state_dict
    else:
        engine.inject_adapter(adapter_name, peft_config, loading=state_dict is not None)
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    elif low_cpu_mem_usage:
        # as PEFT: the new adapter's tensors take no memory (meta device) until a state dict is loaded into them
        # with set_peft_model_state_dict(..., low_cpu_mem_usage=True)
        _adapter_to_meta(engine, adapter_name)
    return model


def _adapter_to_meta(engine: Any, adapter_name: str) -> None:
    # the adapter layers' own tensors only: not modules_to_save copies, nor base biases (bias="all")
    wanted = {id(t) for _, layer in engine.adapter_layers() for _, t in layer.adapter_parameters(adapter_name)}
    for module in engine.model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and id(t) in wanted and not t.is_meta:
                    meta = torch.empty_like(t, device="meta")
                    store[name] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


def _assign_into_meta(engine: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """``low_cpu_mem_usage=True`` loading: each adapter tensor still on the meta device is replaced by a tensor of
    the checkpoint's values (on the base model's device, in the tensor's dtype); the rest is copied as usual."""
    from peftkit.engine.save_load import adapter_parameter_map

    prefix = getattr(type(engine), "checkpoint_prefix", CHECKPOINT_PREFIX)
    live = {id(t): k for k, t in adapter_parameter_map(engine, adapter_name).items() if t.is_meta}
    if not live:
        return
    values = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    device = next((p.device for p in engine.model.parameters() if not p.is_meta), torch.device("cpu"))
    for module in engine.model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                key = live.get(id(t)) if t is not None else None
                if key is None or key not in values:
                    continue
                value = values[key]
                if tuple(value.shape) != tuple(t.shape):
                    raise ValueError(f"Checkpoint tensor {key} has shape {tuple(value.shape)}, but the model expects "
                                     f"{tuple(t.shape)}.")
                new = value.detach().to(device=device, dtype=t.dtype, copy=True)
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: Union[str, bool] = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``, keyed as in a PEFT checkpoint (adapter name left out).

    ``state_dict``: take the values from this state dict of ``model`` (same keys as ``model.state_dict()``)
    instead of the live parameters. ``save_embedding_layers=True`` adds the base input/output embedding weights.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    outer = model
    # a wrapper (DDP, FSDP v1, torch.compile, DeepSpeed, accelerate) around the model: its state, under its keys
    model, walked = unwrap(model, _holds_adapters)
    engine, strip = _engine_and_prefix(model)
    if adapter_name not in engine.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; this model has: {', '.join(engine.peft_config)}.")
    with full_params(outer, writeback=False) as gathered:  # FSDP v1: the unsharded tensors, on every rank
        out = get_adapter_state_dict(engine, adapter_name)
        if save_embedding_layers is True:
            from peftkit.engine.save_load import _embedding_base_map

            for key, t in _embedding_base_map(engine).items():
                out.setdefault(CHECKPOINT_PREFIX + key, t.detach())
        if state_dict is not None:
            # the same tensors, read from the given state dict: live tensor -> its key in model.state_dict()
            # (or in the wrapper's: "module.<key>" for DDP, FSDP's keys without its module names)
            if gathered or walked:
                own = {id(t): k for k, t in model.named_parameters(remove_duplicate=False)}
                own.update({id(t): k for k, t in model.named_buffers(remove_duplicate=False)})
            else:
                own = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
            live = _live_by_checkpoint_key(engine, adapter_name)
            lead = "".join(f"{w}." for w in walked)
            for key in list(out):
                name = own.get(id(live.get(key)))
                if name is None:
                    continue
                for candidate in (name, lead + name, clean_key(name), lead + clean_key(name)):
                    if candidate in state_dict:
                        out[key] = state_dict[candidate]
                        break
        if gathered:  # the unsharded storage is freed when FSDP reshards
            out = {k: v.detach().clone() for k, v in out.items()}
    out = {clean_key(k): v for k, v in out.items()}
    if strip:
        out = {(k[len(strip):] if k.startswith(strip) else k): v for k, v in out.items()}
    return out


def _live_by_checkpoint_key(engine: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    from peftkit.engine.save_load import adapter_parameter_map

    return {CHECKPOINT_PREFIX + k: v for k, v in adapter_parameter_map(engine, adapter_name).items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load PEFT-layout adapter tensors into the existing adapter ``adapter_name``; returns the load result
    (``missing_keys``, ``unexpected_keys``). ``model`` may be wrapped (DDP, FSDP v1, torch.compile, DeepSpeed,
    accelerate): the adapter is found inside, and under FSDP each rank keeps its shard of the loaded values."""
    outer = model
    model, _ = unwrap(model, _holds_adapters)
    engine, strip = _engine_and_prefix(model)
    if adapter_name not in engine.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; this model has: {', '.join(engine.peft_config)}.")
    if strip:
        peft_model_state_dict = {
            (k if k.startswith(strip) else strip + k): v for k, v in peft_model_state_dict.items()
        }
    if low_cpu_mem_usage:
        _assign_into_meta(engine, adapter_name, peft_model_state_dict)
    with full_params(outer, writeback=True):
        peft_model_state_dict = _to_wrapped_keys(engine, adapter_name, peft_model_state_dict)
        result = set_adapter_state_dict(engine, peft_model_state_dict, adapter_name,
                                        ignore_mismatched_sizes=ignore_mismatched_sizes)
    result = LoadResult([clean_key(k) for k in result.missing_keys], [clean_key(k) for k in result.unexpected_keys])
    if strip:
        cut = "base_model." + strip
        result = LoadResult([k[len(cut):] if k.startswith(cut) else k for k in result.missing_keys],
                            [k[len(strip):] if k.startswith(strip) else k for k in result.unexpected_keys])
    return result


def _to_wrapped_keys(engine: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys renamed to the model's paths where wrappers inside it (nested FSDP units, activation
    checkpointing) insert module names that checkpoints leave out."""
    from peftkit.engine.save_load import adapter_parameter_map

    renamed = {}
    for raw in adapter_parameter_map(engine, adapter_name):
        if clean_key(raw) != raw:
            renamed[CHECKPOINT_PREFIX + clean_key(raw)] = CHECKPOINT_PREFIX + raw
    if not renamed:
        return state_dict
    return {renamed.get(k, k): v for k, v in state_dict.items()}


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys (as before any adapter was added): adapter tensors and
    modules_to_save copies left out, ``<m>.base_layer.weight`` read as ``<m>.weight``,
    ``<m>.original_module.weight`` as ``<m>.weight``."""
    engine, _ = _engine_and_prefix(model)
    inner = engine.model
    skip: set[int] = set()
    for _, layer in engine.adapter_layers():
        for slot in layer.adapter_slots + layer.aux_slots:
            container = getattr(layer, slot)
            skip.update(id(t) for t in container.state_dict(keep_vars=True).values())
    for _, wrapper in engine.modules_to_save_wrappers():
        skip.update(id(t) for t in wrapper.modules_to_save.state_dict(keep_vars=True).values())
    out: dict[str, torch.Tensor] = {}
    for key, value in inner.state_dict(keep_vars=True).items():
        if id(value) in skip:
            continue
        clean = key.replace(".token_adapter.base_layer.", ".")  # LoRA's trainable_token_indices wrapper
        clean = clean.replace(".base_layer.", ".").replace(".original_module.", ".")
        if clean.startswith("base_layer."):
            clean = clean[len("base_layer."):]
        out[clean] = value.detach()
    return out


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = False) -> LoadResult:
    """Load base-model weights under the base model's own keys (what :func:`get_base_model_state_dict` returns)
    into the wrapped model; adapters are left alone. Returns ``missing_keys`` / ``unexpected_keys``; with
    ``strict=True`` either raises, before anything is copied."""
    engine, _ = _engine_and_prefix(model)
    live = {}
    skip = _adapter_tensor_ids(engine)
    for key, value in engine.model.state_dict(keep_vars=True).items():
        if id(value) not in skip:
            live[_original_key(key)] = value
    missing = sorted(set(live) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(live))
    bad = [k for k in state_dict if k in live and tuple(state_dict[k].shape) != tuple(live[k].shape)]
    if bad:
        raise ValueError(f"Base weight {bad[0]} has shape {tuple(state_dict[bad[0]].shape)}, the model's is "
                         f"{tuple(live[bad[0]].shape)}; nothing was loaded.")
    if strict and (missing or unexpected):
        raise ValueError(f"set_base_model_state_dict(strict=True): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; nothing was loaded.")
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in live:
                live[key].copy_(value.to(device=live[key].device, dtype=live[key].dtype))
    return LoadResult(missing, unexpected)


def _adapter_tensor_ids(engine: Any) -> set[int]:
    skip: set[int] = set()
    for _, layer in engine.adapter_layers():
        for slot in layer.adapter_slots + layer.aux_slots:
            skip.update(id(t) for t in getattr(layer, slot).state_dict(keep_vars=True).values())
    for _, wrapper in engine.modules_to_save_wrappers():
        skip.update(id(t) for t in wrapper.modules_to_save.state_dict(keep_vars=True).values())
    return skip


def _original_key(key: str) -> str:
    clean = key.replace(".token_adapter.base_layer.", ".")  # LoRA's trainable_token_indices wrapper
    clean = clean.replace(".base_layer.", ".").replace(".original_module.", ".")
    for inner in ("base_layer.", "original_module."):
        if clean.startswith(inner):
            clean = clean[len(inner):]
    return clean


# ---------------------------------------------------------------------------------------------- status reports
@dataclass
class TunerLayerStatus:
    """One adapter layer (or modules_to_save wrapper), as PEFT reports it."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    """The whole model's adapter status, as PEFT reports it ("irregular" where layers disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


def _agree(values: list) -> Union[bool, Literal["irregular"]]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_tensors(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    """adapter name -> its trainable tensors in this layer / wrapper."""
    found: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    if isinstance(module, ModulesToSaveWrapper):
        for name, copy_ in module.modules_to_save.items():
            found[name].extend(copy_.parameters())
        return found
    for slot in module.adapter_slots:
        container = getattr(module, slot)
        for name, item in container.items():
            found[name].extend([item] if isinstance(item, nn.Parameter) else list(item.parameters()))
    return found


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """Per adapter layer: name, type, enabled, active / merged / available adapters, requires_grad per adapter
    (True, False or "irregular"), devices per adapter."""
    from peftkit.engine.peft_model import PeftModel

    root = model.base_model if isinstance(model, PeftModel) else model
    status: list[TunerLayerStatus] = []
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            enabled = not module.adapters_disabled
            active, merged = list(module.active_adapters), list(module.merged_adapters)
            available = sorted(module.adapter_configs)
        elif isinstance(module, ModulesToSaveWrapper):
            enabled = not module.adapters_disabled
            active = [module.active_adapter] if module.active_adapter is not None else []
            merged, available = [], sorted(module.modules_to_save)
        else:
            continue
        tensors = _layer_tensors(module)
        prefix = ""
        if isinstance(module, AdapterLayer):
            method = next(iter(module.adapter_configs.values()), None)
            prefix = f"{str(getattr(method, 'peft_type', '')).lower()}." if method is not None else ""
        status.append(TunerLayerStatus(
            name=name,
            module_type=prefix + type(module).__name__,
            enabled=enabled,
            active_adapters=active,
            merged_adapters=merged,
            requires_grad={k: _agree([t.requires_grad for t in v]) for k, v in tensors.items()},
            available_adapters=available,
            devices={k: sorted({t.device.type for t in v}) for k, v in tensors.items()},
        ))
    if not status:
        raise ValueError("No adapter layers found in the model; is it a PeftModel, or a model with injected adapters?")
    return status


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter status of the whole model (see :class:`TunerModelStatus`)."""
    from peftkit.engine.peft_model import PeftModel

    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {k: str(c.peft_type) for k, c in model.peft_config.items()}
        adapter_type = type(model.base_model).__name__
    else:
        base_type = type(model).__name__ if hasattr(model, "config") else "other"
        params = list(model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        engine = model.__dict__.get(_ENGINE_ATTR)
        peft_types = {k: str(c.peft_type) for k, c in engine.peft_config.items()} if engine is not None else {}
        adapter_type = "None"
    layers = get_layer_status(model)
    enabled_set = {s.enabled for s in layers}
    enabled: Union[bool, str] = enabled_set.pop() if len(enabled_set) == 1 else "irregular"
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    actives = {tuple(s.active_adapters) for s in layers}
    active: Union[list[str], str] = list(actives.pop()) if len(actives) == 1 else ("irregular" if actives else [])
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: Union[list[str], str] = sorted(merged_all)
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged_all:
            merged = "irregular"
            break
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set] = collections.defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].update(v)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _agree(v) for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(v) for k, v in devices.items()},
    )


__all__ = [
    "NoMatchingPeftModuleError",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
