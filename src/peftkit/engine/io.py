"""File input/output: atomic writes, safe loading of weights, and resolving local folders or hub ids.

Loading never unpickles arbitrary objects: safetensors first, ``torch.load(weights_only=True)`` for legacy
``adapter_model.bin`` files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import pickle
import shutil
import sys
import uuid
from typing import Any, Callable, Iterator, Optional, Union

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
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
    # os.open with 0o666 lets the umask decide the mode, as for any normal file (mkstemp would force 0600)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # writers may create their own file (safetensors: mode 0600)
        _fsync_path(tmp)
        _step("file-written")
        os.replace(tmp, path)
        _fsync_path(directory)
        _step("file-replaced")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        return read_safetensors(path, device)[0]
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses any pickled object that is not a plain tensor container (e.g. code to run).
        raise ValueError(
            f"Refusing to load {path}: it contains pickled objects other than tensors, which could run code. "
            "Re-save the adapter as safetensors with a trusted tool."
        ) from exc
    except (EOFError, RuntimeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"Cannot read {path}: {exc}. The file is truncated or not a PyTorch weights file.") from exc
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ValueError(f"{path} does not hold a dict of named tensors (got {type(loaded).__name__}); it is not an adapter.")
    return loaded


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


# ------------------------------------------------------------------------------------- whole-folder saves
# An adapter folder is replaced as a whole: the new content is built in a hidden sibling folder (every file and
# folder fsynced), then swapped in with one atomic exchange of the two folder names (Linux renameat2
# RENAME_EXCHANGE; elsewhere two renames, with a recovery step that puts the old folder back if a crash falls
# between them). Savers of one folder are serialised by an flock on a hidden sibling lock file. The weights file
# records a digest of the config it was saved with (safetensors metadata), so a folder whose two files come from
# different saves, whoever wrote them, is detected on load.

CONFIG_FILE_NAME = "adapter_config.json"
CONFIG_DIGEST_KEY = "peftkit_config_sha256"
# Descriptive keys users edit by hand without changing the adapter; left out of the digest.
_DIGEST_EXEMPT_KEYS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")
_STAGE_TAG = ".peftkit-new-"
_OLD_TAG = ".peftkit-old-"
_LOCK_SUFFIX = ".peftkit-lock"

# Test hook: called with the name of each step of a folder save ("staged", "exchanged", ...). Fault-injection
# tests set it in a child process to kill it at that step. None in normal use.
_FAULT_HOOK: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(name)


def _fsync_path(path: str) -> None:
    """fsync a file or a folder (best effort for folders: not every platform can open one)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):  # folders on some file systems
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for f in filenames:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath)


