"""Adapter state dicts in Hugging Face PEFT's key layout.

Inside the model, adapter ``a`` of a wrapped module ``P`` keeps its parameters under ``P.<slot>.a[.rest]``
(``P.lora_A.a.weight``). In a checkpoint the adapter name is dropped: ``base_model.model.P.<slot>[.rest]``.
A ``modules_to_save`` copy ``P.modules_to_save.a.<param>`` is stored as ``base_model.model.P.<param>``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

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
    # PeftMixedModel: a layer nested in another method's layer is saved under the module's own path, as a
    # single-method model saves it ("<module>.base_layer.hada_w1" -> "<module>.hada_w1"); other engines keep theirs
    flatten = getattr(type(model), "flatten_nested_layer_paths", False)
    layer_paths = {path for path, _ in model.adapter_layers()} if flatten else set()
    for path, layer in model.adapter_layers():
        while flatten and path.endswith(".base_layer") and path[: -len(".base_layer")] in layer_paths:
            path = path[: -len(".base_layer")]
        for local, p in layer.adapter_parameters(adapter_name):
            out[f"{path}.{_strip_adapter(local, adapter_name)}"] = p
        for local, buf in getattr(layer, "adapter_buffers", lambda _n: [])(adapter_name):
            out[f"{path}.{_strip_adapter(local, adapter_name)}"] = buf
    for path, wrapper in model.modules_to_save_wrappers():
        if adapter_name in wrapper.modules_to_save:
            # parameters and persistent buffers (a norm's running statistics), as in the module's state_dict
            for name, t in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{path}.{name}"] = t
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
    prefix = getattr(type(model), "checkpoint_prefix", CHECKPOINT_PREFIX)
    out = {prefix + k: v for k, v in tensors.items()}
    out.update({k: full_tensor(v) for k, v in model.engine_adapter_tensors(adapter_name).items()})
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


def _base_tensor_map(model: "AdapterModel") -> dict[str, torch.Tensor]:
    """Path (relative to the wrapped model) -> tensor, for the model's own tensors that belong to no adapter (base
    layers' weights and biases, buffers)."""
    adapter_ids = set()
    for _, layer in model.adapter_layers():
        for slot in layer.adapter_slots + layer.aux_slots:
            adapter_ids.update(id(t) for t in getattr(layer, slot).state_dict(keep_vars=True).values())
    for _, wrapper in model.modules_to_save_wrappers():
        adapter_ids.update(id(t) for t in wrapper.modules_to_save.state_dict(keep_vars=True).values())
    return {k: t for k, t in model.model.state_dict(keep_vars=True).items() if id(t) not in adapter_ids}


class LoadResult(NamedTuple):
    """What a load did not use (``unexpected_keys``, checkpoint keys) and what it did not fill (``missing_keys``,
    the adapter's parameter names in the model, e.g. ``base_model.model.q.lora_A.default.weight``), as PEFT's
    ``load_adapter`` reports them."""

    missing_keys: list
    unexpected_keys: list


