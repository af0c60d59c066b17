"""AdapterHub (``adapters``) checkpoint folders: recognise, import, export.

An AdapterHub folder holds ``adapter_config.json`` (``config``, ``model_class``, ``model_type``, ``name``,
``version: "adapters.<x>"``) and ``adapter.safetensors`` or ``pytorch_adapter.bin`` (a flat state dict; loaded with
``weights_only=True``, so no pickled code runs). Its keys are the model's own module paths, e.g.
``encoder.layer.0.output.adapters.<name>.adapter_up.weight`` (BERT), ``layers.0.attention_adapters.adapters.<name>.``
(Llama), possibly behind a head model's prefix (``bert.``); Compacter's shared rule is
``[<prefix>.]shared_parameters.<name>.phm_rule``.

Bottleneck configs (AdapterHub's BnConfig family) and the hybrids MAM and UniPELT (``union`` configs, recognised by
the hybrid configs' ``from_adapterhub``) are supported here; other architectures are refused by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from peftkit.engine.io import atomic_write_text, load_tensors, save_tensors
from peftkit.engine.save_load import CHECKPOINT_PREFIX
from peftkit.engine.sublayer import MH_ADAPTER, CROSS_ADAPTER, OUTPUT_ADAPTER, SublayerAdapterLayer

if TYPE_CHECKING:
    from peftkit.engine.peft_model import PeftModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter.safetensors"
BIN_FILE = "pytorch_adapter.bin"
EXPORT_VERSION = "adapters.1.3.0"

# Where AdapterHub keeps a location's adapters, relative to the block, when it is not the sub-layer module itself.
_BLOCK_LEVEL = {MH_ADAPTER: "attention_adapters", CROSS_ADAPTER: "cross_attention_adapters",
                OUTPUT_ADAPTER: "output_adapters"}
_AT_SUBLAYER = ("bert", "roberta", "xlm-roberta", "t5", "mt5")  # adapters live in the sub-layer module (x_module)
_VIT = {MH_ADAPTER: "attention_adapters", OUTPUT_ADAPTER: "output.output_adapters"}
# Block paths that transformers renamed since the AdapterHub release (ours -> AdapterHub's).
_TAIL_RENAMES = {"vit": ((r"^layers\.", "encoder.layer."),)}


def read_meta(path: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The ``adapter_config.json`` of an AdapterHub folder, or None when ``path`` is not one."""
    cfg = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        return None
    if str(meta.get("version", "")).startswith("adapters.") or ("model_class" in meta and "peft_type" not in meta):
        return meta
    return None


def is_adapterhub_folder(path: Union[str, os.PathLike]) -> bool:
    return os.path.isdir(os.fspath(path)) and read_meta(path) is not None


