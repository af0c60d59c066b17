"""LoRA on bare ``nn.Parameter`` tensors (``LoraConfig.target_parameters``), e.g. the stacked expert weights of a
mixture-of-experts block, which are used by the module's own forward instead of through an ``nn.Linear``.

The module that owns the parameter is wrapped by :class:`ParamWrapper` (one wrapper per parameter; a second
parameter of the same module nests a second wrapper around the first, as in Hugging Face PEFT, so checkpoint keys
read ``<module>.lora_A.weight`` and ``<module>.base_layer.lora_A.weight``). During the wrapper's forward the
parameter is replaced, through ``torch.nn.utils.parametrize``, by ``W + scaling * delta``; the owner's forward runs
unchanged. Outside of a forward, ``module.<param>`` is the plain base tensor.

Shapes (as PEFT): a 2-d parameter (out, in) gets A (r, in) and B (out, r), delta = B @ A. A 3-d parameter of E
experts, stored (E, d1, d2), gets A (r*E, d2) and B (d1, r*E) with delta[e] = B[:, e::E-interleaved] @ A[e-block],
i.e. A viewed (E, r, d2) and B viewed (d1, r, E); if the owner module has ``is_transposed = True`` the roles of d1
and d2 are exchanged (A (r*E, d1), B (d2, r*E), delta[e] = (B_e @ A_e)^T).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from peftkit.engine.layer import AdapterLayer, MixedBatch, innermost_base
from peftkit.methods.common import adapter_dtype, pattern_value
from peftkit.methods.lora import lora_ops


class _AddDelta(nn.Module):
    """The parametrization: W -> W + delta (delta computed by the wrapper for this forward)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


@contextmanager
def added_delta(module: nn.Module, pname: str, delta: Optional[torch.Tensor]) -> Iterator[None]:
    """For the duration of the block, ``module.<pname>`` reads as the parameter plus ``delta`` (a
    ``torch.nn.utils.parametrize`` parametrization, removed afterwards; the parameter object itself is kept, so
    optimizers and state dicts are unaffected). ``delta=None``: no change."""
    if delta is None:
        yield
        return
    requires_grad = (module.parametrizations[pname].original if parametrize.is_parametrized(module, pname)
                     else getattr(module, pname)).requires_grad
    proxy = _AddDelta(delta)
    parametrize.register_parametrization(module, pname, proxy, unsafe=True)
    module.parametrizations[pname].original.requires_grad_(requires_grad)
    try:
        with parametrize.cached():
            yield
    finally:
        plist = module.parametrizations[pname]
        if len(plist) == 1:
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
        else:  # another parametrization (e.g. weight norm, or an outer wrapper's) stays in place
            for i in reversed(range(len(plist))):
                if plist[i] is proxy:
                    del plist[i]
                    break


