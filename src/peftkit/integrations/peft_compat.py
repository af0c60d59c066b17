"""Being accepted where clients accept only Hugging Face PEFT's classes.

transformers' ``Trainer`` (adapter-only checkpoints, resume, best-model reload), accelerate's ``is_peft_model``,
TRL's ``SFTTrainer`` and transformers' ``add_adapter`` decide with ``isinstance(obj, peft.PeftModel)`` or
``isinstance(cfg, peft.PeftConfig)``. PEFT's classes are plain classes (no ABC to ``register`` with), so:

* ``isinstance`` also consults an object's ``__class__`` attribute when its type does not match. peftkit's
  :class:`PeftModel` and :class:`PeftConfig` report, *only while* ``peft`` *is already imported*, a bridge class that
  derives from both the peftkit class and its PEFT counterpart (``PeftModelForCausalLM`` -> PEFT's
  ``PeftModelForCausalLM``, configs -> ``peft.PeftConfig``). ``type(obj)`` stays the peftkit class, so attribute
  lookup, ``super()``, ``torch.compile`` guards, copying and pickling see peftkit only. peft is never imported
  here: a client that checks against ``peft.PeftModel`` has imported peft already.
* Clients that build a model from a config (TRL: ``peft.get_peft_model(model, peft_config)``) end in
  ``peft.PeftModel(...)`` or a task subclass. Once peft is imported, ``peft.PeftModel.__new__`` is given a hook:
  called with a *peftkit* config it returns ``peftkit.get_peft_model(model, config, adapter_name)`` (Python then
  skips PEFT's ``__init__``, the object being of another type); with PEFT's own configs nothing changes.

Without peft installed these clients never look for adapters (transformers' ``is_peft_available()`` is false);
see :mod:`peftkit.integrations.trainer` for the documented way then.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

_MODEL_BRIDGES: dict[type, Optional[type]] = {}
_CONFIG_BRIDGES: dict[type, Optional[type]] = {}


def _peft() -> Any:
    """The ``peft`` module if it is imported completely, else None (never imports it)."""
    peft = sys.modules.get("peft")
    if peft is None or getattr(getattr(peft, "__spec__", None), "_initializing", False):
        return None
    if getattr(getattr(peft, "PeftModel", None), "__module__", "").startswith("peftkit"):
        return None  # "peft" is peftkit under another name (an alias or a shim): nothing to bridge to
    return peft


def _make_bridge(ours: type, theirs: type) -> Optional[type]:
    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        # obj.__class__(...) (e.g. dataclasses.replace) builds the peftkit class itself, never a bridge instance
        obj = object.__new__(ours)
        obj.__init__(*args, **kwargs)
        return obj

    try:
        bridge = type(ours.__name__, (ours, theirs), {"__module__": ours.__module__, "__qualname__": ours.__qualname__,
                                                      "_peftkit_bridge_of": ours, "__new__": __new__})
    except TypeError:  # a layout or MRO conflict with some peft version: stay unrecognised rather than break
        return None
    return bridge


def model_bridge(cls: type) -> type:
    """What ``obj.__class__`` reports for a peftkit PeftModel of type ``cls``."""
    peft = _peft()
    if peft is None:
        return cls
    if cls in _MODEL_BRIDGES:
        return _MODEL_BRIDGES[cls] or cls
    theirs = None
    for klass in cls.__mro__:  # the nearest peftkit class whose name PEFT also has (PeftModelForCausalLM, PeftModel)
        if klass.__module__.startswith("peftkit.") and isinstance(getattr(peft, klass.__name__, None), type):
            theirs = getattr(peft, klass.__name__)
            break
    bridge = _make_bridge(cls, theirs) if theirs is not None else None
    _MODEL_BRIDGES[cls] = bridge
    install_constructor_hook(peft)
    return bridge or cls


def config_bridge(cls: type) -> type:
    """What ``obj.__class__`` reports for a peftkit config of type ``cls``."""
    peft = _peft()
    if peft is None:
        return cls
    if cls in _CONFIG_BRIDGES:
        return _CONFIG_BRIDGES[cls] or cls
    theirs = getattr(peft, "PeftConfig", None)
    bridge = _make_bridge(cls, theirs) if isinstance(theirs, type) else None
    _CONFIG_BRIDGES[cls] = bridge
    install_constructor_hook(peft)
    return bridge or cls


def reconstruct(cls: type) -> Any:
    """Pickle/copy reconstructor of peftkit models and configs (``__reduce_ex__``): the real type, not the bridge."""
    return cls.__new__(cls)


def reduce_ex(obj: Any, protocol: int) -> tuple:
    """``object.__reduce_ex__`` with the constructor named by the object's real type: pickle compares the class in
    ``copyreg.__newobj__`` with ``obj.__class__``, which is the bridge while peft is imported."""
    rv = object.__reduce_ex__(obj, protocol)
    if isinstance(rv, tuple) and rv and getattr(rv[0], "__name__", "") == "__newobj__":
        args = rv[1]
        if len(args) == 1:
            return (reconstruct, (type(obj),)) + tuple(rv[2:])
    return rv


_HOOKED = "_peftkit_new_hook"


def install_constructor_hook(peft: Any) -> None:
    base = getattr(peft, "PeftModel", None)
    if not isinstance(base, type) or base.__dict__.get(_HOOKED):
        return
    previous = base.__dict__.get("__new__")

    def __new__(cls, model: Any = None, peft_config: Any = None, *args: Any, **kwargs: Any) -> Any:
        from peftkit.engine.config import PeftConfig

        if isinstance(peft_config, PeftConfig):  # a peftkit config (its real type: PEFT's configs are not ours)
            from peftkit.engine.mapping import get_peft_model

            adapter_name = kwargs.get("adapter_name", args[0] if args and isinstance(args[0], str) else "default")
            return get_peft_model(model, peft_config, adapter_name=adapter_name)
        if previous is not None:
            return previous(cls, model, peft_config, *args, **kwargs)
        return object.__new__(cls)

    base.__new__ = __new__  # type: ignore[method-assign]
    setattr(base, _HOOKED, True)