def config_digest(data: Any) -> str:
    """Digest of an adapter config (parsed JSON) without the descriptive keys users edit by hand."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in _DIGEST_EXEMPT_KEYS}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both exist). False where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # the file system cannot exchange; the caller falls back to two renames
    raise OSError(err, os.strerror(err), a, None, b)


def _split(directory: Union[str, os.PathLike]) -> tuple[str, str, str]:
    path = os.path.realpath(os.path.abspath(os.fspath(directory)))
    parent, base = os.path.split(path)
    return path, parent, base


def _siblings(parent: str, base: str, tag: str) -> list[str]:
    prefix = f".{base}{tag}"
    try:
        return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []


@contextlib.contextmanager
def folder_lock(directory: Union[str, os.PathLike], shared: bool = False) -> Iterator[None]:
    """Hold an flock that serialises peftkit's saves to ``directory`` (shared: a reader waiting for a save).

    The lock file is a hidden sibling of the folder, since the folder itself is swapped out by a save. Where the
    platform has no flock, or the lock file cannot be created (read-only location), nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    _, parent, base = _split(directory)
    lock_path = os.path.join(parent, f".{base}{_LOCK_SUFFIX}")
    if shared and not os.path.exists(lock_path):
        yield  # no peftkit save ever ran here: nothing to wait for (and a reader creates no files)
        return
    try:
        fd = os.open(lock_path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # e.g. a folder the user may write into, inside one they may not
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _recover_locked(path: str, parent: str, base: str) -> None:
    """With the lock held: undo what a crashed save left behind. A missing folder with an old copy beside it
    (crash between the two renames of the fallback) gets the old copy back; staging folders are deleted."""
    olds = _siblings(parent, base, _OLD_TAG)
    if not os.path.lexists(path) and olds:
        newest = max(olds, key=os.path.getmtime)
        os.rename(newest, path)
        _fsync_path(parent)
        olds.remove(newest)
    for leftover in olds + _siblings(parent, base, _STAGE_TAG):
        shutil.rmtree(leftover, ignore_errors=True)


def recover_folder(directory: Union[str, os.PathLike]) -> None:
    """Clean up after a save that crashed (see :func:`replace_folder`); a no-op when there is nothing to do."""
    path, parent, base = _split(directory)
    if not (_siblings(parent, base, _OLD_TAG) or _siblings(parent, base, _STAGE_TAG)):
        return
    with folder_lock(path):
        _recover_locked(path, parent, base)


def _carry_over(src: str, dst: str, skip: Callable[[str], bool], rel: str = "") -> None:
    """Hard-link (or copy) the entries of ``src`` that the new save does not replace into ``dst``."""
    for entry in os.scandir(src):
        relpath = os.path.join(rel, entry.name) if rel else entry.name
        if skip(relpath):
            continue
        target = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.isdir(target):
                os.mkdir(target)
                shutil.copymode(entry.path, target)
            _carry_over(entry.path, target, skip, relpath)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)


def _in_place_only(path: str) -> bool:
    """Folders that cannot be renamed: mount points, the working directory (or one holding it), and folders in a
    parent folder this process may not write to (no sibling can be created there)."""
    if os.path.ismount(path) or not _parent_writable(path):
        return True
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return False
    return cwd == path or cwd.startswith(path + os.sep)


