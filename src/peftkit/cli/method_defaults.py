"""Per-method defaults for ``peftkit train`` / ``peftkit bench``, and ``--method-option key=value`` parsing.

Methods come from the registry (every registered method is usable by name), plus two reference rows that are not
adapters: ``full`` (full fine-tuning) and ``head`` (alias ``linear-probe``: only the classifier head trains).
Defaults below only fill what a method needs to run on a sequence classifier; anything else is the config class's
own default, and every field can be overridden with ``--method-option``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import typing
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from peftkit.engine.config import PeftConfig, TargetedConfig, TaskType
from peftkit.engine.registry import get_method, supported_methods

FULL = "full"
HEAD = "head"


class UsageError(ValueError):
    """Bad command-line input; the message says what to do. The CLI prints it without a traceback."""


PSEUDO_METHODS = {FULL: "full fine-tuning (every parameter trains)", HEAD: "only the classifier head trains"}
ALIASES = {"linear-probe": HEAD, "linear_probe": HEAD, "full-finetuning": FULL, "ft": FULL}

# Methods that are a config recipe of a registered method rather than a registry entry of their own:
# name -> (registry key, "module:ConfigClass", one-line description). KronA is LoKr with two full factors and is
# saved as a LOKR checkpoint.
CONFIG_VARIANTS = {
    "KRONA": ("LOKR", "peftkit.methods.lycoris.lokr:KronAConfig", "LoKr with both Kronecker factors full (KronA)"),
}

# Common names users type for a config field -> the field (checked before fuzzy matching).
FIELD_SYNONYMS = {
    "rank": ("r", "init_r"), "lora_rank": ("r",), "lora_r": ("r",), "alpha": ("lora_alpha", "alpha"),
    "dropout": ("lora_dropout", "module_dropout", "dropout"), "targets": ("target_modules",),
    "target": ("target_modules",), "modules": ("target_modules",), "target_module": ("target_modules",),
    "layers": ("layers_to_transform",), "dora": ("use_dora",), "rslora": ("use_rslora",),
    "virtual_tokens": ("num_virtual_tokens",), "tokens": ("num_virtual_tokens",),
}

# Names of attention input projections across model families, in the order we prefer them.
ATTENTION_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn", "query_key_value",
                         "qkv_proj", "qkv", "Wqkv", "q_lin", "k_lin", "v_lin", "q", "k", "v")

# Config overrides per peft_type. A callable receives the total number of optimiser steps.
METHOD_OVERRIDES: dict[str, Union[dict[str, Any], Callable[[int], dict[str, Any]]]] = {
    "LORA": {"r": 8, "lora_alpha": 16},
    "ADALORA": lambda steps: {"init_r": 12, "target_r": 8, "lora_alpha": 16, "total_step": max(steps, 3),
                              "tinit": steps // 10, "tfinal": steps // 5, "deltaT": max(1, steps // 20)},
    # the survey's prefix-tuning setting: 30 tokens, reparameterised by an MLP of width 512
    "PREFIX_TUNING": {"num_virtual_tokens": 30, "prefix_projection": True, "encoder_hidden_size": 512},
    "P_TUNING": {"num_virtual_tokens": 20, "encoder_hidden_size": 128},
    # Llama-Adapter's paper: 10 prompt vectors (in its top 30 of 32 layers; here every layer unless set)
    "ADAPTION_PROMPT": {"adapter_len": 10},
}

# Methods that only adapt some architectures, with what they need (skipped by the CLI's all-methods runs on BERT).
ARCHITECTURE_SPECIFIC = {
    "ADAPTION_PROMPT": "Llama-style (q_proj/k_proj/v_proj/o_proj) or GPT-2 (c_attn) attention, e.g. a Llama classifier",
}

# Learning rates used when --lr is not given (the survey swept {1e-3, 1e-4, 1e-5}; one value per family here).
DEFAULT_LR = {FULL: 5e-5, HEAD: 1e-3}
ADAPTER_LR = 1e-3

# Methods that cannot be built from defaults alone, with what the user must provide.
NEEDS_INPUT = {
    "BOTTLENECK": "BnConfig (AdapterHub's general bottleneck form) needs mh_adapter, output_adapter, reduction_factor "
                  "and non_linearity, e.g. --method-option mh_adapter=true output_adapter=true reduction_factor=16 "
                  "non_linearity=relu; or use a preset: --method seq_bn, double_seq_bn, par_bn, compacter, compacter++.",
    "XLORA": "X-LoRA mixes already trained LoRA experts: train them first (peftkit train --method lora --out DIR) "
             "and pass --method-option adapters='{\"a\": \"DIR_A\", \"b\": \"DIR_B\"}'.",
}


# Methods whose targets are part of the method (the survey ran them with their library's defaults): without a
# --method-option target_modules they keep their own per-model-type defaults instead of the attention projections.
# (IA)^3: keys, values and the second feed-forward projection (PEFT's table); LN tuning: the norm layers; BitFit:
# every bias.
OWN_DEFAULT_TARGETS = {"IA3", "LN_TUNING", "BITFIT"}


def _variants() -> dict[str, tuple[str, str, str]]:
    """The config variants whose registry entry is present."""
    return {k: v for k, v in CONFIG_VARIANTS.items() if v[0] in supported_methods()}


def available_methods() -> list[str]:
    """Every name ``--method`` accepts (registered methods and config variants in lower case, then the reference
    rows)."""
    return sorted([m.lower() for m in supported_methods()] + [k.lower() for k in _variants()]) + list(PSEUDO_METHODS)


def method_spec(method: str) -> Any:
    """The registry entry behind a canonical method name (a config variant maps to its base method)."""
    return get_method(CONFIG_VARIANTS[method][0] if method in CONFIG_VARIANTS else method)


def method_config_cls(method: str) -> type:
    """The config class ``--method <method>`` builds (``KronAConfig`` for krona)."""
    if method in CONFIG_VARIANTS:
        import importlib

        module, cls = CONFIG_VARIANTS[method][1].split(":")
        return getattr(importlib.import_module(module), cls)
    return get_method(method).config_cls


def method_description(method: str) -> str:
    if method in CONFIG_VARIANTS:
        return CONFIG_VARIANTS[method][2]
    return PSEUDO_METHODS.get(method, "")


def resolve_method(name: str) -> str:
    """Canonical method name: a registry key (``"LORA"``), a config variant (``"KRONA"``) or ``"full"`` /
    ``"head"``; clear error otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in PSEUDO_METHODS:
        return key
    upper = key.upper().replace("-", "_")
    if upper in supported_methods() or upper in _variants():
        return upper
    close = difflib.get_close_matches(name.lower(), available_methods(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"Unknown method {name!r}.{hint} Supported: {', '.join(available_methods())}.")


def attention_targets(model: nn.Module) -> list[str]:
    """Leaf names of the attention input projections (linear layers) of ``model``."""
    present = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and name:
            present.add(name.rsplit(".", 1)[-1])
    found = [n for n in ATTENTION_PROJECTIONS if n in present]
    # single-letter names (T5's q/k/v) only count when no longer name matched
    long_names = [n for n in found if len(n) > 1]
    return long_names or found


# ------------------------------------------------------------------------------------------- option parsing
def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def _convert(value: Any, text: str, tp: Any) -> tuple[bool, Any]:
    """(ok, converted) for one candidate type ``tp``; strings are tried last by the caller."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, None
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return True, tp(str(value).upper() if isinstance(value, str) else value)
        except ValueError:
            return False, None
    if tp is list or origin in (list, tuple, set):
        args = typing.get_args(tp)
        items = value if isinstance(value, list) else (text.split(",") if isinstance(value, str) and value else None)
        if items is None:
            return False, None
        if args and args[0] is not Any:
            converted = []
            for item in items:
                ok, v = _convert(_literal(item) if isinstance(item, str) else item, str(item), args[0])
                if not ok and args[0] is str:
                    ok, v = True, str(item)
                if not ok:
                    return False, None
                converted.append(v)
            items = converted
        return True, list(items)
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    if tp is str:
        return isinstance(value, str), value
    return False, None


def _candidates(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Union:
        out = []
        for arg in typing.get_args(tp):
            out.extend(_candidates(arg))
        return out
    return [tp]


def suggest_fields(key: str, fields: list[str], n: int = 3) -> list[str]:
    """The fields a mistyped ``key`` most likely meant: known synonyms (rank -> r), then fields that are a prefix
    of the key or that it is a prefix of, then fuzzy matches."""
    low = key.lower().replace("-", "_")
    out = [f for f in FIELD_SYNONYMS.get(low, ()) if f in fields]
    out += [f for f in fields if f not in out
            and (low.startswith(f) and len(f) >= max(1, len(low) // 4) or f.startswith(low) and len(low) >= 2)]
    out += [f for f in difflib.get_close_matches(low, fields, n=n, cutoff=0.6) if f not in out]
    return out[:n]


def parse_method_options(config_cls: type, options: list[str]) -> dict[str, Any]:
    """Turn ``["r=8", "target_modules=query,value"]`` into typed kwargs of ``config_cls``.

    Values are read as JSON (``true``, ``0.1``, ``[1, 2]``, ``{"a": 1}``) or Python literals (``True``/``None``);
    a comma list becomes a list where the field takes one; anything else stays a string where the field allows it.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.name != "peft_type"}
    hints = typing.get_type_hints(config_cls)
    out: dict[str, Any] = {}
    for option in options:
        if "=" not in option:
            raise UsageError(f"--method-option {option!r}: write it as key=value (e.g. r=8).")
        key, text = (s.strip() for s in option.split("=", 1))
        if key not in fields:
            close = suggest_fields(key, list(fields))
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"Unknown option {key!r} for {config_cls.__name__}.{hint} Valid options: {', '.join(fields)}.")
        value = _literal(text)
        cands = _candidates(hints.get(key, Any))
        ordered = [c for c in cands if c is not str] + [c for c in cands if c is str]
        quoted = text.startswith('"') and isinstance(value, str)
        if (quoted or text == "all-linear") and str in cands:  # '"regex"' and all-linear are strings, not lists
            ordered = [str]
        for tp in ordered:
            ok, converted = _convert(value if tp is not str else (value if isinstance(value, str) else text), text, tp)
            if ok:
                out[key] = converted
                break
        else:
            tp_name = getattr(hints.get(key), "__name__", str(hints.get(key))).replace("typing.", "")
            raise UsageError(f"--method-option {key}={text}: {config_cls.__name__}.{key} takes {tp_name}.")
    return out


