"""Type and range checks of every config field, in one place, before a config touches a model.

:func:`validate_config` runs from ``PeftConfig.__post_init__``, so every method's config gets it without code of
its own: each dataclass field is checked against its type annotation (``int`` refuses ``True`` and ``2.0``,
``float`` refuses NaN and inf, ``list[str]`` refuses ``5``, ...). A config class adds range rules for its fields in a
class attribute ``field_rules = {"r": Rule(min=1), ...}`` (merged along the class hierarchy); fields whose name
says they are a dropout probability get ``[0, 1]`` unless a rule says otherwise. Errors are ``TypeError`` (wrong
kind of value) or ``ValueError`` (out of range), and always name ``<ConfigClass>.<field>``.

:func:`check_rank_against_layer` bounds rank fields (``rank_fields = ("r",)`` on a config class) by the size of each
targeted layer before any adapter parameter is allocated.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import warnings
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

# Generous bound of scaling-like floats (alpha, weights): beyond it an adapter's output overflows float16/32.
SCALE_LIMIT = 1e6


class ConfigTypeError(TypeError, ValueError):
    """A config field holds the wrong kind of value. Both a TypeError and a ValueError, so that code catching
    either (as for any other bad config value) catches it."""


@dataclass(frozen=True)
class Rule:
    """Range rule of one config field. ``each`` applies to every item of a list or value of a dict."""

    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False  # min itself is not allowed
    max_open: bool = False  # max itself is not allowed
    also: tuple = ()  # values allowed although outside [min, max] (e.g. -1 meaning "automatic")
    type: Any = None  # overrides the annotation (e.g. float for a field annotated int that takes floats)
    each: Optional["Rule"] = None
    regex: bool = False  # a str value (or every str item) must compile as a regular expression
    regex_keys: bool = False  # every key of a dict value must compile as a regular expression
    hint: str = ""  # what to do, appended to the message


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("_p")


_DROPOUT = Rule(min=0.0, max=1.0)


def _rules(cls: type) -> dict[str, Rule]:
    merged: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("field_rules", {}) or {})
    return merged


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # an annotation that cannot be resolved: check nothing rather than fail
            _HINTS[cls] = {}
    return _HINTS[cls]


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if ann is Any:
        return "any value"
    if origin is Union:
        parts = [_describe(a) for a in typing.get_args(ann) if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return text + (", or None" if type(None) in typing.get_args(ann) else "")
    if origin in (list, tuple, set, frozenset) or ann in (list, tuple, set):
        args = typing.get_args(ann)
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or ann is dict:
        args = typing.get_args(ann)
        return f"a dict of {_plural(args[0])} -> {_plural(args[1])}" if args else "a dict"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if ann is bool:
        return "True or False"
    if ann is int:
        return "an integer"
    if ann is float:
        return "a finite number"
    if ann is str:
        return "a string"
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in ann)
    return getattr(ann, "__name__", str(ann))


def _plural(ann: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(ann) or _describe(ann)


def _matches(value: Any, ann: Any) -> bool:
    """Whether ``value`` has the kind the annotation asks for (numbers are checked for finiteness elsewhere)."""
    if ann is Any or ann is object:
        return True
    origin = typing.get_origin(ann)
    if origin is Union:
        return any(_matches(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (list, tuple, set, frozenset) or ann in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        args = typing.get_args(ann)
        if not args or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            args = args[:1]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or ann is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(ann)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return isinstance(value, ann) or (isinstance(value, str) and value.upper() in {m.value for m in ann})
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True  # annotations this checker does not understand (TypeVar, Callable, ...)


def _numbers(value: Any) -> list[float]:
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _check_range(where: str, value: Any, rule: Optional[Rule]) -> None:
    for number in _numbers(value):
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{where} must be a finite number, got {number!r}.")
    if rule is None:
        return
    if rule.regex:
        for item in [value] if isinstance(value, str) else (value if isinstance(value, (list, tuple, set)) else []):
            if isinstance(item, str):
                try:
                    re.compile(item)
                except re.error as exc:
                    raise ValueError(f"{where}={item!r} is not a valid regular expression ({exc}).") from None
    if rule.regex_keys and isinstance(value, dict):
        for key in value:
            try:
                re.compile(str(key))
            except re.error as exc:
                raise ValueError(f"{where} key {key!r} is not a valid regular expression ({exc}).") from None
    if rule.each is not None:
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
        for key, item in items:
            _check_range(f"{where}[{key!r}]", item, rule.each)
        if isinstance(value, set):
            for item in value:
                _check_range(f"{where} item", item, rule.each)
    for number in _numbers(value):
        if number in rule.also:
            continue
        low_bad = rule.min is not None and (number < rule.min or (rule.min_open and number == rule.min))
        high_bad = rule.max is not None and (number > rule.max or (rule.max_open and number == rule.max))
        if low_bad or high_bad:
            lo = "" if rule.min is None else f"{'>' if rule.min_open else '>='} {rule.min:g}"
            hi = "" if rule.max is None else f"{'<' if rule.max_open else '<='} {rule.max:g}"
            span = " and ".join(p for p in (lo, hi) if p)
            if rule.max is None and not rule.min_open and rule.min in (0, 1) and isinstance(number, int):
                span = f"a {'positive' if rule.min == 1 else 'non-negative'} integer ({span})"
            extra = f" (or {', '.join(repr(a) for a in rule.also)})" if rule.also else ""
            hint = f" {rule.hint}" if rule.hint else ""
            raise ValueError(f"{where} must be {span}{extra}, got {number!r}.{hint}")


def validate_config(config: Any) -> None:
    """Check every field of a config dataclass against its annotation and range rule (see the module docstring)."""
    cls = type(config)
    hints = _hints(cls)
    rules = _rules(cls)
    for f in dataclasses.fields(config):
        if f.name in ("peft_type", "task_type"):
            continue  # normalised (and refused with the valid choices) by PeftConfig itself
        value = getattr(config, f.name)
        rule = rules.get(f.name)
        ann = rule.type if rule is not None and rule.type is not None else hints.get(f.name, Any)
        where = f"{cls.__name__}.{f.name}"
        if not _matches(value, ann):
            raise ConfigTypeError(f"{where} must be {_describe(ann)}, got {value!r} ({type(value).__name__}).")
        if rule is None and _is_dropout_name(f.name) and _numbers(value):
            rule = _DROPOUT
        _check_range(where, value, rule)
        if rule is None or rule.each is None:  # floats inside lists/dicts are checked for finiteness too
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set)) else ()
            for item in items:
                for number in _numbers(item):
                    if isinstance(number, float) and not math.isfinite(number):
                        raise ValueError(f"{where} holds {number!r}; every number in it must be finite.")


def _layer_dims(module: Any) -> Optional[tuple[int, int]]:
    """(out, flattened in) of a layer's weight, or None when it has no weight matrix."""
    weight = getattr(module, "weight", None)
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    out, rest = int(shape[0]), 1
    for d in shape[1:]:
        rest *= int(d)
    return out, rest


