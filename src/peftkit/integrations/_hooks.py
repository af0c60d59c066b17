"""Run a function once a module has been imported, without importing it ourselves.

peftkit must not import ``peft`` (or transformers' heavy modules) when it is imported. Integrations that adapt a
client therefore wait for the client's module: :func:`when_imported` calls ``fn(module)`` right away if the module
is already imported, otherwise right after its first import completes (a finder on ``sys.meta_path`` wraps that one
module's loader). Each hook runs at most once; an exception in a hook is logged, never raised into the import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from types import ModuleType
from typing import Callable, Optional

logger = logging.getLogger(__name__)

_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}
_LOCK = threading.RLock()


def _run(name: str, module: ModuleType) -> None:
    with _LOCK:
        hooks = _PENDING.pop(name, [])
    for fn in hooks:
        try:
            fn(module)
        except Exception:  # an integration must never break the client's import
            logger.warning("peftkit: the %s integration hook failed; that client will not recognise peftkit "
                           "objects.", name, exc_info=True)


def _fully_imported(module: Optional[ModuleType]) -> bool:
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


class _Loader(importlib.abc.Loader):
    def __init__(self, name: str, inner: importlib.abc.Loader) -> None:
        self._name, self._inner = name, inner

    def create_module(self, spec):  # type: ignore[override]
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _run(self._name, module)

    def __getattr__(self, attr: str):  # get_resource_reader, is_package, ...
        return getattr(self._inner, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[override]
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(fullname, spec.loader)
                return spec
        return None


_FINDER = _Finder()


def when_imported(name: str, fn: Callable[[ModuleType], None]) -> None:
    """Call ``fn(module)`` once module ``name`` is imported (now, if it already is)."""
    with _LOCK:
        _PENDING.setdefault(name, []).append(fn)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    module = sys.modules.get(name)
    if _fully_imported(module):
        _run(name, module)  # type: ignore[arg-type]
