"""Hugging Face PEFT's ``peft.tuners.tuners_utils`` names, as peftkit's own objects.

Clients written for PEFT import from here: transformers' PEFT integration checks
``isinstance(module, BaseTunerLayer)`` to find adapter layers, and many scripts walk a model with
``_get_submodules``. ``BaseTunerLayer`` *is* peftkit's :class:`~peftkit.engine.layer.AdapterLayer` (the base of
every adapter layer, so ``isinstance`` is true for each of them), ``BaseTuner`` is the engine
:class:`~peftkit.engine.tuner.AdapterModel` (``PeftModel.base_model``).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from peftkit.engine.layer import AdapterLayer as BaseTunerLayer
from peftkit.engine.targeting import _in_modules_to_save, _matches, layer_index
from peftkit.engine.tuner import AdapterModel as BaseTuner


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, target, target_name)`` for the module named ``key`` in ``model`` (``parent.<target_name>`` is
    ``target``); ``key=""`` gives ``(model, model, "")``. Raises AttributeError naming the missing part."""
    parent = model.get_submodule(".".join(key.split(".")[:-1]))
    target_name = key.split(".")[-1]
    target = model.get_submodule(key)
    return parent, target, target_name


def check_target_module_exists(config: Any, key: str) -> bool:
    """Whether the module named ``key`` is one that ``config`` targets (``target_modules`` as a list of name
    suffixes or a regex matching the whole name, minus ``exclude_modules`` and ``modules_to_save``, restricted by
    ``layers_to_transform``
    / ``layers_pattern``), as peftkit decides it when injecting adapters."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches(exclude, key):
        return False
    if _in_modules_to_save(key, getattr(config, "modules_to_save", None)):
        return False  # a module copied for training never also gets an adapter
    target = getattr(config, "target_modules", None)
    if target is None:
        raise ValueError(f"{type(config).__name__} has no target_modules; set them to check a module name.")
    if isinstance(target, (set, frozenset)):
        target = sorted(target)
    if not _matches(target, key):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers:
        layers = [layers] if isinstance(layers, int) else list(layers)
        idx = layer_index(key, getattr(config, "layers_pattern", None))
        return idx is not None and idx in layers
    return True


__all__ = ["BaseTuner", "BaseTunerLayer", "_get_submodules", "check_target_module_exists"]
