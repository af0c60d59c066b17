"""Saving and loading adapters of a model sharded by ``torch.distributed`` (FSDP2's ``fully_shard``, tensor
parallel, accelerate's FSDP plugin, DeepSpeed ZeRO-3).

Sharded parameters are ``DTensor`` (FSDP2) or DeepSpeed's partitioned parameters (``ds_tensor`` with an empty
local ``data``). Saving needs the full tensor of every adapter parameter, which is a collective operation: every
rank must ask for the same tensors in the same order. Loading goes the other way: each rank keeps the slice of the
full checkpoint tensor that its shard holds.

Nothing here imports ``torch.distributed`` unless a model actually holds such parameters.
"""

from __future__ import annotations

from typing import Iterable

import torch


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without distributed support
        return None
    return DTensor


def is_dtensor(t: torch.Tensor) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def is_deepspeed_partitioned(t: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data lives partitioned across ranks."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def is_sharded(t: torch.Tensor) -> bool:
    return is_dtensor(t) or is_deepspeed_partitioned(t)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) value of ``t`` as a plain tensor, detached. A collective for sharded tensors: call it on
    every rank, for the same tensors in the same order."""
    t = t.detach() if not is_deepspeed_partitioned(t) else t
    if is_dtensor(t):
        return t.full_tensor().detach()
    if is_deepspeed_partitioned(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.data.detach().clone()
    return t


def distribute_like(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor, the same on every rank) laid out like the sharded tensor ``live``: a DTensor with
    ``live``'s mesh and placements holding this rank's slice. No communication: each rank slices its own copy."""
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=live.device, dtype=live.dtype)
    try:
        return distribute_tensor(value, live.device_mesh, live.placements, src_data_rank=None)
    except TypeError:  # torch without src_data_rank (< 2.7): scatters from rank 0, which holds the same file
        return distribute_tensor(value, live.device_mesh, live.placements)


def copy_into(live: torch.Tensor, value: torch.Tensor) -> None:
    """``live.copy_(value)`` where ``live`` may be sharded and ``value`` is the full tensor (under no_grad)."""
    if is_dtensor(live):
        live.copy_(distribute_like(value, live))
    elif is_deepspeed_partitioned(live):
        import deepspeed

        with deepspeed.zero.GatheredParameters([live], modifier_rank=0):
            if _rank() == 0:
                live.data.copy_(value.to(device=live.device, dtype=live.dtype))
    else:
        live.copy_(value.to(device=live.device, dtype=live.dtype))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Whether this process writes files for a sharded model: global rank 0 (every rank gathers, one writes)."""
    return _rank() == 0


__all__ = ["any_sharded", "copy_into", "distribute_like", "full_tensor", "is_dtensor", "is_sharded", "is_writer"]
