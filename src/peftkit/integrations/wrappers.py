"""Finding a peftkit model inside the wrappers that training tools put around it.

``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` accept what a training script holds: the model itself
or the model wrapped by ``torch.nn.parallel.DistributedDataParallel``, ``torch.nn.DataParallel``, FSDP v1's
``FullyShardedDataParallel`` (any sharding strategy, ``use_orig_params=True``), ``torch.compile``'s
``OptimizedModule``, DeepSpeed's engine or accelerate's ``prepare`` (which returns one of these). Each wrapper
keeps the wrapped module as ``.module`` (``._orig_mod`` for ``torch.compile``); nesting is allowed.

FSDP v1 keeps parameters as slices of flat, sharded storage: reading or writing adapter tensors happens inside
``FullyShardedDataParallel.summon_full_params`` of every root FSDP unit (a collective: call it on every rank), and
FSDP's module name ``_fsdp_wrapped_module`` (and activation checkpointing's ``_checkpoint_wrapped_module``) is left
out of checkpoint keys, so a checkpoint taken under FSDP loads into a plain model and back.

Nothing here imports ``torch.distributed`` unless the model holds an FSDP unit.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

import torch.nn as nn

# module names that wrappers insert into parameter paths; checkpoints never contain them
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

_WRAPPER_TYPES = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
                  "PipelineEngine", "OptimizedModule")


def clean_key(key: str) -> str:
    """``key`` without the module names that wrappers insert (``a._fsdp_wrapped_module.b`` -> ``a.b``)."""
    for infix in WRAPPER_INFIXES:
        if infix in key:
            key = key.replace(infix, "")
    return key


def _inner(module: nn.Module) -> Optional[nn.Module]:
    """The module a known wrapper wraps, or None when ``module`` is no wrapper."""
    orig = module.__dict__.get("_orig_mod") or module._modules.get("_orig_mod")
    if isinstance(orig, nn.Module):  # torch.compile
        return orig
    if type(module).__name__ in _WRAPPER_TYPES or hasattr(module, "_fsdp_wrapped_module"):
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module) and inner is not module:
            return inner
    return None


def unwrap(model: nn.Module, holds_adapters) -> tuple[nn.Module, list[str]]:
    """The innermost module of the wrapper chain around ``model`` for which ``holds_adapters(module)`` is true,
    and the attribute names walked to reach it (``["module"]`` for DDP). ``model`` itself when it holds adapters
    or is no wrapper."""
    path: list[str] = []
    current = model
    while not holds_adapters(current):
        inner = _inner(current)
        if inner is None:
            return model, []
        path.append("_orig_mod" if inner is getattr(current, "_orig_mod", None) else "module")
        current = inner
    return current, path


def _fsdp_roots(model: nn.Module) -> list[nn.Module]:
    if "torch.distributed.fsdp" not in sys.modules:
        return []  # FSDP never imported: no unit can exist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return list(FSDP.fsdp_modules(model, root_only=True))


def has_fsdp(model: nn.Module) -> bool:
    return bool(_fsdp_roots(model))


@contextlib.contextmanager
def full_params(model: nn.Module, writeback: bool) -> Iterator[bool]:
    """Inside: every FSDP v1 unit in ``model`` (the outermost wrapper) shows its full, unsharded parameters under
    their original names; with ``writeback`` changes made to them are kept on exit. Yields whether any FSDP unit was
    found (then tensors read inside must be cloned: the unsharded storage is freed on exit)."""
    roots = _fsdp_roots(model)
    if not roots:
        yield False
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for root in roots:
        if not getattr(root, "_use_orig_params", True):
            raise ValueError(
                "This FullyShardedDataParallel model was wrapped with use_orig_params=False: its adapter parameters "
                "exist only inside FSDP's flat parameter. Wrap it with FullyShardedDataParallel(model, "
                "use_orig_params=True) (as PEFT requires too), or save through FSDP's own state_dict API."
            )
    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(FSDP.summon_full_params(root, writeback=writeback, recurse=True))
        yield True


__all__ = ["WRAPPER_INFIXES", "clean_key", "full_params", "has_fsdp", "unwrap"]
