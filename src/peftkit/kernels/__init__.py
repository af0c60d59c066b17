"""GPU kernels (Triton) with their pure-PyTorch references.

Triton is optional: nothing here is imported by the engine unless a CUDA tensor reaches a path that can use a
kernel, and every kernel has a reference implementation in plain PyTorch (the fallback, and what the tests compare
against; on a machine without a GPU the tests run the kernels in Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

DISABLE_ENV = "PEFTKIT_DISABLE_TRITON"  # set to 1 to keep every layer on the PyTorch paths


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


CPU_ENV = "PEFTKIT_TRITON_CPU"  # set to 1 (with TRITON_INTERPRET=1) to route CPU tensors through the kernels


def kernels_enabled(device) -> bool:
    """Whether a kernel may run for tensors on ``device``: Triton installed, not disabled, and a CUDA device; or,
    for testing the layers' kernel paths without a GPU, Triton's CPU interpreter asked for explicitly
    (``TRITON_INTERPRET=1`` and ``PEFTKIT_TRITON_CPU=1``)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or not triton_installed():
        return False
    if getattr(device, "type", device) == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "") == "1" and os.environ.get(CPU_ENV, "") == "1"
