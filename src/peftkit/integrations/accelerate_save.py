"""``accelerator.save_model(model, dir)`` writing an adapter-only folder for a peftkit model.

accelerate's ``save_model`` does not call ``save_pretrained``: it asks for the model's state dict
(``Accelerator.get_state_dict``: ``unwrap_model(model).state_dict()`` for DDP and one process, torch's
``get_model_state_dict(model, full_state_dict=True)`` for FSDP2, which calls ``model.state_dict()`` and gathers the
DTensors) and writes it as ``model.safetensors`` from the main process. So a peftkit model cooperates through its
state dict, and only while asked to: :meth:`PeftModel.adapter_only_state_dict` registers a torch state-dict post
hook (``nn.Module.register_state_dict_post_hook``, public) that keeps only the adapters' entries, under their usual
module paths, and removes the hook on exit. Outside the ``with`` block ``state_dict()`` is the full one, as always.

Given a ``save_directory``, on leaving the block the writing process (global rank 0) turns what accelerate wrote
there into peftkit's folder (``adapter_config.json`` + ``adapter_model.safetensors`` per adapter and a model card,
what ``save_pretrained`` writes) and removes accelerate's weight file(s). This needs no communication: the tensors
are in the file, already gathered; the few adapter tensors that are computed rather than stored in a module (a
reparameterised soft prompt is saved as the network's output) are gathered on entry, on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch

from peftkit.integrations.distributed import full_tensor, is_writer

if TYPE_CHECKING:
    from peftkit.engine.peft_model import PeftModel

ACCELERATE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json")


def _module_paths(model: "PeftModel") -> dict[int, str]:
    """id of every parameter and buffer of ``model`` -> its state-dict key (relative to ``model``)."""
    paths: dict[int, str] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(t), name)
    for name, t in model.named_buffers(remove_duplicate=False):
        paths.setdefault(id(t), name)
    return paths


def _plan(model: "PeftModel") -> tuple[set[str], dict[str, list[tuple[str, str, Any]]]]:
    """The state-dict keys of every adapter's tensors, and per adapter how to rebuild its checkpoint:
    ``(part, checkpoint key, state-dict key or a gathered tensor)``, part "model" (keys relative to the wrapped model,
    before ``adapter_tensors_to_save``) or "engine" (full checkpoint keys)."""
    from peftkit.engine.save_load import adapter_parameter_map

    paths = _module_paths(model)
    keys: set[str] = set()
    plan: dict[str, list[tuple[str, str, Any]]] = {}
    for name in model.peft_config:
        entries = []
        parts = (("model", adapter_parameter_map(model.base_model, name)),
                 ("engine", model.base_model.engine_adapter_tensors(name)))
        for part, tensors in parts:
            for ckpt_key, live in tensors.items():
                path = paths.get(id(live))
                if path is None:  # computed (e.g. a reparameterised prompt): gathered now, on every rank
                    entries.append((part, ckpt_key, full_tensor(live).detach().cpu().clone()))
                else:
                    keys.add(path)
                    entries.append((part, ckpt_key, path))
        plan[name] = entries
    return keys, plan


def _read_weights(folder: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors accelerate's ``save_model`` wrote in ``folder`` (one file or shards with an index)."""
    from peftkit.engine.io import load_tensors

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(load_tensors(os.path.join(folder, f)))
            return out, [index] + [os.path.join(folder, f) for f in files]
        path = os.path.join(folder, single)
        if os.path.isfile(path):
            return load_tensors(path), [path]
    raise FileNotFoundError(
        f"No model.safetensors (or pytorch_model.bin) in {folder}: accelerator.save_model(model, {folder!r}) must run "
        "inside `with model.adapter_only_state_dict(save_directory=...)`, with the same folder.")


def _write_folder(model: "PeftModel", folder: str, plan: dict[str, list[tuple[str, str, Any]]],
                  state: dict[str, torch.Tensor]) -> None:
    from peftkit.engine.config import CONFIG_NAME, _json_default
    from peftkit.engine.io import CONFIG_DIGEST_KEY, SAFETENSORS_NAME, atomic_write_text, config_digest, save_tensors
    from peftkit.engine.peft_model import _write_model_card
    from peftkit.engine.save_load import CHECKPOINT_PREFIX

    base = model.base_model
    prefix = getattr(type(base), "checkpoint_prefix", CHECKPOINT_PREFIX)
    for name, entries in plan.items():
        inner: dict[str, torch.Tensor] = {}
        engine: dict[str, torch.Tensor] = {}
        for part, ckpt_key, source in entries:
            if isinstance(source, str):
                if source not in state:
                    raise ValueError(
                        f"{folder}: accelerate's file lacks {source} (adapter {name!r}); it was not written inside this "
                        "`with model.adapter_only_state_dict(...)` block, or by another model.")
                source = state[source]
            (inner if part == "model" else engine)[ckpt_key] = source
        tensors = {prefix + k: v for k, v in base.adapter_tensors_to_save(name, inner).items()}
        tensors.update(engine)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        config = copy.deepcopy(model.peft_config[name])
        config.inference_mode = True
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"
        out_dir = folder if name == "default" else os.path.join(folder, name)
        os.makedirs(out_dir, exist_ok=True)
        save_tensors(tensors, os.path.join(out_dir, SAFETENSORS_NAME),
                     metadata={"format": "pt", CONFIG_DIGEST_KEY: config_digest(json.loads(text))})
        atomic_write_text(os.path.join(out_dir, CONFIG_NAME), text)
    first = next(iter(plan))
    card_base = getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)
    _write_model_card(folder, model.peft_config[first], card_base)


@contextlib.contextmanager
def adapter_only_state_dict(model: "PeftModel", save_directory: Optional[Union[str, os.PathLike]] = None,
                            is_main_process: Optional[bool] = None) -> Iterator[None]:
    """See :meth:`peftkit.PeftModel.adapter_only_state_dict`."""
    if not model.peft_config:
        raise ValueError("adapter_only_state_dict: the model has no adapters; there is nothing to save.")
    if save_directory is not None and os.path.isfile(save_directory):
        raise ValueError(f"{save_directory} is a file; adapter_only_state_dict(save_directory=...) needs a folder.")
    keys, plan = _plan(model)

    def keep_adapter_entries(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key[len(prefix):] not in keys:
                del state_dict[key]

    handle = model.register_state_dict_post_hook(keep_adapter_entries)
    try:
        yield
    finally:
        handle.remove()
    if save_directory is None:
        return
    writer = is_writer() if is_main_process is None else (is_main_process and is_writer())
    if not writer:
        return
    folder = os.fspath(save_directory)
    if keys:
        state, files = _read_weights(folder)
    else:  # every adapter tensor was computed (gathered on entry): accelerate had nothing to write
        state, files = {}, []
        os.makedirs(folder, exist_ok=True)
    _write_folder(model, folder, plan, state)
    for f in files:
        os.remove(f)


__all__ = ["ACCELERATE_WEIGHT_FILES", "adapter_only_state_dict"]
