"""File input/output: atomic writes, safe loading of weights, and resolving local folders or hub ids.

Loading never unpickles arbitrary objects: safetensors first, ``torch.load(weights_only=True)`` for legacy
``adapter_model.bin`` files.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Optional, Union

import torch

SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _atomic_replace(path: Union[str, os.PathLike], write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    A crash in the middle leaves the old file (if any) intact and no half-written file behind.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_replace(path, write)


def save_tensors(tensors: dict[str, torch.Tensor], path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> None:
    """Write tensors as safetensors, atomically. Shared or non-contiguous storage is copied first."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def save_tensors_torch(tensors: dict[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write tensors with ``torch.save`` (``adapter_model.bin``, for ``safe_serialization=False``), atomically."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: torch.save(clean, tmp))


def _shares_storage(t: torch.Tensor, all_tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for o in all_tensors.values() if o.untyped_storage().data_ptr() == ptr) > 1


def load_tensors(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Load a weights file without executing pickled code."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(device))
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses any pickled object that is not a plain tensor container (e.g. code to run).
        raise ValueError(
            f"Refusing to load {path}: it contains pickled objects other than tensors, which could run code. "
            "Re-save the adapter as safetensors with a trusted tool."
        ) from exc


def resolve_file(
    name_or_path: Union[str, os.PathLike],
    filename: str,
    subfolder: Optional[str] = None,
    required: bool = True,
    **hub_kwargs: Any,
) -> Optional[str]:
    """Find ``filename`` in a local folder or download it from the Hugging Face hub (users have a network)."""
    name_or_path = os.fspath(name_or_path)
    local_dir = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(local_dir):
        path = os.path.join(local_dir, filename)
        if os.path.isfile(path):
            return path
        if required:
            present = ", ".join(sorted(os.listdir(local_dir))) or "nothing"
            raise FileNotFoundError(f"No {filename} in {local_dir} (it holds: {present}).")
        return None
    if os.path.isdir(name_or_path):  # the folder exists, the sub-folder does not
        present = ", ".join(sorted(os.listdir(name_or_path))) or "nothing"
        raise FileNotFoundError(f"No sub-folder {subfolder!r} in {name_or_path} (it holds: {present}).")
    if os.path.isfile(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} is a file; pass the folder that holds {filename}.")
    if name_or_path.startswith((".", "/", "~", "\\")) or os.path.isabs(name_or_path) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"No such folder: {name_or_path!r} (it cannot be a hub repository id either).")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{name_or_path!r} is not a local folder and huggingface_hub is not installed.")
    allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir", "force_download", "local_files_only")}
    try:
        return hf_hub_download(name_or_path, filename, subfolder=subfolder, **allowed)
    except Exception as exc:  # network errors, unknown repo ids, offline mode
        if not required:
            return None
        where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
        if isinstance(exc, LocalEntryNotFoundError):
            reason = (f"there is no local folder of that name, and {filename} of hub repository {where!r} is not in "
                      "the local cache (offline mode, or no network). Check the path, or go online and retry.")
        elif isinstance(exc, EntryNotFoundError):
            reason = f"the hub repository {where!r} has no {filename}."
        elif isinstance(exc, RepositoryNotFoundError):
            reason = ("there is no local folder of that name and no hub repository either (if it is private, pass "
                      "token=...).")
        else:
            reason = (f"it is not a local folder, and fetching {filename} from the Hugging Face hub failed "
                      f"({type(exc).__name__}: {exc}).")
        raise FileNotFoundError(f"Cannot load {name_or_path!r}: {reason}") from exc


def resolve_weights_file(name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, **hub_kwargs: Any) -> str:
    path = resolve_file(name_or_path, SAFETENSORS_NAME, subfolder=subfolder, required=False, **hub_kwargs)
    if path is None:
        path = resolve_file(name_or_path, LEGACY_WEIGHTS_NAME, subfolder=subfolder, required=False, **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(name_or_path), subfolder) if subfolder else os.fspath(name_or_path)
        raise FileNotFoundError(f"No {SAFETENSORS_NAME} (or {LEGACY_WEIGHTS_NAME}) found in {where}.")
    return path
