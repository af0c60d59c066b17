"""The user-facing model: :class:`PeftModel` and its task-specific subclasses."""

from __future__ import annotations

import copy
import inspect
import json
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftConfig, TaskType, _json_default
from peftkit.engine.io import (SAFETENSORS_NAME, atomic_write_text, load_tensors, read_checkpoint, resolve_weights_file,
                               save_tensors)
from peftkit.engine.layer import BASE_ADAPTER, AdapterLayer, ModulesToSaveWrapper, mixed_batch
from peftkit.engine.registry import method_for_config
from peftkit.engine.save_load import LoadResult, get_adapter_state_dict, set_adapter_state_dict
from peftkit.engine.tuner import AdapterModel
from peftkit.integrations import peft_compat as _peft_compat
from peftkit.integrations.distributed import any_sharded, is_writer

SEQ_CLS_HEAD_NAMES = ("classifier", "score")


class _BoundForward:
    """``peft_model.forward``: calls :meth:`PeftModel._forward`; its signature is the wrapped model's forward
    signature plus ``adapter_names``. ``transformers.Trainer`` keeps only the dataset columns that
    ``inspect.signature(model.forward)`` names (it looks through Hugging Face PEFT's classes, not ours)."""

    __slots__ = ("_fn", "_model")

    def __init__(self, fn: Any, model: "PeftModel") -> None:
        self._fn, self._model = fn, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self._model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            inner = inspect.signature(self._model.base_model.model.forward)
        except (TypeError, ValueError):
            inner = inspect.signature(self._fn)
            inner = inner.replace(parameters=list(inner.parameters.values())[1:])
        params = list(inner.parameters.values())
        if "adapter_names" not in inner.parameters:
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            at = next((i for i, q in enumerate(params) if q.kind == inspect.Parameter.VAR_KEYWORD), len(params))
            params.insert(at, extra)
        return inner.replace(parameters=params)