def weights_file(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    for name in (SAFETENSORS_FILE, BIN_FILE):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    raise FileNotFoundError(f"{path} is an AdapterHub folder without weights: no {SAFETENSORS_FILE} or {BIN_FILE}.")


def config_from_adapterhub(cfg: dict[str, Any]):
    """peftkit's BnConfig for AdapterHub's ``config`` dict; other AdapterHub methods are refused by name."""
    from peftkit.engine.registry import get_method

    arch = cfg.get("architecture")
    if arch in ("union", "prefix_tuning"):  # hybrids (MAM, UniPELT, a prefix alone): the config that recognises it
        from peftkit.engine.hybrid import HybridConfig
        from peftkit.engine.registry import _REGISTRY

        parts = list(cfg.get("configs", [])) if arch == "union" else [cfg]
        for spec in _REGISTRY.values():
            if isinstance(spec.config_cls, type) and issubclass(spec.config_cls, HybridConfig):
                found = spec.config_cls.from_adapterhub(parts)
                if found is not None:
                    return found
    if arch is not None:
        what = arch if arch != "union" else "union of " + ", ".join(
            str(c.get("architecture", "bottleneck")) for c in cfg.get("configs", []))
        raise ValueError(f"This AdapterHub adapter is a {what!r} config; peftkit reads AdapterHub bottleneck adapters "
                         "(SeqBn, DoubleSeqBn, ParBn, Compacter, Compacter++ and BnConfig) only so far.")
    cls = get_method("BOTTLENECK").config_cls
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        logger.warning("Ignoring AdapterHub config keys peftkit does not know: %s", ", ".join(unknown))
    return cls(**{k: v for k, v in cfg.items() if k in known})


def _location_path(model_type: Optional[str], layer: SublayerAdapterLayer, location: str) -> str:
    sub = next(s for s in layer.placement.sublayers if s.location == location)
    if model_type in _AT_SUBLAYER:
        return sub.x_module
    if model_type == "vit":
        return _VIT[location]
    return _BLOCK_LEVEL[location]


def _block_tail(path: str, layer: SublayerAdapterLayer) -> tuple[str, str]:
    """(prefix, tail): the head model's prefix of a block path (``bert.``) and the rest (``encoder.layer.0``)."""
    m = re.fullmatch(layer.placement.block_pattern, path)
    prefix = (m.group(1) or "") if m and m.groups() else ""
    return prefix, path[len(prefix):]


def key_map(peft_model: "PeftModel", adapter_name: str, ah_name: str, ln_before: bool = False
            ) -> tuple[dict[str, str], str]:
    """AdapterHub key suffix (without any head prefix) -> our checkpoint key; and the base-model prefix."""
    engine = peft_model.base_model
    model_type = getattr(getattr(engine.model, "config", None), "model_type", None)
    out: dict[str, str] = {}
    prefix = ""
    for path, layer in engine.adapter_layers():
        if not isinstance(layer, SublayerAdapterLayer):
            continue
        prefix, tail = _block_tail(path, layer)
        for pattern, repl in _TAIL_RENAMES.get(model_type or "", ()):
            tail = re.sub(pattern, repl, tail)
        for sub in layer.placement.sublayers:
            location, slot = sub.location, layer.slot_for(sub.location)
            container = getattr(layer, slot, {})
            if adapter_name not in container:
                continue
            where = f"{tail}.{_location_path(model_type, layer, location)}.adapters.{ah_name}."
            for rest, _ in container[adapter_name].named_parameters():
                ours = f"{CHECKPOINT_PREFIX}{path}.{slot}.{rest}"
                out[where + rest] = ours
                if ln_before and rest.startswith("adapter_down.0."):
                    out[where + "adapter_norm_before." + rest[len("adapter_down.0."):]] = ours
    if hasattr(engine, "adapterhub_key_map"):  # hybrids: their LoRA layers, prefix and gates
        if not prefix:  # no bottleneck block to read the head model's prefix from (a prefix alone)
            name = getattr(engine.model, "base_model_prefix", "")
            prefix = f"{name}." if name and isinstance(getattr(engine.model, name, None), torch.nn.Module) else ""
        out.update(engine.adapterhub_key_map(adapter_name, ah_name, prefix))
        return out, prefix
    for key in engine.engine_adapter_tensors(adapter_name):  # Compacter's shared rule
        out[f"shared_parameters.{ah_name}.{key.rsplit('.', 1)[-1]}"] = key
    return out, prefix


def convert_state_dict(ah_sd: dict[str, torch.Tensor], mapping: dict[str, str], folder: str
                       ) -> dict[str, torch.Tensor]:
    """AdapterHub tensors -> our checkpoint keys. Every AdapterHub key must map and every tensor of ours be given."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in ah_sd.items():
        parts = key.split(".")
        for i in range(len(parts)):  # strip a head model's prefix (bert., model., transformer., ...)
            suffix = ".".join(parts[i:])
            if suffix in mapping:
                out.setdefault(mapping[suffix], value)
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{folder}: AdapterHub tensors that fit no adapter module of this model: "
                         f"{', '.join(unmatched[:5])}. Is the adapter for another model architecture?")
    missing = sorted(set(mapping.values()) - set(out))
    if missing:
        hint = (" (AdapterHub drops Compacter's shared rule when saving from a bare base model; save it from an "
                "XxxAdapterModel instead)" if any("adapters_shared" in m for m in missing) else "")
        raise ValueError(f"{folder}: the AdapterHub checkpoint lacks tensors this adapter needs: "
                         f"{', '.join(missing[:5])}{hint}.")
    return out


def load_adapterhub(peft_model_cls: Any, model: torch.nn.Module, folder: Union[str, os.PathLike],
                    adapter_name: str = "default", is_trainable: bool = False,
                    into: Optional["PeftModel"] = None) -> "PeftModel":
    """Build (or extend ``into``) a peftkit model with the AdapterHub adapter in ``folder``."""
    from peftkit.engine.save_load import set_adapter_state_dict

    folder = os.fspath(folder)
    meta = read_meta(folder)
    assert meta is not None
    config = config_from_adapterhub(meta["config"])
    config.inference_mode = not is_trainable
    base = into.base_model.model if into is not None else model
    want = meta.get("model_type")
    have = getattr(getattr(base, "config", None), "model_type", None)
    if want and have and want != have:
        raise ValueError(f"{folder} holds an AdapterHub adapter for model type {want!r}, but the model is {have!r}.")
    weights = load_tensors(weights_file(folder))
    if into is None:
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        peft_model = peft_model_cls(model, config, adapter_name, _loading=True)
    else:
        peft_model = into
        into.add_adapter(adapter_name, config, _loading=True)
    try:
        mapping, _ = key_map(peft_model, adapter_name, str(meta.get("name", "")),
                             ln_before=getattr(config, "ln_before", False))
        converted = convert_state_dict(weights, mapping, folder)
        set_adapter_state_dict(peft_model.base_model, converted, adapter_name)
    except Exception:
        peft_model.base_model._discard_partial_adapter(adapter_name)
        if into is None:
            for p, flag in requires_grad:
                p.requires_grad_(flag)
        raise
    if not is_trainable:
        for n, p in peft_model.named_parameters():
            if into is None or f".{adapter_name}." in f".{n}.":
                p.requires_grad_(False)
        if into is None:
            peft_model.eval()
    return peft_model


def save_adapterhub(peft_model: "PeftModel", save_directory: Union[str, os.PathLike],
                    adapter_names: list[str]) -> None:
    """Write each adapter as an AdapterHub folder (``default`` in the root, others in sub-folders) that
    ``adapters``' ``load_adapter`` reads: both ``pytorch_adapter.bin`` and ``adapter.safetensors``."""
    engine = peft_model.base_model
    base = engine.model
    for name in adapter_names:
        config = peft_model.peft_config[name]
        if str(config.peft_type) != "BOTTLENECK" and not hasattr(config, "adapterhub_dict"):
            raise ValueError(f"format='adapterhub' writes bottleneck adapters and the hybrids only; adapter {name!r} "
                             f"is {config.peft_type}. Save it in peftkit's own format instead.")
        out_dir = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
        os.makedirs(out_dir, exist_ok=True)
        mapping, prefix = key_map(peft_model, name, name, ln_before=False)
        from peftkit.engine.save_load import get_adapter_state_dict

        ours = get_adapter_state_dict(engine, name)
        tensors = {prefix + ah_suffix: ours[our_key].detach().clone().contiguous()
                   for ah_suffix, our_key in mapping.items()}
        if getattr(config, "ln_before", False):  # AdapterHub stores the input LayerNorm twice (adapter_down.0 and adapter_norm_before)
            for key in [k for k in tensors if ".adapter_down.0." in k]:
                tensors[key.replace(".adapter_down.0.", ".adapter_norm_before.")] = tensors[key].clone()
        hidden = getattr(config, "_hidden", None) or getattr(getattr(base, "config", None), "hidden_size", None)
        meta = {
            "config": config.adapterhub_dict(),
            "hidden_size": hidden,
            "model_class": type(base).__name__,
            "model_name": getattr(getattr(base, "config", None), "_name_or_path", "") or "",
            "model_type": getattr(getattr(base, "config", None), "model_type", None),
            "name": name,
            "version": EXPORT_VERSION,
        }
        atomic_write_text(os.path.join(out_dir, CONFIG_FILE), json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_tensors(tensors, os.path.join(out_dir, SAFETENSORS_FILE))
        tmp = os.path.join(out_dir, "." + BIN_FILE + ".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, os.path.join(out_dir, BIN_FILE))


def describe(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """What ``peftkit inspect`` shows for an AdapterHub folder."""
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} is not an AdapterHub adapter folder.")
    cfg = meta["config"]
    weights = load_tensors(weights_file(folder))
    kind = cfg.get("architecture") or ("compacter" if cfg.get("phm_layer") else (
        "parallel bottleneck" if cfg.get("is_parallel") else "bottleneck"))
    return {
        "format": "adapterhub",
        "version": meta.get("version"),
        "name": meta.get("name"),
        "model_class": meta.get("model_class"),
        "model_type": meta.get("model_type"),
        "architecture": kind,
        "tensors": len(weights),
        "parameters": int(sum(t.numel() for t in weights.values())),
        "config": cfg,
    }


__all__ = ["is_adapterhub_folder", "load_adapterhub", "save_adapterhub", "describe", "config_from_adapterhub"]
