"""``PeftMixedModel``: adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA, OFT) on one model.

Each method keeps its own layer type. When a module is targeted by a second method, the new method's layer wraps
the layer already there (``lin.base_layer`` is then the first method's layer, whose ``base_layer`` is the original
module), so the forward of a module is the innermost base plus every active adapter of every layer around it.
Adapters of a method that already has a layer at the module join that layer.

Merging goes from the innermost layer outwards (an outer layer sees the inner layers' result as its base, so for
a multiplicative method such as OFT the order matters); unmerging goes the other way. Saving writes one folder
per adapter in the ordinary single-method layout (a nested layer's tensors are stored under the module's own
path), so each saved adapter also loads into a plain :class:`~peftkit.PeftModel` (and into PEFT).
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional, Sequence, Union

import torch.nn as nn

from peftkit.engine.config import PeftConfig
from peftkit.engine.layer import AdapterLayer
from peftkit.engine.peft_model import PeftModel, _refuse_foreign_adapters
from peftkit.engine.registry import MethodSpec, method_for_config
from peftkit.engine.tuner import AdapterModel

# The methods whose layers can be stacked on one module (as in PEFT's mixed models, less SHiRA which peftkit lacks).
COMPATIBLE_PEFT_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT")


def check_config_compatible(config: Any) -> None:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"peft_config must be a peftkit config (e.g. LoraConfig), got {type(config).__name__}.")
    if str(config.peft_type) not in COMPATIBLE_PEFT_TYPES:
        raise ValueError(
            f"The provided `peft_type` '{config.peft_type}' is not compatible with the `PeftMixedModel`. Compatible "
            f"types are: {', '.join(COMPATIBLE_PEFT_TYPES)}. Use get_peft_model(model, config) (mixed=False) for "
            "other methods."
        )


def _layer_method(layer: AdapterLayer) -> Optional[str]:
    config = next(iter(layer.adapter_configs.values()), None)
    return None if config is None else str(config.peft_type)


class MixedAdapterModel(AdapterModel):
    """The engine of :class:`PeftMixedModel`: layers of several methods, nested per module."""

    flatten_nested_layer_paths = True  # checkpoints in the single-method layout (see save_load.adapter_parameter_map)

    def _accepts_other_method(self, config: Any) -> bool:
        check_config_compatible(config)
        return True

    def inject_adapter(self, adapter_name: str, config: Any, loading: bool = False) -> None:
        check_config_compatible(config)
        super().inject_adapter(adapter_name, config, loading=loading)

    def _layer_to_update(self, module: nn.Module, spec: MethodSpec) -> Optional[AdapterLayer]:
        layer = module
        while isinstance(layer, AdapterLayer):
            if _layer_method(layer) == str(spec.peft_type):
                return layer
            layer = layer.base_layer
        return None  # the new method's layer wraps what is there

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """Innermost layer first: merging in this order composes the methods as the forward does."""
        yield from reversed(list(super().adapter_layers()))

    @property
    def targeted_module_names(self) -> list[str]:
        names = [name for name, _ in super().adapter_layers()]
        outer = [n for n in names if not (n.endswith(".base_layer") and n[: -len(".base_layer")] in names)]
        return list(dict.fromkeys(outer))

    def unmerge_adapter(self) -> None:
        for _, layer in reversed(list(self.adapter_layers())):  # outermost first, the reverse of merging
            layer.unmerge()

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            self.unmerge_adapter()
        super().enable_adapter_layers(enabled)

    def unload(self) -> nn.Module:
        self.unmerge_adapter()
        return self._unwrap(merge=False)

    def _method_hook(self, adapter_name: str, hook: str, *args: Any) -> Any:
        """Call a model-level hook of the adapter's own method (e.g. LoRA's PiSSA residual on load), if it has one."""
        spec = method_for_config(self.peft_config[adapter_name])
        cls = spec.model_cls
        if cls is None or getattr(cls, hook) is getattr(AdapterModel, hook):
            return getattr(AdapterModel, hook)(self, adapter_name, *args)
        return getattr(cls, hook)(self, adapter_name, *args)

    def after_adapter_loaded(self, adapter_name: str) -> None:
        self._method_hook(adapter_name, "after_adapter_loaded")

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter combines adapters of one method; a PeftMixedModel holds several methods. Combine "
            "LoRA adapters on a plain PeftModel (get_peft_model without mixed=True)."
        )


class PeftMixedModel(PeftModel):
    """A model with adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA, OFT), as Hugging Face PEFT's
    ``PeftMixedModel`` (``get_peft_model(model, config, mixed=True)``).

    ``add_adapter(name, config)`` with any compatible config, ``set_adapter([...])`` to activate several at once
    (adapters apply in the order they were added, whatever the list's order), ``merge_and_unload()`` /
    ``unload()``, ``load_adapter`` / ``from_pretrained`` of adapters saved by a plain PeftModel or PEFT. Departures
    from PEFT: ``save_pretrained`` works (PEFT refuses): one folder per adapter, each loadable on its own; and it is
    a subclass of :class:`PeftModel` here.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        _loading: bool = False,
        _keep_config: bool = False,
        **_: Any,
    ) -> None:
        nn.Module.__init__(self)
        check_config_compatible(peft_config)
        if not _keep_config:
            peft_config = copy.deepcopy(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
                getattr(model, "config", None), "_name_or_path", None
            ) or None
        _refuse_foreign_adapters(model)
        self.base_model = MixedAdapterModel(model, peft_config, adapter_name, loading=_loading)
        if not autocast_adapter_dtype:
            self.base_model.cast_adapter_dtype(adapter_name, autocast_adapter_dtype=False)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True, **kwargs: Any) -> None:
        """Add an inactive adapter of any compatible method (activate it with :meth:`set_adapter`)."""
        check_config_compatible(peft_config)
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                            autocast_adapter_dtype=autocast_adapter_dtype, **kwargs)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate one adapter or a list of adapters (of any methods); the others are inactive and frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
        super().set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Delete one adapter or a list of adapters."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = sorted(set(names) - set(self.peft_config))
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found, available adapters: {sorted(self.peft_config)}")
        merged = [n for n in names if any(n in layer.merged_adapters for _, layer in self.base_model.adapter_layers())]
        if merged:  # checked for the whole list first: nothing is deleted (PEFT's message)
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        for name in names:
            super().delete_adapter(name)

    def load_adapter(self, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """Load an adapter saved by a (plain or mixed) PeftModel, or by PEFT, as a new inactive adapter."""
        config = kwargs.get("config")
        if config is not None:
            check_config_compatible(config)
        return super().load_adapter(model_id, adapter_name, *args, **kwargs)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        self.base_model.add_weighted_adapter(*args, **kwargs)

    def get_layer_status(self) -> Any:
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__} (as in PEFT).")

    def get_model_status(self) -> Any:
        raise TypeError(f"get_model_status is not supported for {type(self).__name__} (as in PEFT).")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Any, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None, **kwargs: Any) -> "PeftMixedModel":
        """A PeftMixedModel whose first adapter is read from ``model_id`` (a folder saved by any PeftModel)."""
        if config is not None:
            check_config_compatible(config)
        return super().from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                       config=config, **kwargs)


__all__ = ["PeftMixedModel", "MixedAdapterModel", "COMPATIBLE_PEFT_TYPES"]