class _Forward:
    """Descriptor for ``PeftModel.forward``. On an instance: a :class:`_BoundForward`. On the class: a callable whose
    signature names the task's label arguments (``transformers.utils.find_labels`` reads ``type(model).forward``)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: Optional["PeftModel"], owner: type) -> Any:
        if instance is not None:
            return _BoundForward(self._fn, instance)
        fn = self._fn

        def forward(self_: "PeftModel", *args: Any, **kwargs: Any) -> Any:
            return fn(self_, *args, **kwargs)

        kind = inspect.Parameter
        params = [kind("self", kind.POSITIONAL_OR_KEYWORD), kind("args", kind.VAR_POSITIONAL)]
        params += [kind(name, kind.KEYWORD_ONLY, default=None) for name in getattr(owner, "_label_names", ())]
        params += [kind("adapter_names", kind.KEYWORD_ONLY, default=None), kind("kwargs", kind.VAR_KEYWORD)]
        forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        forward.__doc__ = fn.__doc__
        return forward


def _refuse_foreign_adapters(model: nn.Module) -> None:
    """A model whose layers already hold adapters belongs to another PeftModel: wrapping it again would make the
    two share (and switch each other's) layers."""
    for path, module in model.named_modules():
        held = module.adapter_configs if isinstance(module, AdapterLayer) else (
            module.modules_to_save if isinstance(module, ModulesToSaveWrapper) else None)
        if held is None:
            continue
        first = next(iter(held), None)
        what = f"an adapter named {first!r}" if len(held) == 1 else (
            f"adapters {', '.join(repr(n) for n in held)}" if held else "an adapter layer (its adapters were deleted)")
        raise ValueError(
            f"{path or 'The model'} already holds {what} that another PeftModel manages (was get_peft_model called "
            "twice on the same model?). Add the new adapter to the first PeftModel with add_adapter(name, config), "
            "or call unload() / merge_and_unload() on it first."
        )


def _batch_rows(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a generate() call, from its first tensor input."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return int(args[0].shape[0])
    return None


def _adapter_model_for(model: nn.Module, config: PeftConfig, adapter_name: str, loading: bool) -> AdapterModel:
    spec = method_for_config(config)
    cls = spec.model_cls or AdapterModel
    return cls(model, config, adapter_name, loading=loading)


class PeftModel(nn.Module):
    """A base model with named adapters. Forwards like the base model.

    Attributes:
        base_model: the engine (:class:`~peftkit.engine.tuner.AdapterModel`); ``base_model.model`` is the user's model.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        _loading: bool = False,
        _keep_config: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        if not _keep_config:  # from_pretrained(config=c) keeps c itself, as PEFT does
            peft_config = copy.deepcopy(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
                getattr(model, "config", None), "_name_or_path", None
            ) or None
        self._prepare_config(model, peft_config)
        _refuse_foreign_adapters(model)
        self.base_model = _adapter_model_for(model, peft_config, adapter_name, _loading)
        if not autocast_adapter_dtype:
            self.base_model.cast_adapter_dtype(adapter_name, autocast_adapter_dtype=False)

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> None:
        """Task-specific adjustments of a config before injection (subclasses)."""

    # Clients that accept only Hugging Face PEFT's classes (transformers' Trainer, accelerate, TRL) check
    # isinstance(model, peft.PeftModel); while peft is imported, __class__ reports a class deriving from both (type()
    # stays this class). See peftkit.integrations.peft_compat.
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        return _peft_compat.model_bridge(type(self))

    @__class__.setter
    def __class__(self, cls: type) -> None:  # e.g. FSDP2's fully_shard swaps in a subclass of the real type
        object.__dict__["__class__"].__set__(self, cls)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _peft_compat.reduce_ex(self, protocol)

    # --------------------------------------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def peft_type(self) -> str:
        if not self.peft_config:
            from peftkit.engine.tuner import NO_ADAPTERS_MESSAGE

            raise ValueError(NO_ADAPTERS_MESSAGE)
        return str(next(iter(self.peft_config.values())).peft_type)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the (first) active adapter."""
        return self.peft_config[self.active_adapters[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's flag: False only while adapters are disabled (``disable_adapter()``) and some adapter is active."""
        return not self.base_model.adapters_are_disabled or not self.active_adapters

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The union of every adapter's ``modules_to_save`` (None if there are none), as in PEFT."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or [])
        return names or None

    @property
    def prefix(self) -> str:
        return self.base_model.prefix

    @property
    def targeted_module_names(self) -> list[str]:
        return self.base_model.targeted_module_names

    def get_layer_status(self) -> list:
        """Per adapter layer status (see :func:`peftkit.get_layer_status`)."""
        from peftkit.engine.functional import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The model's adapter status (see :func:`peftkit.get_model_status`)."""
        from peftkit.engine.functional import get_model_status

        return get_model_status(self)

    def _check_adapter_names(self, adapter_names: Optional[Sequence[str]]) -> None:
        if adapter_names is None:
            return
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got the string {adapter_names!r}.")
        if not self.base_model.method.supports_mixed_batch:
            raise ValueError(f"{self.peft_type} does not support adapter_names= (one adapter per row).")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names names unknown adapters {unknown}; known: {', '.join(self.peft_config)} "
                f"(and {BASE_ADAPTER!r} for no adapter)."
            )

    def _forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters."""
        self._check_adapter_names(adapter_names)
        with mixed_batch(self.base_model.model, adapter_names):
            return self.base_model(*args, **kwargs)

    forward = _Forward(_forward)
    # What transformers.Trainer treats as labels (see _Forward). Without a task type the wrapped class is unknown
    # here; "labels" is what transformers models take.
    _label_names: tuple[str, ...] = ("labels",)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        self._check_adapter_names(adapter_names)
        rows = _batch_rows(args, kwargs) if adapter_names is not None else None
        if rows is not None and len(adapter_names) != rows:  # type: ignore[arg-type]
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {rows} rows; give one adapter "  # type: ignore[arg-type]
                "name per input row (beams and num_return_sequences are handled for you)."
            )
        with mixed_batch(self.base_model.model, adapter_names, expandable=True):
            return self.base_model.model.generate(*args, **kwargs)

    # ----------------------------------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = 0, 0
        for p in self.parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = p.ds_numel
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # ------------------------------------------------------------------------------------------- adapters
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        *,
        _loading: bool = False,
    ) -> None:
        """Add a new, inactive adapter (activate it with :meth:`set_adapter`). Whether the parameters already in the
        model train is left as it was. ``autocast_adapter_dtype=False`` keeps the adapter in the base layer's dtype
        (by default a float16/bfloat16 base gets float32 adapters)."""
        if isinstance(peft_config, str):  # a config string, e.g. "par_bn"
            from peftkit.engine.registry import config_from_string

            peft_config = config_from_string(peft_config)
        peft_config = copy.deepcopy(peft_config)
        first = next(iter(self.peft_config.values()), None)  # None after every adapter was deleted
        if peft_config.base_model_name_or_path is None and first is not None:
            peft_config.base_model_name_or_path = first.base_model_name_or_path
        self._prepare_config(self.base_model.model, peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config, loading=_loading)
        if not autocast_adapter_dtype:
            self.base_model.cast_adapter_dtype(adapter_name, autocast_adapter_dtype=False)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_name``. As in PEFT, its parameters become trainable (also for an adapter loaded for
        inference) unless ``inference_mode=True``; every other adapter's are frozen."""
        if inference_mode:
            self.base_model.set_adapter(adapter_name, inference_mode=True)
        else:
            self.base_model.set_adapter(adapter_name)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' parameters (and their modules_to_save copies) on or off, whether
        active or not; nothing else changes."""
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the plain base model. Nested in another ``disable_adapter()`` (or
        after ``disable_adapter_layers()``), leaving it keeps the adapters disabled, as in PEFT."""
        if self.base_model.adapters_are_disabled:
            yield
            return
        layers = getattr(self.base_model, "adapter_layers", None)
        if layers is not None and len({layer.adapters_disabled for _, layer in layers()}) > 1:
            import warnings

            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled")
        with self.base_model.adapters_disabled():
            yield

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ----------------------------------------------------------------------------------------- save / load
    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        selected_adapters: Optional[Sequence[str]] = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        format: str = "peftkit",
        save_embedding_layers: Union[str, bool] = "auto",
        path_initial_model_for_weight_conversion: Optional[str] = None,
        **_: Any,
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` per adapter ("default" in the folder's
        root, any other in a sub-folder of its name) and a ``README.md`` model card if there is none.
        ``safe_serialization=False`` writes ``adapter_model.bin`` (torch.save) instead; ``save_embedding_layers=True``
        also stores the base input/output embedding weights (as PEFT does); ``"auto"`` and ``False`` store only the
        adapter.

        The folder is replaced as a whole (see :func:`peftkit.engine.io.replace_folder`): after a crash it holds
        the complete old or the complete new adapters, never a mix; other files in it are kept. Everything is
        checked before anything is written, and saving no tensors never replaces a saved adapter.

        ``format="adapterhub"`` writes AdapterHub's folder layout instead (bottleneck adapters), which ``adapters``
        loads with ``load_adapter``."""
        from peftkit.engine.config import CONFIG_NAME
        from peftkit.engine.io import (CONFIG_DIGEST_KEY, LEGACY_WEIGHTS_NAME, config_digest, replace_folder,
                                       save_tensors_torch)
        from peftkit.engine.tuner import NO_ADAPTERS_MESSAGE, _check_adapter_name

        if format not in ("peftkit", "peft", "adapterhub"):
            raise ValueError(f"format={format!r}: use 'peftkit' (the default, PEFT's layout) or 'adapterhub'.")
        if save_embedding_layers not in ("auto", True, False):
            raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}.")
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            initial = load_tensors(resolve_weights_file(path_initial_model_for_weight_conversion))
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder.")
        if not self.peft_config:
            raise ValueError(f"Nothing to save to {save_directory}: {NO_ADAPTERS_MESSAGE}")
        if isinstance(selected_adapters, str):
            selected_adapters = [selected_adapters]
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ValueError("selected_adapters is empty; name at least one adapter to save (None saves them all).")
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r} to save; this model has: {', '.join(self.peft_config)}.")
            _check_adapter_name(n)
        # Sharded parameters (FSDP2, ZeRO-3): every rank takes part in gathering them; global rank 0 writes.
        sharded = any_sharded(self.parameters())
        if not is_main_process and not sharded:
            return
        write_here = is_main_process and (not sharded or is_writer())
        if format == "adapterhub":
            if sharded:
                raise ValueError("format='adapterhub' cannot gather sharded (FSDP2 / ZeRO-3) parameters; save in "
                                 "peftkit's format and convert in one process, or unshard the model first.")
            from peftkit.engine.adapterhub import save_adapterhub

            save_adapterhub(self, save_directory, names)
            return
        payload = []
        for name in names:
            tensors = get_adapter_state_dict(self.base_model, name)  # gathers sharded tensors (collective)
            if not write_here:
                continue
            if not tensors:
                raise ValueError(
                    f"Adapter {name!r} has no tensors left in the model (after merge_and_unload() or unload() the "
                    f"adapters are gone from the layers); nothing was written, {save_directory} is unchanged. Save "
                    "before merging, or save the merged base model with its own save_pretrained."
                )
            config = copy.deepcopy(self.peft_config[name])
            if initial is not None:
                tensors, config = _convert_to_plain_lora(tensors, config, initial)
            if save_embedding_layers is True:
                from peftkit.engine.save_load import CHECKPOINT_PREFIX, _embedding_base_map

                for key, t in _embedding_base_map(self.base_model).items():
                    tensors.setdefault(CHECKPOINT_PREFIX + key, t.detach())
            config.inference_mode = True
            text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"
            metadata = {"format": "pt", CONFIG_DIGEST_KEY: config_digest(json.loads(text))}
            payload.append(("" if name == "default" else name, tensors, text, metadata))
        if not write_here:
            return
        written = {rel for rel, *_ in payload}
        ours = (CONFIG_NAME, SAFETENSORS_NAME, LEGACY_WEIGHTS_NAME)

        def replaced(relpath: str) -> bool:
            folder, base = os.path.split(relpath)
            return folder in written and base in ours

        card_config = self.peft_config[names[0]]
        card_base = getattr(getattr(self.get_base_model(), "config", None), "_name_or_path", None)

        def write(folder: str) -> None:
            for rel, tensors, text, metadata in payload:
                out_dir = os.path.join(folder, rel) if rel else folder
                os.makedirs(out_dir, exist_ok=True)
                if safe_serialization:
                    save_tensors(tensors, os.path.join(out_dir, SAFETENSORS_NAME), metadata=metadata)
                else:
                    save_tensors_torch(tensors, os.path.join(out_dir, LEGACY_WEIGHTS_NAME))
                atomic_write_text(os.path.join(out_dir, CONFIG_NAME), text)
            _write_model_card(folder, card_config, card_base)

        replace_folder(save_directory, write, replaced)

    def adapter_only_state_dict(self, save_directory: Optional[Union[str, os.PathLike]] = None,
                                is_main_process: Optional[bool] = None) -> Any:
        """A ``with`` block in which ``state_dict()`` holds only the adapters' tensors (under their usual keys), so
        that ``accelerator.save_model(model, dir)`` (and ``accelerator.get_state_dict``) save the adapter only, under
        one process, DDP and FSDP2 alike. With ``save_directory`` (the folder given to ``save_model``), the writing
        process turns accelerate's ``model.safetensors`` into peftkit's folder on exit (what ``save_pretrained``
        writes; ``PeftModel.from_pretrained`` loads it). Enter it on every process. Outside it ``state_dict()`` is
        unchanged. See :mod:`peftkit.integrations.accelerate_save`."""
        from peftkit.integrations.accelerate_save import adapter_only_state_dict

        return adapter_only_state_dict(self, save_directory, is_main_process)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        create_pr: bool = False,
        revision: Optional[str] = None,
        selected_adapters: Optional[Sequence[str]] = None,
        safe_serialization: bool = True,
        api: Any = None,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapters (as :meth:`save_pretrained` does) and upload them to the Hugging Face hub repository
        ``repo_id`` (created if missing) in one commit. ``api``: a ``huggingface_hub.HfApi`` (default: a new one)."""
        import tempfile

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token if isinstance(token, str) else None)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters, safe_serialization=safe_serialization,
                                 **save_kwargs)
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message or "Upload adapter (peftkit)",
                revision=revision, create_pr=create_pr,
            )

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        subfolder: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        ignore_mismatched_sizes: bool = False,
        low_cpu_mem_usage: bool = False,
        *,
        allow_nonfinite: bool = False,
        allow_missing_keys: bool = False,
        **hub_kwargs: Any,
    ) -> LoadResult:
        """Load a saved adapter as a new, inactive adapter ``adapter_name``; returns the load result (its
        ``missing_keys`` and ``unexpected_keys``). ``is_trainable=True`` makes its parameters trainable; otherwise
        they are frozen and the model is put in eval mode (as PEFT does). Other parameters keep their flags.
        Checkpoint tensors that are NaN/inf, missing, or of a non-float type are refused (naming the key);
        ``allow_nonfinite`` / ``allow_missing_keys`` opt out."""
        from peftkit.engine.tuner import _check_adapter_name

        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            # As Hugging Face PEFT: the checkpoint's weights go into the existing adapter, whose config and
            # trainability stay (transformers.Trainer's resume and load_best_model_at_end call exactly this).
            # Every tensor is checked before anything is written, so a checkpoint that does not fit changes nothing.
            try:
                saved_config, weights = _read_adapter(model_id, subfolder, config, hub_kwargs)
            except FileNotFoundError:  # weights without a config file
                saved_config = None
                weights = load_tensors(resolve_weights_file(model_id, subfolder=subfolder, **hub_kwargs))
            weights = self.base_model.checkpoint_tensors_to_load(adapter_name, weights, saved_config)
            return set_adapter_state_dict(self.base_model, weights, adapter_name,
                                          ignore_mismatched_sizes=ignore_mismatched_sizes,
                                          allow_nonfinite=allow_nonfinite, allow_missing_keys=allow_missing_keys)
        from peftkit.engine.adapterhub import is_adapterhub_folder, load_adapterhub

        if config is None and subfolder is None and is_adapterhub_folder(model_id):
            load_adapterhub(type(self), None, model_id, adapter_name, is_trainable, into=self)
            return
        config, weights = _read_adapter(model_id, subfolder, config, hub_kwargs)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, _loading=True)
        try:
            result = set_adapter_state_dict(self.base_model, weights, adapter_name,
                                            ignore_mismatched_sizes=ignore_mismatched_sizes,
                                            allow_nonfinite=allow_nonfinite, allow_missing_keys=allow_missing_keys)
        except Exception:
            self.base_model._discard_partial_adapter(adapter_name)  # the model is left as it was
            raise
        if is_trainable:
            self.set_requires_grad(adapter_name)
        else:
            self.eval()
        return result

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        subfolder: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        ignore_mismatched_sizes: bool = False,
        low_cpu_mem_usage: bool = False,
        *,
        allow_nonfinite: bool = False,
        allow_missing_keys: bool = False,
        **hub_kwargs: Any,
    ) -> "PeftModel":
        """Load an adapter saved by peftkit, Hugging Face PEFT or AdapterHub onto ``model`` (local folder or hub id).

        A ``config`` passed in is used as is (``model.peft_config[adapter_name] is config``, as in PEFT). The config
        and weights are read as one pair (a folder mixing two saves is refused). Checkpoint tensors that are NaN/inf,
        missing, or of a non-float type are refused naming the key; ``allow_nonfinite=True`` /
        ``allow_missing_keys=True`` load such checkpoints anyway (missing tensors keep their initial values)."""
        from peftkit.engine.adapterhub import is_adapterhub_folder, load_adapterhub
        from peftkit.engine.tuner import _check_adapter_name

        if isinstance(model, PeftModel):
            raise ValueError("The model already is a PeftModel; use model.load_adapter(path, adapter_name) to add one.")
        _check_adapter_name(adapter_name)
        _refuse_foreign_adapters(model)
        if config is None and subfolder is None and is_adapterhub_folder(model_id):
            return load_adapterhub(cls, model, model_id, adapter_name, is_trainable)
        keep_config = config is not None
        config, weights = _read_adapter(model_id, subfolder, config, hub_kwargs)
        config.inference_mode = not is_trainable
        target_cls = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL.get(str(config.task_type), PeftModel)
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                _loading=True, _keep_config=keep_config)
        try:
            set_adapter_state_dict(peft_model.base_model, weights, adapter_name,
                                   ignore_mismatched_sizes=ignore_mismatched_sizes,
                                   allow_nonfinite=allow_nonfinite, allow_missing_keys=allow_missing_keys)
        except Exception:
            # A checkpoint that does not fit leaves the user's model as it was: unwrapped, flags restored.
            peft_model.base_model._discard_partial_adapter(adapter_name)
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            raise
        if not is_trainable:
            for p in peft_model.parameters():
                p.requires_grad_(False)
            peft_model.eval()
        return peft_model


def _read_adapter(
    model_id: Union[str, os.PathLike], subfolder: Optional[str], config: Optional[PeftConfig], hub_kwargs: dict
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config (unless given) and the weights of a saved adapter, read as one consistent pair."""
    parsed, _, weights, _ = read_checkpoint(
        model_id, subfolder=subfolder, read_config=config is None, parse=PeftConfig.from_file_data, **hub_kwargs
    )
    return (parsed if config is None else config), weights  # a config passed in is used as is, as in PEFT


def _convert_to_plain_lora(tensors: dict, config: PeftConfig, initial: dict) -> tuple[dict, PeftConfig]:
    """A PiSSA/OLoRA adapter (trained on the residual base W - s B0 A0) as a plain LoRA adapter for the original
    base W: rank 2r with A' = [A; A0], B' = [B, -B0], so s B' A' = s (B A - B0 A0); alpha is raised to keep s.
    ``initial``: the adapter's tensors saved right after initialisation (before training)."""
    if str(config.peft_type) != "LORA":
        raise ValueError("path_initial_model_for_weight_conversion converts LoRA (PiSSA/OLoRA) adapters only, "
                         f"not {config.peft_type}.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion cannot be combined with use_rslora=True and a "
                         "rank_pattern / alpha_pattern (as in PEFT).")
    init = str(config.init_lora_weights).lower()
    if not init.startswith(("pissa", "olora", "true")):
        import warnings

        warnings.warn("path_initial_model_for_weight_conversion only makes sense for a PiSSA/OLoRA adapter; "
                      f"this one has init_lora_weights={config.init_lora_weights!r}.")
    out = dict(tensors)
    for key, value in tensors.items():
        is_a = ".lora_A." in key or key.endswith(".lora_A") or ".lora_embedding_A" in key
        is_b = ".lora_B." in key or key.endswith(".lora_B") or ".lora_embedding_B" in key
        if not (is_a or is_b):
            continue
        if key not in initial:
            raise ValueError(f"The initial adapter has no {key}; pass the folder saved right after initialising "
                             "this same adapter (same targets and ranks).")
        first = initial[key].to(device=value.device, dtype=value.dtype)
        if first.shape != value.shape:
            raise ValueError(f"The initial adapter's {key} has shape {tuple(first.shape)}, the trained one "
                             f"{tuple(value.shape)}; they must come from the same configuration.")
        out[key] = torch.cat([value, first], dim=0) if is_a else torch.cat([value, -first], dim=1)
    config.r *= 2
    config.lora_alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    config.init_lora_weights = True
    return out, config


def _write_model_card(out_dir: str, config: Optional[PeftConfig], base: Optional[str] = None) -> None:
    """A short ``README.md`` in the save folder (as PEFT writes one); an existing card is left untouched.
    ``base_model`` is the wrapped model's own name (its ``config._name_or_path``), as in PEFT; none for a custom
    model without a config."""
    path = os.path.join(out_dir, "README.md")
    if config is None or os.path.exists(path):
        return
    from peftkit.engine.io import atomic_write_text

    front = ["---"] + ([f"base_model: {base}"] if base else []) + ["library_name: peft", "tags:", "- peftkit",
                                                                     f"- {str(config.peft_type).lower()}", "---"]
    body = [f"# {str(config.peft_type)} adapter" + (f" for {base}" if base else ""), "",
            "Saved by peftkit in Hugging Face PEFT's format (adapter_config.json + adapter weights); it loads with",
            "`peftkit.PeftModel.from_pretrained(base_model, path)` or `peft.PeftModel.from_pretrained(...)`."]
    atomic_write_text(path, "\n".join(front + [""] + body) + "\n")


class PeftModelForSequenceClassification(PeftModel):
    """Also trains and saves the classification head (``classifier`` or ``score``), as PEFT does."""

    _label_names = ("labels",)

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> None:
        if not hasattr(config, "modules_to_save"):
            return
        present = [n for n in SEQ_CLS_HEAD_NAMES if any(name == n or name.endswith("." + n) for name, _ in model.named_modules())]
        if not present:
            return
        merged = list(config.modules_to_save or [])
        merged += [n for n in present if n not in merged]
        config.modules_to_save = merged


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    pass


class PeftModelForQuestionAnswering(PeftModel):
    _label_names = ("start_positions", "end_positions")

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> None:
        if hasattr(config, "modules_to_save") and any(n.endswith("qa_outputs") for n, _ in model.named_modules()):
            merged = list(config.modules_to_save or [])
            if "qa_outputs" not in merged:
                merged.append("qa_outputs")
            config.modules_to_save = merged


class PeftModelForCausalLM(PeftModel):
    _label_names = ("labels",)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    pass


class PeftModelForFeatureExtraction(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
