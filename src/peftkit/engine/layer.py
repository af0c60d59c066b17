"""The generic adapter layer: wraps one base module and keeps the named adapters of one method.

A method subclasses :class:`AdapterLayer` and supplies only its math:

- ``adapter_slots``: names of the per-adapter containers (``nn.ModuleDict`` / ``nn.ParameterDict``) it creates.
  Parameters under these names are the adapter's trainable, saved parameters; the checkpoint key of
  ``<module>.<slot>.<adapter>.<rest>`` is ``<module>.<slot>.<rest>``.
- ``update_layer(adapter_name, config, **kwargs)``: create the adapter's parameters.
- ``delta_weight(adapter_name)`` for additive methods, or ``merged_weight`` / ``unmerged_weight`` for methods
  whose merge is not an addition.
- ``apply_adapter(adapter_name, x, base_output, *args, **kwargs)``: the unmerged forward of one adapter given the
  input and the output computed so far.

The engine owns everything else: active adapters, merge bookkeeping, disabling, mixed-adapter batches.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.integrations import quantization as _quant

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # in adapter_names=: this row uses no adapter


class MixedBatch:
    """Per-row adapter choice for one forward call: ``names[i]`` is the adapter for row ``i``."""

    def __init__(self, names: Sequence[str], expandable: bool = False):
        self.names = list(names)
        # generate() repeats each row k times (beam search, num_return_sequences) after the encoder has run, so a
        # layer may see k * len(names) rows: row j then belongs to names[j // k] (repeat_interleave order).
        self.expandable = expandable
        self._groups: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            self._groups.setdefault(n, []).append(i)
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._expanded: dict[int, "MixedBatch"] = {}

    def __len__(self) -> int:
        return len(self.names)

    def for_rows(self, rows: int) -> "MixedBatch":
        """This batch, or its row-repeated version when a generate() call expanded the inputs to ``rows`` rows."""
        n = len(self.names)
        if rows == n:
            return self
        if self.expandable and n and rows % n == 0:
            if rows not in self._expanded:
                k = rows // n
                self._expanded[rows] = MixedBatch([name for name in self.names for _ in range(k)])
            return self._expanded[rows]
        raise ValueError(
            f"adapter_names has {n} entries but the batch has {rows} rows; give one adapter name per row."
        )

    @property
    def groups(self) -> dict[str, list[int]]:
        return self._groups

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(self._groups[name], device=device, dtype=torch.long)
        return self._index_cache[key]

    def index_tensor(self, order: Sequence[str], device: torch.device) -> torch.Tensor:
        """Row -> position of its adapter in ``order`` (``len(order)`` for rows without adapter)."""
        key = (tuple(order), device)
        if key not in self._index_cache:
            pos = {n: i for i, n in enumerate(order)}
            self._index_cache[key] = torch.tensor(
                [pos.get(n, len(order)) for n in self.names], device=device, dtype=torch.long
            )
        return self._index_cache[key]


def innermost_base(module: nn.Module) -> nn.Module:
    """The original module under any number of adapter-layer wrappers."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


