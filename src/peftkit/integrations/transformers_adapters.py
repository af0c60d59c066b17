"""transformers' adapter API (``PreTrainedModel.add_adapter``, ``load_adapter``, ``set_adapter``, ...) with peftkit.

sentence-transformers' ``model.add_adapter/load_adapter/...`` call these methods of the underlying transformers
model, which hand over to Hugging Face PEFT (``inject_adapter_in_model``) and check
``isinstance(config, peft.PeftConfig)``. Once transformers' ``integrations.peft`` module is imported, each method is
wrapped: it runs on peftkit when

* ``add_adapter`` gets a peftkit config, or ``load_adapter`` gets ``peft_config=`` a peftkit config;
* the model already holds peftkit adapters (added or loaded this way);
* ``load_adapter`` is called and ``peft`` is not installed (a PEFT-format folder loads with peftkit);

and otherwise calls transformers' own method unchanged. The model keeps its class: its adapters live in its
modules (as with PEFT) and are managed by a peftkit engine kept in ``model.__dict__['_peftkit_engine']``;
``model.peft_config`` and ``model._hf_peft_config_loaded`` are set as transformers sets them, so
``model.save_pretrained(path)`` writes the adapter in the PEFT format.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from typing import Any, Optional

from peftkit.integrations._hooks import when_imported

ENGINE_KEY = "_peftkit_engine"
_WRAPPED = "_peftkit_wrapped"


def engine_of(model: Any) -> Any:
    return getattr(model, "__dict__", {}).get(ENGINE_KEY)


def _is_ours(config: Any) -> bool:
    from peftkit.engine.config import PeftConfig

    return isinstance(config, PeftConfig)


def _peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def _attach(model: Any, config: Any, adapter_name: str, loading: bool) -> Any:
    from peftkit.engine.peft_model import _adapter_model_for

    engine = engine_of(model)
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
    if engine is None:
        engine = _adapter_model_for(model, config, adapter_name, loading)
        model.__dict__[ENGINE_KEY] = engine  # not a registered submodule: the engine holds the model itself
    else:
        engine.inject_adapter(adapter_name, config, loading=loading)
    model.peft_config = engine.peft_config
    model._hf_peft_config_loaded = True
    return engine


def _detach_if_empty(model: Any) -> None:
    engine = engine_of(model)
    if engine is not None and not engine.peft_config:
        engine.unload()
        del model.__dict__[ENGINE_KEY]
        model.__dict__.pop("peft_config", None)
        model._hf_peft_config_loaded = False


def add_adapter(model: Any, adapter_config: Any, adapter_name: Optional[str] = None) -> None:
    name = adapter_name or "default"
    if not _is_ours(adapter_config):
        raise TypeError(
            f"This model holds peftkit adapters; add_adapter needs a peftkit config (e.g. peftkit.LoraConfig), got "
            f"{type(adapter_config).__name__}."
        )
    engine = _attach(model, adapter_config, name, loading=False)
    engine.set_adapter(name)  # transformers activates the added adapter


def load_adapter(model: Any, peft_model_id: Optional[str] = None, adapter_name: Optional[str] = None,
                 peft_config: Any = None, adapter_state_dict: Optional[dict] = None, is_trainable: bool = False,
                 adapter_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
    from peftkit.engine.config import PeftConfig
    from peftkit.engine.io import load_tensors, resolve_weights_file
    from peftkit.engine.save_load import set_adapter_state_dict

    name = adapter_name or "default"
    hub = {k: v for k, v in {**kwargs, **(adapter_kwargs or {})}.items()
           if k in ("revision", "token", "cache_dir", "force_download", "local_files_only", "subfolder")}
    subfolder = hub.pop("subfolder", None)
    if isinstance(peft_config, dict):
        peft_config = PeftConfig.from_dict(peft_config)
    if peft_config is None:
        if peft_model_id is None:
            raise ValueError("load_adapter needs a folder or hub id (peft_model_id), or peft_config= and "
                             "adapter_state_dict=.")
        peft_config = PeftConfig.from_pretrained(peft_model_id, subfolder=subfolder, **hub)
    else:
        peft_config = copy.deepcopy(peft_config)
    if adapter_state_dict is None:
        if peft_model_id is None:
            raise ValueError("load_adapter got peft_config= but no weights: pass adapter_state_dict= or a folder.")
        adapter_state_dict = load_tensors(resolve_weights_file(peft_model_id, subfolder=subfolder, **hub))
    engine = engine_of(model)
    if engine is not None and name in engine.peft_config:
        raise ValueError(f"Adapter with name {name} already exists. Please use a different name.")
    peft_config.inference_mode = not is_trainable
    fresh = engine is None
    engine = _attach(model, peft_config, name, loading=True)
    try:
        set_adapter_state_dict(engine, adapter_state_dict, name)
    except Exception:
        engine._discard_partial_adapter(name)  # the model is left as it was
        if fresh:
            del model.__dict__[ENGINE_KEY]
            model.__dict__.pop("peft_config", None)
            model._hf_peft_config_loaded = False
        raise
    engine.set_adapter(name)  # transformers (through PEFT's injection) activates the loaded adapter
    if not is_trainable:
        model.eval()
        for _, layer in engine.adapter_layers():
            for _, p in layer.adapter_parameters(name):
                p.requires_grad_(False)


def set_adapter(model: Any, adapter_name: Any) -> None:
    engine_of(model).set_adapter(adapter_name)


def disable_adapters(model: Any) -> None:
    engine_of(model).enable_adapter_layers(False)


def enable_adapters(model: Any) -> None:
    engine_of(model).enable_adapter_layers(True)


def active_adapters(model: Any) -> list:
    return list(engine_of(model).active_adapters)


def active_adapter(model: Any) -> str:
    return engine_of(model).active_adapters[0]


def get_adapter_state_dict(model: Any, adapter_name: Optional[str] = None, state_dict: Optional[dict] = None) -> dict:
    """Keys relative to the model, as transformers returns them (``save_pretrained`` adds ``base_model.model.``)."""
    from peftkit.engine.save_load import CHECKPOINT_PREFIX, get_adapter_state_dict as _get

    engine = engine_of(model)
    name = adapter_name or engine.active_adapters[0]
    return {k[len(CHECKPOINT_PREFIX):] if k.startswith(CHECKPOINT_PREFIX) else k: v for k, v in _get(engine, name).items()}


def delete_adapter(model: Any, adapter_names: Any) -> None:
    engine = engine_of(model)
    for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
        engine.delete_adapter(name)
    _detach_if_empty(model)


_OURS = {
    "add_adapter": add_adapter, "load_adapter": load_adapter, "set_adapter": set_adapter,
    "disable_adapters": disable_adapters, "enable_adapters": enable_adapters, "active_adapters": active_adapters,
    "active_adapter": active_adapter, "get_adapter_state_dict": get_adapter_state_dict,
    "delete_adapter": delete_adapter,
}


def _use_peftkit(method: str, model: Any, args: tuple, kwargs: dict) -> bool:
    if engine_of(model) is not None:
        return True
    if method == "add_adapter":
        config = args[0] if args else kwargs.get("adapter_config")
        return _is_ours(config)
    if method == "load_adapter":
        return _is_ours(kwargs.get("peft_config")) or not _peft_installed()
    return False


def _wrap(name: str, original: Any) -> Any:
    ours = _OURS[name]

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _use_peftkit(name, self, args, kwargs):
            return ours(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    setattr(method, _WRAPPED, True)
    return method


def _patch(module: Any) -> None:
    mixin = getattr(module, "PeftAdapterMixin", None)
    if mixin is None:
        return
    for name in _OURS:
        original = mixin.__dict__.get(name)
        if original is None or getattr(original, _WRAPPED, False):
            continue
        setattr(mixin, name, _wrap(name, original))


def install() -> None:
    when_imported("transformers.integrations.peft", _patch)
