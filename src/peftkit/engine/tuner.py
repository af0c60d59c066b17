"""The engine: wraps targeted modules of a model, freezes the base, and manages the named adapters.

:class:`AdapterModel` is method-agnostic. It asks the method's registry entry to create the layer for each
targeted module and otherwise works only through the :class:`~peftkit.engine.layer.AdapterLayer` interface.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import TargetedConfig
from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper, innermost_base
from peftkit.integrations import quantization as _quant
from peftkit.engine.registry import MethodSpec, method_for_config
from peftkit.engine.targeting import ALL_LINEAR, expand_all_linear, find_targets
from peftkit.engine.validation import check_rank_against_layer, validate_config

logger = logging.getLogger(__name__)

NO_ADAPTERS_MESSAGE = (
    "This model holds no adapter (the last one was deleted); add one with add_adapter(name, config) or "
    "load_adapter(path, name) first."
)


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
    if len(name) > MAX_ADAPTER_NAME_LENGTH or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError(
            f"Invalid adapter name {name[:40]!r}... ({len(name)} characters): at most {MAX_ADAPTER_NAME_LENGTH} "
            "characters, since it becomes a sub-folder name when saved."
        )
    if any(ord(c) < 32 for c in name):
        raise ValueError(f"Invalid adapter name {name!r}: control characters cannot be part of a folder name.")
    if name in _reserved_adapter_names():
        raise ValueError(
            f"Invalid adapter name {name!r}: it is an attribute of torch's ModuleDict/ParameterDict (which hold the "
            "adapters' parameters), so it cannot be a key there. Choose another name."
        )


MAX_ADAPTER_NAME_LENGTH = 128
_RESERVED: set[str] = set()


def _reserved_adapter_names() -> set[str]:
    """Names torch's containers refuse as keys (``training``, ``forward``, ``keys``, ...)."""
    if not _RESERVED:
        for container in (nn.ModuleDict(), nn.ParameterDict()):
            _RESERVED.update(n for n in dir(container) if not n.startswith("__"))
    return _RESERVED


def _warn_unmatched_patterns(config: TargetedConfig, targets: Sequence[str]) -> None:
    """As PEFT: a rank_pattern / alpha_pattern key that matches no targeted module is reported (it has no effect)."""
    if str(config.peft_type) == "ADALORA":  # AdaLoRA's rank_pattern is its pruning record, not a user override
        return
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None)
        if not patterns:
            continue
        unmatched = sorted(
            k for k in patterns if not any(t == k or re.match(rf"(.*\.)?({k})$", t) for t in targets)
        )
        if unmatched:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
            )


