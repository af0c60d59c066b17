"""LoRA layers recompute a normalisation's output in backward instead of keeping it.

A LoRA layer must keep its input ``x`` for the gradient of A (``dA = s * (dy B)^T x``): with a frozen base nothing
else needs it. Where ``x`` is the output of a normalisation (Llama's q/k/v read ``input_layernorm``'s output,
gate/up read ``post_attention_layernorm``'s), the norm's own backward already keeps its input ``h``, so the layer
can keep ``(norm, h)`` instead and recompute ``x = norm(h)`` when the backward needs it: one activation of the
hidden size less per norm and decoder layer, for the price of re-running a norm in the backward. The recomputed
``x`` is bit-for-bit the saved one (same module, same input); if ``h`` or the norm's parameters were changed in
place between forward and backward, the backward stops with an error instead of using a wrong ``x``.

Only plain training is touched: under other saved-tensor hooks (non-reentrant gradient checkpointing, activation
offloading) or without grad, layers save ``x`` as before.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

_SOURCE = "_peftkit_norm_source"


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm")


def _tag(module: nn.Module, args: tuple, out: Any) -> None:
    if torch.compiler.is_compiling():
        return
    if not (torch.is_grad_enabled() and module.training and isinstance(out, torch.Tensor) and len(args) == 1
            and isinstance(args[0], torch.Tensor) and out.is_contiguous()):
        return
    setattr(out, _SOURCE, (module, args[0]))


def tag_norm_outputs(model: nn.Module) -> None:
    """Mark the outputs of the model's normalisations (in training) with the module and input that made them."""
    for module in model.modules():
        if _is_norm(module) and _tag not in module._forward_hooks.values():
            module.register_forward_hook(_tag)


def untag_norm_outputs(model: nn.Module) -> None:
    """Remove the marks' hooks (unload / merge_and_unload give the model back as it was)."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _tag]:
            del module._forward_hooks[key]


class _Recompute:
    __slots__ = ("module", "h", "shape", "versions")

    def __init__(self, module: nn.Module, h: torch.Tensor, shape: torch.Size) -> None:
        self.module, self.h, self.shape = module, h, shape
        self.versions = self._versions()

    def _versions(self) -> tuple:
        return (self.h._version,) + tuple(p._version for p in self.module.parameters(recurse=False))

    def value(self) -> torch.Tensor:
        if self._versions() != self.versions:
            raise RuntimeError(
                f"peftkit: the input or parameters of {type(self.module).__name__} were modified in place between "
                "the forward and the backward, so the LoRA input it produced cannot be recomputed. Do not modify them "
                "in place during a step (or call peftkit.methods.lora.input_recompute.untag_norm_outputs(model))."
            )
        with torch.no_grad():
            return self.module.forward(self.h).reshape(self.shape)


def _key(t: torch.Tensor) -> tuple:
    """What identifies ``x`` among saved tensors: its storage, offset and size (matmul saves a 2-d view of a 3-d
    input). The hooks hold this key, never ``x`` itself (autograd keeps them: a reference would keep ``x``)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype, t.device)


@contextlib.contextmanager
def recompute_input(x: torch.Tensor) -> Iterator[None]:
    """Within this context, tensors saved for backward that are ``x`` are kept as (norm, norm input) instead."""
    source = getattr(x, _SOURCE, None)
    if (source is None or not torch.is_grad_enabled() or not x.is_contiguous()
            or torch._C._autograd._top_saved_tensors_default_hooks(True) is not None):
        yield
        return
    module, h = source
    key = _key(x)
    del x, source

    def pack(t: torch.Tensor) -> Any:
        return _Recompute(module, h, t.shape) if t.is_contiguous() and _key(t) == key else t

    def unpack(p: Any) -> torch.Tensor:
        return p.value() if isinstance(p, _Recompute) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
