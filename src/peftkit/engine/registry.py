"""The method registry: one entry per method, mapping its ``peft_type`` to its config and layer factory.

Adding a method means writing one module under ``peftkit/methods/`` that calls :func:`register_method`, and
listing that module in ``peftkit/methods/__init__.py``. The engine never imports a method: ``import peftkit``
imports ``peftkit.methods``, which fills the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:
    import torch.nn as nn

    from peftkit.engine.config import PeftConfig


@dataclass(frozen=True)
class MethodSpec:
    """What the engine needs to know about a method.

    Attributes:
        peft_type: the name written to ``adapter_config.json``.
        config_cls: the method's config dataclass.
        create_layer: ``create_layer(target, adapter_name, config, module_name) -> AdapterLayer | None`` wraps one
            targeted module (or returns None when the method cannot adapt that module type); called only for
            modules that are not yet wrapped by this method.
        prefix: the common prefix of the method's parameter names (``"lora_"``), used to tell adapter parameters
            from base parameters.
        model_cls: optional subclass of :class:`peftkit.engine.tuner.AdapterModel` for methods with model-level logic
            (AdaLoRA's budget, X-LoRA's gate). Defaults to the plain engine.
        default_target_modules: per ``model_type`` defaults used when the config gives no ``target_modules``.
        supports_mixed_batch: whether ``adapter_names=`` (one adapter per row) is allowed.
        supports_quantized_base: whether the method adapts quantised linear layers (bitsandbytes 4/8-bit, torchao).
    """

    peft_type: str
    config_cls: type
    create_layer: Callable[..., Optional["nn.Module"]]
    prefix: str
    model_cls: Optional[type] = None
    default_target_modules: dict[str, list[str]] = field(default_factory=dict)
    supports_mixed_batch: bool = True
    supports_merge: bool = True
    # whether the method's layers work on quantised linears (bitsandbytes, torchao); others are refused on them
    supports_quantized_base: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    key = str(spec.peft_type).upper()
    if key in _REGISTRY and _REGISTRY[key] is not spec:
        raise ValueError(f"Method {key} is registered twice.")
    _REGISTRY[key] = spec
    return spec


def get_method(peft_type: Union[str, Any]) -> MethodSpec:
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"Unknown method {peft_type!r}; this version of peftkit supports: {known}.")
    return _REGISTRY[key]


def method_for_config(config: "PeftConfig") -> MethodSpec:
    if config.peft_type is None:
        raise ValueError(f"{type(config).__name__} has no peft_type.")
    return get_method(config.peft_type)


def supported_methods() -> list[str]:
    return sorted(_REGISTRY)


# Config strings ("seq_bn[reduction_factor=8]"): a method registers a parser for the names it understands.
_CONFIG_STRING_PARSERS: dict[str, Callable[[str], Any]] = {}


def register_config_strings(names: list[str], parser: Callable[[str], Any]) -> None:
    for name in names:
        _CONFIG_STRING_PARSERS[name.lower()] = parser


def config_from_string(text: str) -> Any:
    """The config a string shorthand names, e.g. ``"par_bn"`` or ``"seq_bn[reduction_factor=8]"``."""
    head = text.split("[", 1)[0].strip().lower()
    if head not in _CONFIG_STRING_PARSERS:
        known = ", ".join(sorted(_CONFIG_STRING_PARSERS)) or "none"
        raise ValueError(f"Unknown config string {text!r}; known names: {known} (optionally with [key=value,...]).")
    return _CONFIG_STRING_PARSERS[head](text)
