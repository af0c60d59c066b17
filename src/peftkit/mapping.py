"""Hugging Face PEFT's ``peft.mapping``: the tables from a method's ``PeftType`` to its config class, its engine
(tuner) class and its parameter prefix, as peftkit's objects, plus the entry points PEFT defines here.

The tables are read from peftkit's method registry when looked up, so a method registered later appears too.
Keys are :class:`PeftType` members; their string values (``"LORA"``) work as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

from peftkit.engine.config import PeftConfig, PeftType
from peftkit.engine.functional import inject_adapter_in_model
from peftkit.engine.mapping import get_peft_model
from peftkit.engine.registry import _REGISTRY, MethodSpec


def _tuner_cls(spec: MethodSpec) -> type:
    if spec.model_cls is not None:
        return spec.model_cls
    from peftkit.engine.tuner import AdapterModel

    return AdapterModel


class _RegistryTable(Mapping):
    """A read-only view of the method registry: ``PeftType`` -> ``pick(spec)``."""

    def __init__(self, pick: Callable[[MethodSpec], Any], what: str) -> None:
        self._pick, self._what = pick, what

    @staticmethod
    def _key(peft_type: Any) -> str:
        return str(getattr(peft_type, "value", peft_type)).upper()

    def __getitem__(self, peft_type: Any) -> Any:
        key = self._key(peft_type)
        if key not in _REGISTRY:
            raise KeyError(f"{peft_type!r}: no {self._what} for this method; peftkit supports "
                           f"{', '.join(sorted(_REGISTRY))}.")
        return self._pick(_REGISTRY[key])

    def __iter__(self) -> Iterator[Any]:
        for key in list(_REGISTRY):
            try:
                yield PeftType(key)
            except ValueError:  # a method registered under a type PeftType does not list
                yield key

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, peft_type: object) -> bool:
        return self._key(peft_type) in _REGISTRY

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!s}: {self[k]!r}' for k in self)}}}"


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping = _RegistryTable(lambda spec: spec.config_cls, "config class")
PEFT_TYPE_TO_TUNER_MAPPING: Mapping = _RegistryTable(_tuner_cls, "tuner class")
PEFT_TYPE_TO_PREFIX_MAPPING: Mapping = _RegistryTable(lambda spec: spec.prefix, "parameter prefix")


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config object for a config dict (as in ``adapter_config.json``), of the class its ``peft_type`` names."""
    return PeftConfig.from_dict(config_dict)


__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
]
