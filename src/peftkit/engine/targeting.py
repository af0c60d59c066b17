"""Which modules of a model a config targets: suffix lists, regexes, "all-linear", exclusions, layer indices."""

from __future__ import annotations

import difflib
import re
from typing import Optional, Sequence, Union

import torch.nn as nn

ALL_LINEAR = "all-linear"


class NoMatchingPeftModuleError(ValueError):
    """The adapter being added matched no module of the model (as PEFT names it; a ValueError, so code that catches
    ValueError keeps working)."""
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def _conv1d_cls() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)
    except Exception:  # pragma: no cover - transformers is a dependency
        return ()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear,) + _conv1d_cls())


def _matches(spec: Union[str, Sequence[str]], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == t or key.endswith("." + t) for t in spec)


def layer_index(key: str, layers_pattern: Optional[Union[str, Sequence[str]]]) -> Optional[int]:
    """The index of the layer a module name lies in, e.g. 3 for ``model.layers.3.self_attn.q_proj``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        return int(m.group(1)) if m else None
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    return None


def _in_modules_to_save(key: str, modules_to_save: Optional[Sequence[str]]) -> bool:
    return bool(modules_to_save) and any(
        key == m or key.endswith("." + m) or key.startswith(m + ".") or f".{m}." in f".{key}." for m in modules_to_save
    )


def expand_all_linear(model: nn.Module, task_type: Optional[str] = None) -> list[str]:
    """Full names of every linear layer except the output head (the LM head, or a classifier head for SEQ_CLS)."""
    from peftkit.engine.layer import AdapterLayer

    names = []
    inner: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            inner.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
            names.append(name)
        elif is_linear(module):
            names.append(name)
    excluded = set(inner)
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    try:
        head = get_out() if callable(get_out) else None
    except Exception:
        head = None
    if head is not None:
        excluded.update(n for n, m in model.named_modules() if m is head)
    elif str(task_type) == "SEQ_CLS":
        for attr in ("classifier", "score"):
            module = getattr(model, attr, None)
            if module is not None:
                excluded.update(n for n, m in model.named_modules() if m is module)
                break
    return sorted(n for n in names if n not in excluded)


def find_targets(model: nn.Module, config) -> list[str]:
    """Names of the modules ``config`` targets, in model order; raise a helpful error if there are none."""
    target = config.target_modules
    exclude = config.exclude_modules
    keys = [name for name, _ in model.named_modules() if name]
    from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper

    # Never descend into the internals of adapter layers or modules_to_save copies.
    skip_prefixes = tuple(
        f"{name}." for name, m in model.named_modules() if name and isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
    )
    found = []
    for key in keys:
        if skip_prefixes and key.startswith(skip_prefixes):
            continue
        if exclude and _matches(exclude, key):
            continue
        if _in_modules_to_save(key, config.modules_to_save):
            continue
        if not _matches(target, key):
            continue
        if config.layers_to_transform:
            idx = layer_index(key, config.layers_pattern)
            if idx is None or idx not in config.layers_to_transform:
                continue
        found.append(key)
    if not found:
        raise NoMatchingPeftModuleError(no_match_message(model, config))
    return found


def no_match_message(model: nn.Module, config) -> str:
    from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper

    target = config.target_modules
    # The model's own modules: not the internals of adapter layers (base_layer, lora_A.<adapter>, ...).
    inner = tuple(f"{n}." for n, m in model.named_modules() if n and isinstance(m, (AdapterLayer, ModulesToSaveWrapper)))
    modules = [(n, m) for n, m in model.named_modules() if n and not (inner and n.startswith(inner))]
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, _ in modules})
    linear_leaves = sorted(
        {n.rsplit(".", 1)[-1] for n, m in modules if is_linear(m) or (isinstance(m, AdapterLayer) and is_linear(m.get_base_layer()))}
    )
    wanted = [target] if isinstance(target, str) else list(target or [])
    close: list[str] = []
    for t in wanted:
        close += difflib.get_close_matches(t.rsplit(".", 1)[-1], leaf_names, n=5, cutoff=0.4)
    close = list(dict.fromkeys(close))
    msg = f"target_modules={target!r} matched no module of {type(model).__name__}"
    if config.exclude_modules:
        msg += f" (after exclude_modules={config.exclude_modules!r})"
    if config.layers_to_transform:
        msg += f" (within layers {config.layers_to_transform})"
    msg += "."
    if close:
        msg += f" Closest module names: {', '.join(close)}."
    if linear_leaves:
        msg += f" Linear layers in this model: {', '.join(linear_leaves[:20])}."
    return msg