def replace_folder(
    directory: Union[str, os.PathLike],
    write: Callable[[str], None],
    replaced: Callable[[str], bool] = lambda relpath: False,
) -> None:
    """Replace the content that ``write(folder)`` produces in ``directory`` as one atomic step.

    ``write`` fills an empty staging folder. Entries of the existing folder for which ``replaced(relative path)``
    is False (files of other adapters or other programs) are carried over into the new folder. After a crash at
    any moment, ``directory`` holds either its complete old content or the complete new one (see
    :func:`recover_folder` for the two-rename fallback); leftovers of a crashed save are removed by the next save.
    Concurrent savers (processes or threads using this function) are serialised.
    """
    path, parent, base = _split(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file; an adapter is saved into a folder.")
    with folder_lock(path):
        _recover_locked(path, parent, base)
        if os.path.isdir(path) and _in_place_only(path):
            write(path)  # per-file atomic writes; a mix is still detected on load (config digest)
            return
        token = uuid.uuid4().hex[:12]
        stage = os.path.join(parent, f".{base}{_STAGE_TAG}{token}")
        os.mkdir(stage)
        old = os.path.join(parent, f".{base}{_OLD_TAG}{token}")
        swapped = False
        try:
            if os.path.isdir(path):
                shutil.copymode(path, stage)
                _carry_over(path, stage, replaced)
                _step("carried")
            write(stage)
            _fsync_tree(stage)
            _step("staged")
            if not os.path.isdir(path):
                os.rename(stage, path)
                swapped = True
                _fsync_path(parent)
                _step("renamed")
            elif _exchange(stage, path):
                swapped = True  # stage now holds the old content
                _step("exchanged")
                _fsync_path(parent)
                _step("exchanged-synced")
                shutil.rmtree(stage, ignore_errors=True)
                _step("cleaned")
            else:
                os.rename(path, old)
                _step("moved-old")
                try:
                    os.rename(stage, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                swapped = True
                _fsync_path(parent)
                _step("moved-new")
                shutil.rmtree(old, ignore_errors=True)
                _step("cleaned")
        finally:
            if not swapped:
                shutil.rmtree(stage, ignore_errors=True)


def read_safetensors(path: str, device: Union[str, torch.device] = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; a truncated or corrupt file gets an error naming it."""
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt", device=str(device)) as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except FileNotFoundError:
        raise
    except Exception as exc:  # SafetensorError, OSError, and whatever a lying header makes the reader raise
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise ValueError(
            f"Cannot read {path} ({size} bytes): {type(exc).__name__}: {exc}. The file is truncated or corrupt "
            "(an interrupted copy or download?); fetch or save the adapter again."
        ) from exc
    return tensors, metadata


def read_config_file(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` at ``path``; anything but a JSON object gets an error naming the file."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a text file (not UTF-8 at byte {exc.start}); it is not an adapter config.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__ if data is not None else 'null'}, but an adapter config is a "
            "JSON object ({\"peft_type\": ..., ...})."
        )
    return data


def read_checkpoint(
    name_or_path: Union[str, os.PathLike],
    subfolder: Optional[str] = None,
    read_config: bool = True,
    parse: Optional[Callable[[dict[str, Any], str], Any]] = None,
    **hub_kwargs: Any,
) -> tuple[Any, Optional[str], dict[str, torch.Tensor], str]:
    """Read an adapter's config and weights as one consistent pair: ``(config, config path, tensors,
    weights path)``; the config is ``parse(data, path)`` (the parsed JSON without ``parse``). A config that
    ``parse`` refuses is reported as such, before the pair is compared.

    A pair that does not belong together (the weights record the digest of another config) is re-read once while
    waiting for any peftkit save of that folder to finish; if it still does not match, the folder is mixed (a save
    by some program was interrupted, or one file was replaced) and a ValueError says so.
    """
    # Folders whose saves may swap this adapter: its own, and the one above (a sub-folder adapter is saved, and
    # swapped, with the folder that holds it).
    root = os.fspath(name_or_path)
    own = _split(os.path.join(root, subfolder) if subfolder else root)[0]
    folders = list(dict.fromkeys([own, os.path.dirname(own)]))
    local = os.path.isdir(own) or any(_siblings(*os.path.split(f), _OLD_TAG) for f in folders)
    for attempt in range(2):
        with contextlib.ExitStack() as guard:
            if attempt and local:
                for held in folders:
                    guard.enter_context(folder_lock(held, shared=True))
            try:
                config_path = resolve_file(name_or_path, CONFIG_FILE_NAME, subfolder=subfolder, **hub_kwargs) if read_config else None
                data = read_config_file(config_path) if config_path else None
                parsed = parse(data, config_path) if (parse is not None and data is not None) else data
                weights_path = resolve_weights_file(name_or_path, subfolder=subfolder, **hub_kwargs)
                if weights_path.endswith(".safetensors"):
                    tensors, metadata = read_safetensors(weights_path)
                else:
                    tensors, metadata = load_tensors(weights_path), {}
            except (FileNotFoundError, ValueError):
                if attempt or not local:
                    raise
                for f in folders:  # a crash between the two renames of a fallback save: put the old folder back
                    if _can_write(f):
                        recover_folder(f)
                continue
            recorded = metadata.get(CONFIG_DIGEST_KEY)
            if data is None or recorded is None or recorded == config_digest(data):
                return parsed, config_path, tensors, weights_path
    raise ValueError(
        f"{config_path} and {weights_path} do not belong together: the weights were saved with a different "
        "adapter_config.json (a save was interrupted, or one of the files was replaced by another program). "
        "Save the adapter again. If you changed the config on purpose, pass config=PeftConfig.from_pretrained(...) "
        "explicitly to load these weights with it."
    )


def _parent_writable(path: str) -> bool:
    return os.access(os.path.dirname(path), os.W_OK)


def _can_write(path: Union[str, os.PathLike]) -> bool:
    _, parent, _ = _split(path)
    return os.access(parent, os.W_OK)