# ------------------------------------------------------------------------------------------- building configs
def method_overrides(method: str, total_steps: int) -> dict[str, Any]:
    entry = METHOD_OVERRIDES.get(method, {})
    return dict(entry(total_steps) if callable(entry) else entry)


def _prompt_defaults(names: set, user: dict, kwargs: dict) -> None:
    """Soft-prompt methods without a length of their own get 20 virtual tokens (the survey's prompt length)."""
    if "num_virtual_tokens" in names and "num_virtual_tokens" not in user:
        kwargs.setdefault("num_virtual_tokens", 20)


def build_method_config(
    method: str, model: nn.Module, options: Optional[list[str]] = None, total_steps: int = 100,
    library_targets: bool = False,
) -> PeftConfig:
    """The config ``peftkit train --method <method>`` uses on ``model`` (a sequence classifier).

    Order of precedence: ``--method-option`` values, then :data:`METHOD_OVERRIDES`, then the config's defaults;
    ``target_modules`` defaults to the model's attention projections, ``total_step`` to the run's step count.
    With ``library_targets`` (``peftkit bench --suite survey``: each method's own default configuration), the
    method's registered per-model-type targets are used instead where it has them, and its config's own default
    otherwise.
    """
    cls = method_config_cls(method)
    names = {f.name for f in dataclasses.fields(cls)}
    user = parse_method_options(cls, options or [])
    if method in NEEDS_INPUT and not user:
        raise UsageError(f"--method {method.lower()}: {NEEDS_INPUT[method]}")
    kwargs: dict[str, Any] = {k: v for k, v in method_overrides(method, total_steps).items() if k in names}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    registry_targets = method_spec(method).default_target_modules.get(model_type) if library_targets else None
    own_default = next((f.default for f in dataclasses.fields(cls) if f.name == "target_modules"), None)
    if "target_modules" in names and "target_modules" not in user and registry_targets:
        kwargs["target_modules"] = list(registry_targets)
    elif ("target_modules" in names and "target_modules" not in user and method not in OWN_DEFAULT_TARGETS
          and issubclass(cls, TargetedConfig)
          and not (library_targets and own_default not in (None, dataclasses.MISSING))):
        targets = attention_targets(model)
        if not targets:
            raise UsageError(f"Could not find attention projections in {type(model).__name__} to adapt; pass "
                             "--method-option target_modules=NAME1,NAME2 (or target_modules=all-linear).")
        kwargs["target_modules"] = targets
    _prompt_defaults(names, user, kwargs)
    if "adapter_layers" in names and "adapter_layers" not in user:
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if layers:
            kwargs["adapter_layers"] = layers
    if "total_step" in names and "total_step" not in user and kwargs.get("total_step") is None:
        kwargs["total_step"] = max(total_steps, 3)
    kwargs.update(user)
    kwargs["task_type"] = TaskType.SEQ_CLS
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Invalid options for --method {method.lower()}: {exc}") from None


