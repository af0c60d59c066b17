"""The engine: wraps targeted modules of a model, freezes the base, and manages the named adapters.

:class:`AdapterModel` is method-agnostic. It asks the method's registry entry to create the layer for each
targeted module and otherwise works only through the :class:`~peftkit.engine.layer.AdapterLayer` interface.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import TargetedConfig
from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper, innermost_base
from peftkit.integrations import quantization as _quant
from peftkit.engine.registry import MethodSpec, method_for_config
from peftkit.engine.targeting import ALL_LINEAR, expand_all_linear, find_targets

logger = logging.getLogger(__name__)


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, attr = name.rsplit(".", 1)
        return model.get_submodule(parent_name), attr
    return model, name


def _check_adapter_name(name: str) -> None:
    """Adapter names become module keys and, on save, sub-folder names: keep them plain."""
    from peftkit.engine.layer import BASE_ADAPTER

    if not isinstance(name, str) or not name or any(c in name for c in "./\\") or name == BASE_ADAPTER:
        raise ValueError(
            f"Invalid adapter name {name!r}: use a non-empty name without '.', '/' or '\\' (it becomes a module key "
            f"and a sub-folder name), other than {BASE_ADAPTER!r} (which means 'no adapter' in adapter_names=)."
        )


class AdapterModel(nn.Module):
    """Holds the user's model as ``self.model`` (so state-dict keys read ``base_model.model.<path>`` inside a
    :class:`~peftkit.engine.peft_model.PeftModel`, as in Hugging Face PEFT) and the adapters injected into it."""

    def __init__(
        self, model: nn.Module, config: TargetedConfig, adapter_name: str = "default", loading: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, TargetedConfig] = {}
        self.active_adapters: list[str] = []
        self.inject_adapter(adapter_name, config, loading=loading)

    # ------------------------------------------------------------------------------------------------- basics
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def method(self) -> MethodSpec:
        return method_for_config(next(iter(self.peft_config.values())))

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    # ----------------------------------------------------------------------- hooks for model-level methods
    def extra_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors beyond the layers' own that an adapter saves (e.g. a gate), keyed relative to ``self.model``."""
        return {}

    def after_adapter_loaded(self, adapter_name: str) -> None:
        """Called after a checkpoint was copied into ``adapter_name``."""

    def engine_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Saved tensors that live on the engine itself, outside ``self.model`` (e.g. X-LoRA's gate), keyed by
        their full checkpoint key (``base_model.<attribute path>``, as Hugging Face PEFT names them)."""
        return {}

    def adapter_tensors_to_save(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Last change to an adapter's tensors before they are saved (keys relative to ``self.model``), e.g.
        AdaLoRA keeps only the ranks its budget kept. Unchanged by default."""
        return tensors

    # ------------------------------------------------------------------------------------------ injection
    def _resolve_targets(self, config: TargetedConfig, spec: MethodSpec) -> TargetedConfig:
        if config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            defaults = spec.default_target_modules.get(model_type) if model_type else None
            if defaults is None:
                raise ValueError(
                    f"target_modules is not set and {spec.peft_type} has no default for model type {model_type!r}; "
                    "pass target_modules (a list of module names such as ['q_proj', 'v_proj'], or 'all-linear')."
                )
            config.target_modules = list(defaults)
        elif isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
            config.target_modules = expand_all_linear(self.model, config.task_type)
            if not config.target_modules:
                raise ValueError(f"target_modules='all-linear' found no linear layer in {type(self.model).__name__}.")
        return config

    def inject_adapter(self, adapter_name: str, config: TargetedConfig, loading: bool = False) -> None:
        """Add adapter ``adapter_name`` to every module ``config`` targets.

        ``loading=True`` means the weights come from a checkpoint next: layers skip data-dependent or costly
        initialisation (e.g. PiSSA's SVD), which would be overwritten anyway.
        """
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name or delete it first.")
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if str(first.peft_type) != str(config.peft_type):
                raise ValueError(
                    f"This model holds {first.peft_type} adapters; an adapter of another method ({config.peft_type}) "
                    "cannot be added to it."
                )
        for path, module in self.model.named_modules():
            held = module.adapter_configs if isinstance(module, AdapterLayer) else (
                module.modules_to_save if isinstance(module, ModulesToSaveWrapper) else ())
            if adapter_name in held:
                # another PeftModel wrapped this same model object; adding would overwrite its adapter silently
                raise ValueError(
                    f"{path or 'The model'} already holds an adapter named {adapter_name!r} that this model does not "
                    "manage (was get_peft_model called twice on the same model?). Call unload() or "
                    "merge_and_unload() on the first PeftModel, or add_adapter() to it under a new name."
                )
        spec = method_for_config(config)
        config = self._resolve_targets(config, spec)
        first_adapter = not self.peft_config
        self.peft_config[adapter_name] = config

        try:
            targets = find_targets(self.model, config)
            wrapped, skipped = 0, []
            for name in targets:
                module = self.model.get_submodule(name)
                if isinstance(module, AdapterLayer):
                    module.update_layer(adapter_name, config, module_name=name, loading=loading)
                    module.adapter_configs[adapter_name] = config
                    wrapped += 1
                    continue
                quant_kind = _quant.backend(innermost_base(module))
                if quant_kind is not None and not spec.supports_quantized_base:
                    raise ValueError(
                        f"{spec.peft_type} cannot adapt {name}: it is a quantised layer ({quant_kind}). On quantised "
                        "bases use LoRA or DoRA (LoraConfig), or load the base model without quantisation."
                    )
                layer = spec.create_layer(module, adapter_name, config, module_name=name, loading=loading)
                if layer is None:
                    skipped.append(f"{name} ({type(module).__name__})")
                    continue
                layer.adapter_configs[adapter_name] = config
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, layer)
                wrapped += 1
            if wrapped == 0:
                raise ValueError(
                    f"{spec.peft_type} cannot adapt any of the modules that target_modules matched: {', '.join(skipped[:10])}. "
                    "Target layers of a supported type instead."
                )
            if skipped and str(config.target_modules) != ALL_LINEAR:
                logger.warning("%s skipped modules of unsupported types: %s", spec.peft_type, ", ".join(skipped[:10]))
            self._add_modules_to_save(adapter_name, config)
        except Exception:
            self._discard_partial_adapter(adapter_name)
            raise

        if first_adapter:
            for name, p in self.model.named_parameters():
                if not self._is_adapter_param(name):
                    p.requires_grad_(False)
            self._mark_bias_trainable(config)
            self.active_adapters = [adapter_name]
        self.set_adapter(self.active_adapters)

    def _discard_partial_adapter(self, adapter_name: str) -> None:
        """Undo a failed injection so that the model is as it was before."""
        self.peft_config.pop(adapter_name, None)
        for name, layer in list(self.adapter_layers()):
            if adapter_name in layer.adapter_configs or any(adapter_name in getattr(layer, s) for s in layer.adapter_slots):
                layer.delete_adapter(adapter_name)
            if not layer.adapter_configs:
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, layer.base_layer)
        for name, wrapper in list(self.modules_to_save_wrappers()):
            wrapper.delete_adapter(adapter_name)
            if len(wrapper.modules_to_save) == 0:
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, wrapper.original_module)

    def _is_adapter_param(self, param_name: str) -> bool:
        prefix = self.method.prefix
        return f".{prefix}" in f".{param_name}" or ".modules_to_save." in param_name

    def _add_modules_to_save(self, adapter_name: str, config: TargetedConfig) -> None:
        if not config.modules_to_save:
            return
        found = False
        for name, module in list(self.model.named_modules()):
            if not name or isinstance(module, AdapterLayer):
                continue
            if not any(name == m or name.endswith("." + m) for m in config.modules_to_save):
                continue
            if ".modules_to_save." in name or name.endswith(".original_module") or ".original_module." in name:
                continue
            found = True
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
            else:
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))
        if not found:
            raise ValueError(
                f"modules_to_save={config.modules_to_save!r} matched no module of {type(self.model).__name__}."
            )

    def _mark_bias_trainable(self, config: TargetedConfig) -> None:
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        elif bias.endswith("_only"):
            for _, layer in self.adapter_layers():
                b = getattr(layer.get_base_layer(), "bias", None)
                if b is not None:
                    b.requires_grad_(True)

    # ------------------------------------------------------------------------------------------ management
    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(self.peft_config) or 'none'}.")
        for path, wrapper in self.modules_to_save_wrappers():  # check before changing anything
            present = [n for n in names if n in wrapper.modules_to_save]
            if len(present) > 1:
                raise ValueError(
                    f"Adapters {present} each have their own trained copy of {path} (modules_to_save), and only one "
                    "copy can be used at a time; activate them one by one, or use adapter_names= per row."
                )
        for _, layer in self.adapter_layers():
            layer.set_adapter(names)
            for n in names:
                if n in layer.adapter_configs and self.peft_config[n].inference_mode:
                    for _, p in layer.adapter_parameters(n):
                        p.requires_grad_(False)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(names)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has: {', '.join(self.peft_config)}.")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for _, layer in self.adapter_layers():
            if not enabled and layer.merged:
                layer.unmerge()
            layer.adapters_disabled = not enabled
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.adapters_disabled = not enabled

    def disable_adapter_layers(self) -> None:
        self.enable_adapter_layers(False)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        self.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.enable_adapter_layers(True)

    def _check_names(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(self.peft_config)}.")
        return names

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        if not self.method.supports_merge:
            raise ValueError(f"{self.method.peft_type} adapters cannot be merged into the base weights.")
        names = self._check_names(adapter_names)
        layers = list(self.adapter_layers())
        from peftkit.integrations.quantization import check_mergeable

        for _, layer in layers:  # a quantised base that cannot be re-quantised refuses before anything changes
            check_mergeable(layer.get_base_layer())
        if safe_merge:
            # Check every layer before writing any, so that a failure leaves all base weights untouched.
            for path, layer in layers:
                bad = layer.first_nonfinite_merge(names)
                if bad is not None:
                    raise ValueError(
                        f"Merging adapter {bad!r} would put NaN or inf into the weights of {path}; nothing was "
                        "merged. The adapter's weights are broken (check the training run for divergence)."
                    )
        for _, layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        # the trained copy of a modules_to_save module that belongs to the merged adapters (one at most)
        chosen: dict[str, Optional[str]] = {}
        if merge:
            names = self._check_names(adapter_names)
            for path, wrapper in self.modules_to_save_wrappers():
                owners = [n for n in names if n in wrapper.modules_to_save]
                if len(owners) > 1:
                    raise ValueError(
                        f"Adapters {owners} each have their own trained copy of {path}; merge one of them at a time."
                    )
                chosen[path] = owners[0] if owners else None
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for name, layer in list(self.adapter_layers()):
            parent, attr = _get_parent(self.model, name)
            setattr(parent, attr, layer.get_base_layer())
        for name, wrapper in list(self.modules_to_save_wrappers()):
            parent, attr = _get_parent(self.model, name)
            owner = chosen.get(name)
            setattr(parent, attr, wrapper.modules_to_save[owner] if owner else wrapper.original_module)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        """Fold the adapters into the base weights and return the plain base model."""
        return self._unwrap(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        for _, layer in self.adapter_layers():
            layer.unmerge()
        return self._unwrap(merge=False)
