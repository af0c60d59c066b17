"""Helpers with the names and behaviour of Hugging Face PEFT's ``peft.helpers``.

- :func:`check_if_peft_model`: whether a folder / hub id holds an adapter config.
- :func:`update_forward_signature`, :func:`update_generate_signature`, :func:`update_signature`: give
  ``peft_model.forward`` / ``.generate`` the wrapped model's docstring, name and signature (what IDEs and
  ``inspect.signature`` show).
- :func:`rescale_adapter_scale`: a context manager that multiplies every LoRA layer's scaling (WiSE-FT style
  interpolation between the base and the fine-tuned model for a multiplier in [0, 1]).
- :func:`disable_input_dtype_casting`: a context manager that turns off the adapter layers' input dtype casting.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch.nn as nn

from peftkit.engine.layer import AdapterLayer

_SIGNATURE_METHODS = ("forward", "generate", "all")


def check_if_peft_model(model_name_or_path: str) -> bool:
    """True if ``model_name_or_path`` (a local folder or a hub id) holds a readable adapter config, else False."""
    from peftkit.engine.config import PeftConfig

    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # as PEFT: any failure (no file, no network, bad JSON, unknown method) means "not a PEFT model"
        return False
    return True


def _wrap_with_base(model: Any, attr: str) -> None:
    base_model = model.get_base_model()
    base_fn = getattr(type(base_model), attr, None)
    current = getattr(model, attr)
    if base_fn is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return current(*args, **kwargs)

    functools.update_wrapper(wrapper, base_fn, assigned=("__doc__", "__name__", "__annotations__"), updated=())
    # the signature shown is the wrapped model's own (bound: no ``self``)
    wrapper.__signature__ = inspect.signature(getattr(base_model, attr))  # type: ignore[attr-defined]
    wrapper.__wrapped__ = getattr(base_model, attr)  # type: ignore[attr-defined]
    object.__setattr__(model, attr, wrapper)


def update_forward_signature(model: Any) -> None:
    """Give ``model.forward`` (a PeftModel's) the wrapped model's forward docstring, name and signature.

    peftkit's ``PeftModel.forward`` already reports the wrapped model's parameters to ``inspect.signature`` (plus
    ``adapter_names``); this also copies the docstring and name, as PEFT's helper does."""
    _wrap_with_base(model, "forward")


def update_generate_signature(model: Any) -> None:
    """Give ``model.generate`` the wrapped model's generate docstring, name and signature (no-op without one)."""
    if not hasattr(model, "generate") or not hasattr(model.get_base_model(), "generate"):
        return
    _wrap_with_base(model, "generate")


update_generation_signature = update_generate_signature  # alias


def update_signature(model: Any, method: str = "all") -> None:
    """``method``: "forward", "generate" or "all" (both)."""
    if method not in _SIGNATURE_METHODS:
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")
    if method in ("forward", "all"):
        update_forward_signature(model)
    if method in ("generate", "all"):
        update_generate_signature(model)


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Within the block, every LoRA layer's scaling is multiplied by ``multiplier`` (restored on exit, also after
    an exception). Raises ValueError if ``model`` has no LoRA layer, TypeError for a non-number multiplier."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    from peftkit.methods.lora.lora import LoraLayer

    saved: dict[nn.Module, dict] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            saved[module] = dict(module.scaling)
            module.scaling = {k: v * multiplier for k, v in module.scaling.items()}
    if not saved:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in saved.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the block, adapter layers do not cast their input to the adapter's dtype (for callers that handle
    dtypes themselves, e.g. diffusers' layerwise casting hooks). ``active=False`` changes nothing.

    Note: peftkit's LoRA linear layers compute the adapter product in the input's dtype already (the adapter
    weights are cast to it), so for them this only matters to code that reads ``cast_input_dtype_enabled``."""
    if not active:
        yield
        return
    saved = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            saved[module] = module.__dict__.get("cast_input_dtype_enabled", None)
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for module, value in saved.items():
            if value is None:
                module.__dict__.pop("cast_input_dtype_enabled", None)
            else:
                module.cast_input_dtype_enabled = value


__all__ = [
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "rescale_adapter_scale",
    "update_forward_signature",
    "update_generate_signature",
    "update_generation_signature",
    "update_signature",
]