class AdapterLayer(nn.Module):
    """Base class of every layer-wrapping method. See the module docstring for the contract."""

    adapter_slots: tuple[str, ...] = ()
    # Whether a layer casts its input to the adapter's dtype where it does (peftkit.helpers.disable_input_dtype_casting)
    cast_input_dtype_enabled: bool = True
    # Per-adapter containers that hold no trainable state (dropout modules, buffers); deleted with the adapter.
    aux_slots: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled: bool = False
        self.mixed_batch: Optional[MixedBatch] = None  # set by the engine for the duration of one call
        self.adapter_configs: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ introspection
    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` of a wrapped layer keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        return innermost_base(self.base_layer)

    # ---- PEFT's BaseTunerLayer names (peftkit.tuners.tuners_utils.BaseTunerLayer is this class)
    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """The per-adapter containers of trainable tensors (PEFT's name for ``adapter_slots``)."""
        return self.adapter_slots

    @property
    def other_param_names(self) -> tuple[str, ...]:
        """The other per-adapter attributes, deleted with the adapter (PEFT's name; ``aux_slots`` here)."""
        return self.aux_slots

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self.adapters_disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Enable or disable this layer's adapters (PEFT's rules: disabling freezes them, enabling re-activates the
        active ones, which makes them trainable)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self.adapters_disabled = False
        else:
            for slot in self.adapter_slots:
                getattr(self, slot).requires_grad_(False)
            self.adapters_disabled = True

    def _all_available_adapter_names(self) -> list[str]:
        """Sorted names of the adapters this layer holds (PEFT's name)."""
        return sorted(self.adapter_configs)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's weight update in the base weight's layout (PEFT's name for :meth:`delta_weight`)."""
        return self.delta_weight(adapter_name)

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name within this layer, parameter) of one adapter."""
        for slot in self.adapter_slots:
            container = getattr(self, slot)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield f"{slot}.{adapter_name}", item
            else:
                for sub, p in item.named_parameters():
                    yield f"{slot}.{adapter_name}.{sub}", p

    # ------------------------------------------------------------------------------------------- method hooks
    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define a delta weight")

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with the adapter folded in. Additive by default."""
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`."""
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Unmerged forward of one adapter: return the new output given input ``x`` and the output so far."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward with the adapters ``names`` applied, unmerged. Methods may override with a fused path."""
        result = _quant.base_forward(self.base_layer, x, *args, **kwargs)  # = base_layer(x) (4-bit: chunked)
        for name in names:
            result = self.apply_adapter(name, x, result, *args, **kwargs)
        return result

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward where row ``i`` uses adapter ``batch.names[i]``. Generic: one sub-batch per adapter."""
        result = self.base_layer(x, *args, **kwargs)
        out = result.clone()
        for name, _ in batch.groups.items():
            if name == BASE_ADAPTER or name not in self.adapter_configs:
                continue
            rows = batch.rows(name, x.device)
            out[rows] = self.apply_adapter(name, x[rows], result[rows], *args, **kwargs)
        return out

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.adapters_disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.mixed_batch is not None:
            if self.merged:
                raise ValueError("adapter_names= cannot be used while adapters are merged; call unmerge_adapter() first.")
            return self.forward_mixed(x, self.mixed_batch.for_rows(x.shape[0]), *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.adapter_configs]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self.forward_adapters(x, names, *args, **kwargs)

    # ------------------------------------------------------------------------------------------- management
    def set_adapter(self, names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        if isinstance(names, str):  # one name, as PEFT's layers accept (transformers' set_adapter passes one)
            names = [names]
        self.active_adapters = [n for n in names]
        for name in self.adapter_configs:
            requires_grad = name in names and not inference_mode
            for _, p in self.adapter_parameters(name):
                p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged; unmerge it before deleting it.")
        for slot in self.adapter_slots + self.aux_slots:
            container = getattr(self, slot)
            if adapter_name in container:
                del container[adapter_name]
        self.adapter_configs.pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def _weight_param(self) -> nn.Parameter:
        return self.get_base_layer().weight

    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        """Dry run of :meth:`merge`: the first adapter whose merge would make the weights NaN/inf, or None."""
        weight = self._weight_param().data
        if _quant.is_quantized(self.get_base_layer()):  # a quantised base: check the dequantised weight
            weight = _quant.dequantize(self.get_base_layer())
        with torch.no_grad():
            for name in adapter_names:
                if name not in self.adapter_configs or name in self.merged_adapters:
                    continue
                weight = self.merged_weight(name, weight)
                if not torch.isfinite(weight).all():
                    return name
        return None

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for name in names:
            if name not in self.adapter_configs or name in self.merged_adapters:
                continue
            if _quant.is_quantized(self.get_base_layer()):  # dequantise, merge, re-quantise (error reported)
                _quant.merge_quantized(self, name, safe_merge=safe_merge)
                self.merged_adapters.append(name)
                continue
            weight = self._weight_param()
            with torch.no_grad():
                new = self.merged_weight(name, weight.data)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(
                        f"Merging adapter {name!r} would put NaN or inf into the base weights; nothing was changed."
                    )
                weight.data.copy_(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if _quant.is_quantized(self.get_base_layer()):
                _quant.merge_quantized(self, name, unmerge=True)
                continue
            weight = self._weight_param()
            with torch.no_grad():
                weight.data.copy_(self.unmerged_weight(name, weight.data))

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy of a module (e.g. the classifier head) per adapter, saved with the adapter.

    ``original_module`` stays frozen; ``modules_to_save[name]`` is used while adapter ``name`` is active.
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.adapters_disabled = False
        self.mixed_batch: Optional[MixedBatch] = None
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        if isinstance(names, str):
            names = [names]
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper (one trained copy of "
                             f"the module is used at a time), got {present}.")
        self.active_adapter = present[0] if present else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def active_adapters(self) -> list[str]:  # PEFT's AuxiliaryTrainingWrapper names
        return [self.active_adapter] if self.active_adapter is not None else []

    @property
    def _adapters(self) -> set[str]:
        return set(self.modules_to_save)

    adapter_layer_names = ("modules_to_save",)  # PEFT's names: the per-adapter container of trainable copies
    other_param_names: tuple[str, ...] = ()

    def enable_adapters(self, enabled: bool) -> None:
        """Use the active adapter's copy (``True``) or the original module (``False``, the copies freeze)."""
        if enabled:
            self.adapters_disabled = False
            if self.active_adapter is not None:
                self.modules_to_save[self.active_adapter].requires_grad_(True)
        else:
            self.modules_to_save.requires_grad_(False)
            self.adapters_disabled = True

    def _active_module(self) -> nn.Module:
        if self.active_adapter is not None and self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    @property
    def weight(self) -> Any:  # the copy in use, as in PEFT (so tied-weight and introspection code sees it)
        return self._active_module().weight

    @property
    def bias(self) -> Any:
        return getattr(self._active_module(), "bias", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.adapters_disabled or (self.active_adapter is None and self.mixed_batch is None):
            return self.original_module(*args, **kwargs)
        if self.mixed_batch is not None:
            return self._forward_mixed(args, kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _forward_mixed(self, args: tuple, kwargs: dict) -> Any:
        # the first input (positional, or the first keyword tensor) is split by rows; the rest is passed as is
        if args:
            x, where = args[0], None
        else:
            where = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            x = kwargs[where] if where is not None else None
        kind = type(self.original_module).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"adapter_names= (one adapter per row) needs a tensor input for the modules_to_save "
                            f"module {kind}; it got none.")

        def call(module: nn.Module, rows: Optional[torch.Tensor]) -> Any:
            xr = x if rows is None else x[rows]
            if where is None:
                return module(xr, *args[1:], **kwargs)
            return module(*args, **{**kwargs, where: xr})

        batch = self.mixed_batch.for_rows(x.shape[0])
        result = call(self.original_module, None)
        if not isinstance(result, torch.Tensor) or result.dim() == 0 or result.shape[0] != x.shape[0]:
            got = type(result).__name__ if not isinstance(result, torch.Tensor) else f"a tensor of shape {tuple(result.shape)}"
            raise TypeError(
                f"adapter_names= (one adapter per row) cannot route the modules_to_save module {kind}: its output is "
                f"{got}, not one tensor row per input row. Use one adapter per call (set_adapter) for this model."
            )
        out = result.clone()
        for name in batch.groups:
            if name in self.modules_to_save:
                rows = batch.rows(name, x.device)
                out[rows] = call(self.modules_to_save[name], rows)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Optional[Sequence[str]], expandable: bool = False) -> Iterator[None]:
    """For one call, make each adapter layer apply ``adapter_names[i]`` to row ``i``.

    ``expandable=True`` (generate) lets layers see each row repeated k times in a row (beams, several sequences).
    """
    if adapter_names is None:
        yield
        return
    batch = MixedBatch(adapter_names, expandable=expandable)
    layers = [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    for m in layers:
        m.mixed_batch = batch
    try:
        yield
    finally:
        for m in layers:
            m.mixed_batch = None