class ParamWrapper(AdapterLayer):
    """LoRA on the parameter ``parameter_name`` of the wrapped module (see the module docstring)."""

    adapter_slots = ("lora_A", "lora_B")
    aux_slots = ("lora_dropout",)

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        param = self.get_param()
        shape = tuple(getattr(param, "ds_shape", param.shape))
        self.transposed = bool(getattr(innermost_base(base_layer), "is_transposed", False))
        if len(shape) == 2:
            self.num_experts, self.in_features, self.out_features = 1, shape[1], shape[0]
        elif len(shape) == 3:
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if self.transposed else (shape[2], shape[1])
        else:
            raise ValueError(
                f"target_parameters: {parameter_name!r} of {type(innermost_base(base_layer)).__name__} has "
                f"{len(shape)} dimensions; LoRA on a parameter supports 2-d (out, in) and 3-d (experts, ., .) tensors."
            )

    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def _weight_param(self) -> nn.Parameter:
        base = self.get_base_layer()
        if parametrize.is_parametrized(base, self.parameter_name):
            return base.parametrizations[self.parameter_name].original
        return getattr(base, self.parameter_name)

    # ------------------------------------------------------------------------------------------- creation
    def update_layer(self, adapter_name: str, config: Any, module_name: str = "", loading: bool = False) -> None:
        where = f"{module_name}.{self.parameter_name}" if module_name else self.parameter_name
        for bad, what in ((float(config.lora_dropout) != 0.0, "lora_dropout != 0 (dropout of the input cannot be "
                           "factored out of the parameter)"), (config.fan_in_fan_out, "fan_in_fan_out=True"),
                          (getattr(config, "lora_bias", False), "lora_bias=True"), (config.use_dora, "use_dora=True")):
            if bad:
                raise ValueError(f"LoRA on the parameter {where} (target_parameters) does not work with {what}, as in "
                                 "PEFT; change that field or target the module with target_modules instead.")
        init = config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise ValueError(f"LoRA on the parameter {where} (target_parameters) supports init_lora_weights True, "
                             f"False or 'gaussian', got {init!r}.")
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        from peftkit.methods.lora.lora import lora_scaling

        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        param = self.get_param()
        dtype = adapter_dtype(param)
        e = self.num_experts
        a = nn.Linear(self.in_features, r * e, bias=False, device=param.device, dtype=dtype)
        b = nn.Linear(r * e, self.out_features, bias=False, device=param.device, dtype=dtype)
        if loading:
            nn.init.zeros_(b.weight)
        else:
            lora_ops.init_factors(a.weight, b.weight, init, r)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora, self.lora_bias):
            d.pop(adapter_name, None)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        if adapter_name in self.scaling:
            self.scaling[adapter_name] = self.lora_alpha[adapter_name] / self.r[adapter_name] * scale

    # ---------------------------------------------------------------------------------------------- math
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        s = self.scaling[adapter_name]
        e = self.num_experts
        if e == 1 and self.get_param().dim() == 2:
            delta = (b @ a) * s
        else:
            a3 = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
            b3 = b.reshape(b.shape[0], -1, e)  # (out, r, E)
            delta = torch.einsum("ore,eri->eoi", b3, a3) * s  # (E, out, in)
            if self.transposed:
                delta = delta.transpose(1, 2)
        param = self.get_param()
        return delta.to(param.dtype) if param.dtype.is_floating_point else delta

    # ------------------------------------------------------------------------------------------- forward
    def _parametrized(self, names: Sequence[str]):
        delta = None
        for n in names:
            d = self.delta_weight(n)
            delta = d if delta is None else delta + d
        return added_delta(self.get_base_layer(), self.parameter_name, delta)

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        with self._parametrized(names):
            return self.base_layer(x, *args, **kwargs)

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"lora.ParamWrapper does not support mixed adapter batches yet (adapter_names=, one "
                         f"adapter per row; parameter {self.parameter_name}, target_parameters), as in PEFT; use one "
                         "adapter per call.")

    def __repr__(self) -> str:  # PEFT's repr names the family: lora.ParamWrapper(...)
        return "lora." + super().__repr__()

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, in_features={self.in_features}, "
                f"out_features={self.out_features}, num_experts={self.num_experts}, " + super().extra_repr())


def _strip_base_layer(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "base_layer")


def inject_parameter_targets(engine: Any, adapter_name: str, config: Any, loading: bool = False) -> int:
    """Wrap every parameter ``config.target_parameters`` names (full name or a ``.``-suffix of it); return how many.
    A second adapter must name the same parameters (the nesting of wrappers encodes which is which)."""
    wanted = sorted(set(getattr(config, "target_parameters", None) or ()))
    if not wanted:
        return 0
    for other_name, other in engine.peft_config.items():
        theirs = getattr(other, "target_parameters", None)
        if other is not config and theirs and set(theirs) != set(wanted):
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {wanted} for the new adapter {adapter_name!r} and {sorted(theirs)} for adapter "
                f"{other_name!r}."
            )
    model = engine.model
    matches: list[tuple[str, str]] = []  # (path of the owner module, parameter name), in model order
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer) and not isinstance(module, ParamWrapper):
            continue  # its own parameters are adapter slots; its base layer is visited as <path>.base_layer
        if isinstance(module, ParamWrapper):
            continue
        owner = _strip_base_layer(path)
        own = list(module._parameters)
        if parametrize.is_parametrized(module):
            own += [n for n in module.parametrizations if n not in own]
        for pname in own:
            if getattr(module, pname, None) is None:
                continue
            key = f"{owner}.{pname}" if owner else pname
            if any(key == t or key.endswith("." + t) for t in wanted):
                matches.append((owner, pname))
    count = 0
    for owner, pname in matches:
        if owner == "":
            raise ValueError(f"target_parameters: {pname!r} belongs to the top-level model, which cannot be wrapped; "
                             "target a parameter of a submodule.")
        holder = model.get_submodule(owner)
        if isinstance(holder, AdapterLayer) and not isinstance(holder, ParamWrapper):
            raise ValueError(
                f"target_parameters: {owner}.{pname} belongs to {owner}, which target_modules already adapts; a module "
                "is targeted either as a module or through its parameters. Remove it from one of the two."
            )
        existing = holder
        while isinstance(existing, ParamWrapper) and existing.parameter_name != pname:
            existing = existing.base_layer
        if isinstance(existing, ParamWrapper):
            existing.update_layer(adapter_name, config, module_name=owner, loading=loading)
            existing.adapter_configs[adapter_name] = config
        else:
            wrapper = ParamWrapper(holder, pname)
            wrapper.update_layer(adapter_name, config, module_name=owner, loading=loading)
            wrapper.adapter_configs[adapter_name] = config
            if "." in owner:
                parent_name, attr = owner.rsplit(".", 1)
                setattr(model.get_submodule(parent_name), attr, wrapper)
            else:
                setattr(model, owner, wrapper)
        count += 1
    return count