def validate_method_options(method: str, options: Optional[list[str]]) -> None:
    """Check ``--method-option`` values against ``method``'s config before any model is loaded: unknown fields
    (with suggestions), wrong types, and values the config itself rejects (e.g. ``r=0``)."""
    options = list(options or [])
    if method in (FULL, HEAD):
        if options:
            raise UsageError(f"--method {method} takes no --method-option.")
        return
    cls = method_config_cls(method)
    user = parse_method_options(cls, options)
    if method in NEEDS_INPUT:
        if not user:
            raise UsageError(f"--method {method.lower()}: {NEEDS_INPUT[method]}")
        return  # its config checks paths that only exist at run time
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {k: v for k, v in method_overrides(method, 100).items() if k in names}
    _prompt_defaults(names, user, kwargs)
    if "target_modules" in names and issubclass(cls, TargetedConfig):
        kwargs["target_modules"] = ["query"]  # a placeholder: targets are checked against the model later
    if "adapter_layers" in names:
        kwargs["adapter_layers"] = 1  # a placeholder: build_method_config uses the model's layer count
    kwargs.update(user)
    kwargs["task_type"] = TaskType.SEQ_CLS
    try:
        cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Invalid options for --method {method.lower()}: {exc}") from None


def default_lr(method: str) -> float:
    return DEFAULT_LR.get(method, ADAPTER_LR)