class AdapterModel(nn.Module):
    """Holds the user's model as ``self.model`` (so state-dict keys read ``base_model.model.<path>`` inside a
    :class:`~peftkit.engine.peft_model.PeftModel`, as in Hugging Face PEFT) and the adapters injected into it."""

    # PEFT's BaseTuner flag for methods whose adapters share tensors across layers (VeRA); none of peftkit's do
    uses_shared_state: bool = False

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
        if not self.peft_config:
            raise ValueError(NO_ADAPTERS_MESSAGE)
        return method_for_config(next(iter(self.peft_config.values())))

    @property
    def prefix(self) -> str:
        """The method's parameter-name prefix, e.g. ``"lora_"``."""
        return self.method.prefix

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (relative to the wrapped model) of the modules that hold adapter layers."""
        return [name for name, _ in self.adapter_layers()]

    @property
    def adapters_are_disabled(self) -> bool:
        layers = [layer for _, layer in self.adapter_layers()]
        return bool(layers) and all(layer.adapters_disabled for layer in layers)

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

    def checkpoint_tensors_to_load(self, adapter_name: str, tensors: dict[str, torch.Tensor],
                                   saved_config: Any = None) -> dict[str, torch.Tensor]:
        """First change to a checkpoint loaded into the existing adapter ``adapter_name`` (``load_adapter`` on a name
        it has), given the checkpoint's own config if it has one (e.g. AdaLoRA restores pruned ranks). Unchanged by
        default."""
        return tensors

    def engine_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Saved tensors that live on the engine itself, outside ``self.model`` (e.g. X-LoRA's gate), keyed by
        their full checkpoint key (``base_model.<attribute path>``, as Hugging Face PEFT names them)."""
        return {}

    def adapter_tensors_to_save(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Last change to an adapter's tensors before they are saved (keys relative to ``self.model``), e.g.
        AdaLoRA keeps only the ranks its budget kept. Unchanged by default."""
        return tensors

    # ------------------------------------------------------------------------------------------ injection
    def inject_parameter_targets(self, adapter_name: str, config: TargetedConfig, loading: bool = False) -> int:
        """Adapters on bare parameters (LoRA's ``target_parameters``); how many were added. None by default."""
        return 0

    def _resolve_targets(self, config: TargetedConfig, spec: MethodSpec) -> TargetedConfig:
        if config.target_modules is None and getattr(config, "target_parameters", None):
            return config  # only parameters are targeted (as PEFT allows)
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

    def _accepts_other_method(self, config: TargetedConfig) -> bool:
        """Whether an adapter of another method than the first one's may join (PeftMixedModel's engine: yes)."""
        return False

    def _layer_to_update(self, module: nn.Module, spec: MethodSpec) -> Optional[AdapterLayer]:
        """The adapter layer at a targeted module that takes the new adapter (None: wrap the module in a new one)."""
        return module if isinstance(module, AdapterLayer) else None

    def inject_adapter(self, adapter_name: str, config: TargetedConfig, loading: bool = False) -> None:
        """Add adapter ``adapter_name`` to every module ``config`` targets.

        ``loading=True`` means the weights come from a checkpoint next: layers skip data-dependent or costly
        initialisation (e.g. PiSSA's SVD), which would be overwritten anyway.
        """
        _check_adapter_name(adapter_name)
        validate_config(config)  # again: fields may have been changed since the config was built
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name or delete it first.")
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if str(first.peft_type) != str(config.peft_type) and not self._accepts_other_method(config):
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
        with_bias = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if with_bias and getattr(config, "bias", "none") != "none":
            raise ValueError(
                f"Only one adapter of a model can train biases, and {with_bias[0]!r} has bias="
                f"{getattr(self.peft_config[with_bias[0]], 'bias')!r}; add {adapter_name!r} with bias='none' (as PEFT "
                "requires)."
            )
        spec = method_for_config(config)
        config = self._resolve_targets(config, spec)
        first_adapter = not self.peft_config
        # As in PEFT, adding an adapter never changes whether the parameters already there train.
        existing_flags = [] if first_adapter else [(p, p.requires_grad) for p in self.model.parameters()]
        self.peft_config[adapter_name] = config

        try:
            only_params = not config.target_modules and getattr(config, "target_parameters", None)
            targets = [] if only_params else find_targets(self.model, config)
            for name in targets:  # before any allocation: a rank beyond the layer size is refused
                check_rank_against_layer(config, name, self.model.get_submodule(name))
            _warn_unmatched_patterns(config, targets)
            wrapped, skipped = 0, []
            for name in targets:
                module = self.model.get_submodule(name)
                owner = self._layer_to_update(module, spec)
                if owner is not None:
                    owner.update_layer(adapter_name, config, module_name=name, loading=loading)
                    owner.adapter_configs[adapter_name] = config
                    wrapped += 1
                    continue
                quant_kind = _quant.backend(innermost_base(module))
                if quant_kind is not None and not spec.supports_quantized_base:
                    raise ValueError(_quant.refusal_message(spec.peft_type, name, innermost_base(module)))
                layer = spec.create_layer(module, adapter_name, config, module_name=name, loading=loading)
                if layer is None:
                    skipped.append(f"{name} ({type(module).__name__})")
                    continue
                layer.adapter_configs[adapter_name] = config
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, layer)
                wrapped += 1
            wrapped += self.inject_parameter_targets(adapter_name, config, loading=loading)
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
            self._freeze_base()
            self._mark_bias_trainable(config)
            self.active_adapters = [adapter_name]
            self.set_adapter(self.active_adapters, inference_mode=bool(config.inference_mode))
        else:
            self.set_adapter(self.active_adapters)  # the new adapter is inactive, hence frozen
            for p, flag in existing_flags:
                p.requires_grad_(flag)

    def _drop_wrappers(self, only_empty: bool = False) -> None:
        """Replace auxiliary wrappers (modules with ``unwrapped()``, e.g. LoRA's trainable-token embeddings) by
        the module they wrap; ``only_empty``: only those whose adapter layer has been removed."""
        for name, module in list(self.model.named_modules()):
            if not name or not callable(getattr(type(module), "unwrapped", None)):
                continue
            if only_empty and any(isinstance(m, AdapterLayer) for m in module.children()):
                continue
            parent, attr = _get_parent(self.model, name)
            setattr(parent, attr, module.unwrapped())

    def _discard_partial_adapter(self, adapter_name: str) -> None:
        """Undo a failed injection so that the model is as it was before."""
        self.peft_config.pop(adapter_name, None)
        for name, layer in reversed(list(self.adapter_layers())):  # innermost first (nested layers)
            if adapter_name in layer.adapter_configs or any(adapter_name in getattr(layer, s) for s in layer.adapter_slots):
                layer.delete_adapter(adapter_name)
            if not layer.adapter_configs:
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, layer.base_layer)
        self._drop_wrappers(only_empty=True)
        for name, wrapper in list(self.modules_to_save_wrappers()):
            wrapper.delete_adapter(adapter_name)
            if len(wrapper.modules_to_save) == 0:
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, wrapper.original_module)

    def _adapter_param_ids(self) -> set[int]:
        """Ids of every adapter parameter and modules_to_save copy, found structurally (through the adapter layers
        and wrappers), so that a base module whose name starts with the method's prefix is not taken for one."""
        ids: set[int] = set()
        for _, layer in self.adapter_layers():
            for slot in layer.adapter_slots:
                ids.update(id(p) for p in getattr(layer, slot).parameters())
        for _, wrapper in self.modules_to_save_wrappers():
            ids.update(id(p) for p in wrapper.modules_to_save.parameters())
        return ids

    def _freeze_base(self) -> None:
        """Freeze every parameter of the model that is not an adapter's (found structurally, see
        :meth:`_adapter_param_ids`); done when the first adapter is injected."""
        adapter_ids = self._adapter_param_ids()
        for p in self.model.parameters():
            if id(p) not in adapter_ids:
                p.requires_grad_(False)

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
    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; as in PEFT their parameters train unless ``inference_mode``, the others'
        do not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise ValueError(
                "set_adapter needs at least one adapter name; to run the base model without adapters use "
                "`with model.disable_adapter():` or model.disable_adapter_layers()."
            )
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(self.peft_config) or 'none'}.")
        for path, wrapper in self.modules_to_save_wrappers():  # check before changing anything
            present = [n for n in names if n in wrapper.modules_to_save]
            if len(present) > 1:
                raise ValueError(
                    f"Only one adapter can be set at a time for ModulesToSaveWrapper {path}: adapters {present} each "
                    "have their own trained copy of it (modules_to_save), and only one copy can be used at a time; "
                    "activate them one by one, or use adapter_names= per row."
                )
        for _, layer in self.adapter_layers():
            layer.set_adapter(names, inference_mode=inference_mode)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(names, inference_mode=inference_mode)
        self.active_adapters = names

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Gradients on or off for the named adapters' parameters and modules_to_save copies (active or not)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(self.peft_config) or 'none'}.")
        for _, layer in self.adapter_layers():
            for n in names:
                for _, p in layer.adapter_parameters(n):
                    p.requires_grad_(requires_grad)
        for _, wrapper in self.modules_to_save_wrappers():
            for n in names:
                if n in wrapper.modules_to_save:
                    wrapper.modules_to_save[n].requires_grad_(requires_grad)

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """``autocast_adapter_dtype=False``: put the adapter's floating-point parameters in the dtype of the base
        layer they adapt (e.g. bfloat16), instead of the float32 kept by default for half-precision bases."""
        if autocast_adapter_dtype:
            return  # the default: layers already create float32 adapters on float16/bfloat16 bases
        for _, layer in self.adapter_layers():
            if adapter_name not in layer.adapter_configs:
                continue
            dtype = layer._weight_param().dtype  # the adapted tensor (a bare parameter, MHA's in_proj_weight)
            if not dtype.is_floating_point:
                continue
            for _, p in layer.adapter_parameters(adapter_name):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist. No adapter named {adapter_name!r}; this model "
                             f"has: {', '.join(self.peft_config)}.")
        if any(adapter_name in layer.merged_adapters for _, layer in self.adapter_layers()):
            # checked before any layer changes (PEFT's message)
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        self._forget_adapter(adapter_name)

    def _forget_adapter(self, adapter_name: str) -> None:
        """The engine's part of deleting an adapter (after its layers dropped it): its modules_to_save copies, its
        config, and the active list (falling back to the first adapter left)."""
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
        """PEFT's rules for gradients: disabling freezes every adapter parameter; enabling re-activates the active
        adapters, which makes them trainable."""
        for _, layer in self.adapter_layers():
            if not enabled and layer.merged:
                layer.unmerge()
            layer.adapters_disabled = not enabled
            if not enabled:
                for slot in layer.adapter_slots:
                    getattr(layer, slot).requires_grad_(False)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.adapters_disabled = not enabled
            if not enabled:
                wrapper.modules_to_save.requires_grad_(False)
        if enabled and self.active_adapters:
            self.set_adapter(self.active_adapters)

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
        if not self.peft_config:
            raise ValueError(NO_ADAPTERS_MESSAGE)
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
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

        def names_for(layer: AdapterLayer) -> list[str]:
            # no names given: each layer merges the adapters active in it (as PEFT; layers may have been set one by one)
            if adapter_names is not None:
                return names
            return [n for n in layer.active_adapters if n in layer.adapter_configs]
        from peftkit.integrations.quantization import check_mergeable

        for _, layer in layers:  # a quantised base that cannot be re-quantised refuses before anything changes
            if getattr(layer, "merges_base_weight", True):  # (BitFit merges into the bias only)
                check_mergeable(layer.get_base_layer())
        for path, layer in layers:  # refused before any weight changes
            refusal = getattr(layer, "merge_refusal", lambda: None)()
            if refusal and any(n in layer.adapter_configs for n in names_for(layer)):
                raise NotImplementedError(f"{path}: {refusal}")
        already = [n for n in dict.fromkeys(m for _, layer in layers for m in layer.merged_adapters)]
        if already:  # as PEFT warns
            rest = [n for n in names if n not in already]
            if rest:
                warnings.warn(f"Already following adapters were merged {','.join(already)}. You are now additionally "
                              f"merging {','.join(rest)}.")
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        if safe_merge:
            # Check every layer before writing any, so that a failure leaves all base weights untouched.
            for path, layer in layers:
                bad = layer.first_nonfinite_merge(names_for(layer))
                if bad is not None:
                    raise ValueError(
                        f"Merging adapter {bad!r} would put NaN or inf into the weights of {path}; nothing was "
                        "merged. The adapter's weights are broken (check the training run for divergence)."
                    )
        for _, layer in layers:
            layer.merge(names_for(layer))

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
        # innermost first: a layer nested in another (LoRA's target_parameters, nn.MultiheadAttention's out_proj)
        # is unwrapped while its parent path still exists
        for name, layer in reversed(list(self.adapter_layers())):
            parent, attr = _get_parent(self.model, name)
            setattr(parent, attr, layer.get_base_layer())
        self._drop_wrappers()
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