def check_rank_against_layer(config: Any, module_name: str, module: Any) -> None:
    """Refuse a rank far beyond the layer it adapts, before anything is allocated (e.g. r=10**9: the factors alone
    would need hundreds of GB). A rank above the layer's dimensions but with factors of a sane size is accepted
    with a warning, as PEFT accepts it (r=8 on a 5 x 1 convolution): it adds parameters, not expressiveness."""
    fields = getattr(type(config), "rank_fields", ())
    if not fields:
        return
    from peftkit.engine.layer import innermost_base

    dims = _layer_dims(innermost_base(module))
    if dims is None:
        return
    limit = max(dims)
    for field_name in fields:
        value = getattr(config, field_name, None)
        pattern = getattr(config, "rank_pattern", None) if field_name == "r" else None
        source = f"{type(config).__name__}.{field_name}"
        if isinstance(pattern, dict) and pattern:
            picked = next(
                (v for k, v in pattern.items() if module_name == k or re.match(rf"(.*\.)?({k})$", module_name)), None
            )
            if isinstance(picked, int) and not isinstance(picked, bool):
                value, source = picked, f"{type(config).__name__}.rank_pattern (for {module_name})"
        if not isinstance(value, int) or isinstance(value, bool) or value <= limit:
            continue
        # factor elements r * (out + in) within 64x the layer's own weight (and ~16M elements): accept and warn
        if value * (dims[0] + dims[1]) <= max(64 * dims[0] * dims[1], 1 << 24):
            warnings.warn(
                f"{source}={value} is larger than both dimensions of {module_name} ({dims[0]} x {dims[1]}); the "
                f"update's rank stays at most {min(dims)}, so the extra rank only adds parameters.",
                UserWarning, stacklevel=3)
        else:
            raise ValueError(
                f"{source}={value} is larger than both dimensions of {module_name} ({dims[0]} x {dims[1]}); a rank "
                f"above min({dims[0]}, {dims[1]}) adds parameters but no expressiveness. Choose r <= {min(dims)}."
            )
