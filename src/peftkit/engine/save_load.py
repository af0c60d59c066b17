"""Adapter state dicts in Hugging Face PEFT's key layout.

Inside the model, adapter ``a`` of a wrapped module ``P`` keeps its parameters under ``P.<slot>.a[.rest]``
(``P.lora_A.a.weight``). In a checkpoint the adapter name is dropped: ``base_model.model.P.<slot>[.rest]``.
A ``modules_to_save`` copy ``P.modules_to_save.a.<param>`` is stored as ``base_model.model.P.<param>``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.integrations.distributed import copy_into, full_tensor

if TYPE_CHECKING:
    from peftkit.engine.tuner import AdapterModel

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "base_model.model."


def _strip_adapter(local_name: str, adapter_name: str) -> str:
    slot, rest = local_name.split(".", 1)
    if rest == adapter_name:
        return slot
    assert rest.startswith(adapter_name + "."), (local_name, adapter_name)
    return f"{slot}.{rest[len(adapter_name) + 1:]}"


def adapter_parameter_map(model: "AdapterModel", adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint key (without ``base_model.model.``) -> live tensor in the model, for one adapter."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.adapter_layers():
        for local, p in layer.adapter_parameters(adapter_name):
            out[f"{path}.{_strip_adapter(local, adapter_name)}"] = p
        for local, buf in getattr(layer, "adapter_buffers", lambda _n: [])(adapter_name):
            out[f"{path}.{_strip_adapter(local, adapter_name)}"] = buf
    for path, wrapper in model.modules_to_save_wrappers():
        if adapter_name in wrapper.modules_to_save:
            for name, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{path}.{name}"] = p
    config = model.peft_config[adapter_name]
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for name, p in model.model.named_parameters():
            if name.endswith("bias") and ".modules_to_save." not in name and ".original_module." not in name:
                out.setdefault(name, p)
    elif bias.endswith("_only"):
        for path, layer in model.adapter_layers():
            for name, p in layer.base_layer.named_parameters(prefix=f"{path}.base_layer"):
                if name.endswith("bias"):
                    out[name] = p
    out.update(model.extra_adapter_tensors(adapter_name))
    return out


def get_adapter_state_dict(model: "AdapterModel", adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as in a PEFT checkpoint."""
    # sharded parameters (FSDP2 DTensor, DeepSpeed ZeRO-3) are gathered: a collective, every rank calls it
    tensors = {k: full_tensor(v) for k, v in adapter_parameter_map(model, adapter_name).items()}
    tensors = model.adapter_tensors_to_save(adapter_name, tensors)
    out = {CHECKPOINT_PREFIX + k: v for k, v in tensors.items()}
    out.update({k: v.detach() for k, v in model.engine_adapter_tensors(adapter_name).items()})
    return out


def _embedding_base_map(model: "AdapterModel") -> dict[str, torch.Tensor]:
    """Keys under which Hugging Face PEFT saves the base input/output embeddings (its ``save_embedding_layers``,
    on by default when an embedding is targeted or the vocabulary was resized) -> the live base weight."""
    inner = model.model
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(inner, getter, None)
        try:
            module = fn() if callable(fn) else None
        except Exception:  # models without embeddings raise NotImplementedError
            module = None
        if module is not None:
            wanted.append(module)
    out: dict[str, torch.Tensor] = {}
    for path, module in inner.named_modules():
        if not any(module is w for w in wanted):
            continue
        if isinstance(module, AdapterLayer):
            base = module.get_base_layer()
            out[f"{path}.base_layer.weight"] = base.weight
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            out[f"{path}.weight"] = module.weight
    return out


def set_adapter_state_dict(model: "AdapterModel", state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy a PEFT-layout checkpoint into adapter ``adapter_name``. Nothing is written unless every shape fits.

    Base embedding weights that PEFT stores next to the adapter are copied into the base model, as PEFT does.
    """
    targets = adapter_parameter_map(model, adapter_name)
    engine = model.engine_adapter_tensors(adapter_name)  # full checkpoint keys
    base_embeddings: dict[str, torch.Tensor] = {}
    plan = []
    unexpected = []
    for key, value in state_dict.items():
        if key in engine:
            short, targets_for_key = key, engine
        else:
            short = key[len(CHECKPOINT_PREFIX):] if key.startswith(CHECKPOINT_PREFIX) else key
            targets_for_key = targets
        if short not in targets_for_key:
            if not base_embeddings:
                base_embeddings = _embedding_base_map(model)
            if short in base_embeddings:
                live = base_embeddings[short]
                if tuple(live.shape) != tuple(value.shape):
                    raise ValueError(
                        f"Checkpoint tensor {key} (a base embedding) has shape {tuple(value.shape)}, but the model's "
                        f"is {tuple(live.shape)}. If the vocabulary was resized for training, call "
                        f"model.resize_token_embeddings({value.shape[0]}) on the base model before loading."
                    )
                plan.append((live, value))
                continue
            unexpected.append(key)
            continue
        live = targets_for_key[short]
        if tuple(getattr(live, "ds_shape", live.shape)) != tuple(value.shape):  # ds_shape: DeepSpeed ZeRO-3
            raise ValueError(
                f"Checkpoint tensor {key} has shape {tuple(value.shape)}, but the model expects {tuple(live.shape)}. "
                "The adapter was trained for a different base model or a different configuration (rank, targets)."
            )
        plan.append((live, value))
    if not plan:
        sample = ", ".join(list(state_dict)[:3])
        expected = ", ".join(CHECKPOINT_PREFIX + k for k in list(targets)[:3])
        raise ValueError(
            f"No tensor of the checkpoint fits the model (checkpoint keys look like {sample}; the model expects "
            f"keys like {expected}). Is this adapter for another base model?"
        )
    if any(live.is_meta for live, _ in plan):
        # copy_ into a meta tensor is a silent no-op: the adapter would look loaded and compute nothing
        raise ValueError(
            "The model is on the meta device (built without memory); materialise it first, e.g. "
            "model.to_empty(device='cpu') and load its base weights, then load the adapter."
        )
    loaded = {id(live) for live, _ in plan}
    missing = [CHECKPOINT_PREFIX + k for k, t in targets.items() if id(t) not in loaded]
    missing += [k for k, t in engine.items() if id(t) not in loaded]
    if unexpected:
        logger.warning("Checkpoint tensors not used by the model: %s", ", ".join(unexpected[:10]))
    if missing:
        logger.warning("Adapter tensors not found in the checkpoint (left as initialised): %s", ", ".join(missing[:10]))
    with torch.no_grad():
        for live, value in plan:
            copy_into(live, value)  # a sharded parameter (FSDP2, ZeRO-3) keeps its own slice
    model.after_adapter_loaded(adapter_name)


__all__ = ["get_adapter_state_dict", "set_adapter_state_dict", "CHECKPOINT_PREFIX", "ModulesToSaveWrapper"]