def _check_value(key: str, live: torch.Tensor, value: torch.Tensor, allow_nonfinite: bool) -> None:
    """Refuse a checkpoint tensor whose kind (float / integer / bool) differs from the model's, or that holds
    NaN/inf: a cast or a NaN would load silently and give wrong outputs."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"Checkpoint entry {key} is a {type(value).__name__}, not a tensor.")
    kind = lambda t: "bool" if t.dtype == torch.bool else ("float" if (t.dtype.is_floating_point or t.dtype.is_complex) else "integer")  # noqa: E731
    if kind(live) != kind(value):
        raise ValueError(
            f"Checkpoint tensor {key} has dtype {value.dtype}, but the model's tensor is {live.dtype}; casting "
            f"{kind(value)} values to {kind(live)} would change them silently. The checkpoint is corrupt or was "
            "written for another model; re-save it with float weights."
        )
    if not allow_nonfinite and kind(value) == "float" and value.numel() and not bool(torch.isfinite(value).all()):
        n_bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"Checkpoint tensor {key} holds {n_bad} NaN/inf value(s) of {value.numel()}; the adapter's training "
            "diverged or the file is corrupt. Pass allow_nonfinite=True to load it anyway."
        )


def set_adapter_state_dict(
    model: "AdapterModel",
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    ignore_mismatched_sizes: bool = False,
    *,
    allow_nonfinite: bool = False,
    allow_missing_keys: bool = False,
) -> "LoadResult":
    """Copy a PEFT-layout checkpoint into adapter ``adapter_name``. Nothing is written unless every tensor fits.

    Refused, naming the key: a shape that does not fit, a tensor of another kind (integer/bool for float), NaN or
    inf values (``allow_nonfinite=True`` allows them), an adapter tensor the checkpoint lacks
    (``allow_missing_keys=True`` keeps its initial value instead, with a warning). With
    ``ignore_mismatched_sizes=True`` tensors of another shape are skipped with a warning and reported as missing,
    as in PEFT. Returns what was not used and not filled (:class:`LoadResult`).
    Base embedding weights that PEFT stores next to the adapter are copied into the base model, as PEFT does.
    """
    mismatched = []
    targets = adapter_parameter_map(model, adapter_name)
    engine = model.engine_adapter_tensors(adapter_name)  # full checkpoint keys
    prefix = getattr(type(model), "checkpoint_prefix", CHECKPOINT_PREFIX)
    base_embeddings: dict[str, torch.Tensor] = {}
    base_tensors = None
    plan = []
    unexpected = []
    for key, value in state_dict.items():
        if key in engine:
            short, targets_for_key = key, engine
        else:
            short = key[len(prefix):] if key.startswith(prefix) else key
            targets_for_key = targets
        if short not in targets_for_key:
            if not base_embeddings:
                base_embeddings = _embedding_base_map(model)
            if base_tensors is None:
                base_tensors = _base_tensor_map(model)
            if short not in base_embeddings and short in base_tensors:
                # a tensor of the base model under its own path (e.g. biases saved with bias="all" loaded into an
                # adapter configured without): PEFT loads it into the model, so do we (checked like the rest)
                live = base_tensors[short]
                if tuple(live.shape) != tuple(value.shape):
                    raise ValueError(f"Checkpoint tensor {key} (a base model tensor) has shape {tuple(value.shape)}, "
                                     f"but the model's is {tuple(live.shape)}; nothing was loaded.")
                _check_value(key, live, value, allow_nonfinite)
                plan.append((live, value))
                continue
            if short in base_embeddings:
                live = base_embeddings[short]
                if tuple(live.shape) != tuple(value.shape):
                    raise ValueError(
                        f"Checkpoint tensor {key} (a base embedding) has shape {tuple(value.shape)}, but the model's "
                        f"is {tuple(live.shape)}. If the vocabulary was resized for training, call "
                        f"model.resize_token_embeddings({value.shape[0]}) on the base model before loading."
                    )
                _check_value(key, live, value, allow_nonfinite)
                plan.append((live, value))
                continue
            unexpected.append(key)
            continue
        live = targets_for_key[short]
        live_shape = tuple(getattr(live, "ds_shape", live.shape))  # ds_shape: DeepSpeed ZeRO-3 partitions
        if live_shape != tuple(value.shape) and ignore_mismatched_sizes:
            mismatched.append((id(live), f"{key}: checkpoint {tuple(value.shape)}, model {live_shape}"))
            continue
        if live_shape != tuple(value.shape):
            raise ValueError(
                f"Checkpoint tensor {key} has shape {tuple(value.shape)}, but the model expects {tuple(live.shape)}. "
                "The adapter was trained for a different base model or a different configuration (rank, targets)."
            )
        _check_value(key, live, value, allow_nonfinite)
        plan.append((live, value))
    if not plan and not mismatched:
        sample = ", ".join(list(state_dict)[:3])
        expected = ", ".join([prefix + k for k in list(targets)[:3]] + list(engine)[:3])
        raise ValueError(
            f"No tensor of the checkpoint fits the model (checkpoint keys look like {sample}; the model expects "
            f"keys like {expected}). Is this adapter for another base model?"
        )
    if any(live.is_meta for live, _ in plan):
        # copy_ into a meta tensor is a silent no-op: the adapter would look loaded and compute nothing
        raise ValueError(
            "The model is on the meta device (built without memory); materialise it first, e.g. "
            "model.to_empty(device='cpu') and load its base weights, then load the adapter (an adapter injected "
            "with low_cpu_mem_usage=True loads with set_peft_model_state_dict(..., low_cpu_mem_usage=True))."
        )
    loaded = {id(live) for live, _ in plan}
    skipped = {i for i, _ in mismatched}  # the user asked for these to keep their initial values
    missing = [prefix + k for k, t in targets.items() if id(t) not in loaded and id(t) not in skipped]
    missing += [k for k, t in engine.items() if id(t) not in loaded and id(t) not in skipped]
    # A modules_to_save copy the checkpoint lacks keeps the base module's own values (not a random init), as in
    # PEFT, whose checkpoints of some methods (Llama-Adapter on a classifier) never hold the head: warn only.
    copies = {id(t) for _, w in model.modules_to_save_wrappers() for t in w.modules_to_save.parameters()}
    copies |= {id(t) for _, w in model.modules_to_save_wrappers() for t in w.modules_to_save.buffers()}
    kept_base = [prefix + k for k, t in targets.items() if id(t) not in loaded and id(t) in copies]
    if kept_base:
        logger.warning("Checkpoint has no tensors for these modules_to_save copies; they keep the base module's "
                       "values: %s", ", ".join(kept_base[:10]))
        missing = [k for k in missing if k not in set(kept_base)]
    if unexpected:
        logger.warning("Checkpoint tensors not used by the model: %s", ", ".join(unexpected[:10]))
    if missing and not allow_missing_keys:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} tensor(s) of the adapter, e.g. {', '.join(missing[:5])}; they would "
            "keep their initial (possibly random) values. The file is incomplete or was written for another "
            "configuration. Pass allow_missing_keys=True to load it anyway."
        )
    if missing:
        logger.warning("Adapter tensors not found in the checkpoint (left as initialised): %s", ", ".join(missing[:10]))
    if mismatched:
        logger.warning("Skipped checkpoint tensors of another shape (ignore_mismatched_sizes=True; left as "
                       "initialised): %s", "; ".join(m for _, m in mismatched[:10]))
    with torch.no_grad():
        for live, value in plan:
            copy_into(live, value)  # a sharded parameter (FSDP2, ZeRO-3) keeps its own slice
    model.after_adapter_loaded(adapter_name)
    names = {id(t): f"base_model.{n}" for n, t in model.state_dict(keep_vars=True).items()}
    from peftkit.engine.registry import method_for_config

    method_prefix = method_for_config(model.peft_config[adapter_name]).prefix  # this adapter's method (mixed models)
    missing_names = [names.get(id(t), prefix + k) for k, t in targets.items() if id(t) not in loaded]
    # as PEFT: only the adapter layers' own tensors count as missing (not modules_to_save copies)
    missing_names = [n for n in missing_names if method_prefix in n and adapter_name in n]
    return LoadResult(missing_names, list(unexpected))


__all__ = ["get_adapter_state_dict", "set_adapter_state_dict", "LoadResult", "CHECKPOINT_PREFIX", "ModulesToSaveWrapper"]
