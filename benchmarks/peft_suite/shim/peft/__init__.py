"""Test shim: `import peft` gives peftkit's public API; any other name (and any peft.* submodule) is a stand-in
that fails when used, so PEFT's tests run against peftkit. A ``peft.<sub>`` module gives ``peftkit.<sub>``'s names
where peftkit has that module (``peft.tuners.tuners_utils`` -> ``peftkit.tuners.tuners_utils``), stand-ins for the
rest."""
import importlib.abc, importlib.machinery, sys, types
import peftkit
from peftkit import *  # noqa

__version__ = "0.21.2"

def _missing(name):
    class Missing:
        def __init__(self, *a, **k):  # inert (module-level test tables build them); failing on use
            pass

        def __call__(self, *a, **k):
            raise NotImplementedError(f"peftkit has no {name}")
        def __init_subclass__(cls, **k):
            pass
    Missing.__name__ = Missing.__qualname__ = name.rsplit(".", 1)[-1]
    return Missing

def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if hasattr(peftkit, name):
        return getattr(peftkit, name)
    obj = _missing(name)
    globals()[name] = obj
    return obj

# test-infrastructure helpers (not method API) that PEFT's tests call at import time
_HELPERS = {"infer_device": lambda: "cpu"}


def _real(fullname):
    """peftkit's module at PEFT's path (peft.tuners.lora -> peftkit.tuners.lora), or None where peftkit has none."""
    try:
        return importlib.import_module("peftkit" + fullname[len("peft"):])
    except ImportError:
        return None


class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        real = self.__dict__.get("_peftkit_real")
        if real is not None and hasattr(real, name):
            value = getattr(real, name)
            if isinstance(value, types.ModuleType):  # a subpackage: through the shim too (stand-ins for the rest)
                return importlib.import_module(f"{self.__name__}.{name}")
            return value
        if hasattr(peftkit, name):
            return getattr(peftkit, name)
        if name in _HELPERS:
            return _HELPERS[name]
        if name.startswith("is_"):
            value = name == "is_transformers_ge_v5"
            return lambda *a, **k: value
        obj = _missing(f"{self.__name__}.{name}")
        setattr(self, name, obj)
        return obj

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("peft."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None
    def create_module(self, spec):
        m = _Mod(spec.name); m.__path__ = []; return m
    def exec_module(self, module):
        module._peftkit_real = _real(module.__name__)

sys.meta_path.insert(0, _Finder())
__path__ = []
